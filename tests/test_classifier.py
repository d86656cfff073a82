"""eandc.classifier: the recipe that trains the MNIST teachers, on data whose answer is known."""

import numpy as np
import pytest
import torch

import eandc
from eandc.classifier import accuracy, predict, train_classifier
from eandc.compare import silent_neurons


def blobs(n=600, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    labels = rng.integers(0, 3, size=n)
    return centres[labels] + rng.normal(0, 0.5, size=(n, 2)), labels


def test_learns_separable_classes_and_returns_a_float64_mlp():
    X, labels = blobs()
    net = train_classifier(X[:400], labels[:400], [4], "tanh", epochs=30, lr=1e-2, progress=False)
    assert isinstance(net, eandc.MLP) and net.widths == [4] and net.d_out == 3
    assert net.theta.dtype == torch.float64
    assert accuracy(net, X[400:], labels[400:]) > 0.97
    assert predict(net, X[:5]).shape == (5,)


def test_same_seed_same_teacher_other_seed_other_teacher():
    X, labels = blobs(200)
    a = train_classifier(X, labels, [3, 3], "g", epochs=2, seed=1, progress=False)
    b = train_classifier(X, labels, [3, 3], "g", epochs=2, seed=1, progress=False)
    c = train_classifier(X, labels, [3, 3], "g", epochs=2, seed=2, progress=False)
    assert torch.equal(a.theta, b.theta)
    assert not torch.equal(a.theta, c.theta)


@pytest.mark.parametrize("labels, message", [
    (np.zeros(5, dtype=int), "shape"),
    (np.full(10, 0.5), "integers"),
    (np.full(10, -1), "lie in"),
])
def test_bad_labels_are_named(labels, message):
    with pytest.raises((ValueError, TypeError), match=message):
        train_classifier(np.zeros((10, 2)), labels, [2], epochs=1, progress=False)


def test_labels_beyond_n_classes_and_bad_widths_are_refused():
    X, labels = blobs(30)
    with pytest.raises(ValueError, match="lie in"):
        train_classifier(X, labels, [2], n_classes=2, epochs=1, progress=False)
    with pytest.raises(ValueError, match="widths"):
        train_classifier(X, labels, [0], epochs=1, progress=False)


def test_bias_std_sets_the_spread_of_the_initial_hidden_biases():
    """bias_std 1 is the default recipe (same teacher). On inputs in [0, 1], N(0, 1) biases
    leave ReLU neurons negative on every input, which never learn and stay so; with bias_std 0
    only those whose w . x is never positive are."""
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, size=(300, 50)) * (rng.uniform(size=(300, 1)) < 0.5)
    labels = (X.sum(1) > np.median(X.sum(1))).astype(int)
    default = train_classifier(X, labels, [40], "relu", epochs=1, seed=3, progress=False)
    one = train_classifier(X, labels, [40], "relu", epochs=1, bias_std=1.0, seed=3, progress=False)
    zero = train_classifier(X, labels, [40], "relu", epochs=1, bias_std=0.0, seed=3, progress=False)
    assert torch.equal(default.theta, one.theta)
    dead_one, dead_zero = silent_neurons(one, X)[0], silent_neurons(zero, X)[0]
    assert len(dead_zero) < len(dead_one) / 2, (dead_zero, dead_one)
    with pytest.raises(ValueError, match="bias_std"):
        train_classifier(X, labels, [4], "relu", epochs=1, bias_std=-1.0, progress=False)
