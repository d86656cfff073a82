import numpy as np
import pytest
import torch

from eandc import MLP, gaussian_inputs, query, random_teacher, uniform_inputs


def test_random_teacher_recipe_is_reproducible_and_documented():
    a = random_teacher(2, [4], activation="tanh", seed=3)
    b = random_teacher(2, [4], activation="tanh", seed=3)
    assert torch.equal(a.theta, b.theta)
    assert not torch.equal(a.theta, random_teacher(2, [4], activation="tanh", seed=4).theta)
    deep = random_teacher(2, [4, 3], d_out=2)
    assert deep.widths == [4, 3] and deep.d_out == 2 and deep.activation.name == "g"
    rng = np.random.default_rng(3)  # the recipe: first layer N(0, 1), weights before biases
    np.testing.assert_array_equal(a.weights[0].numpy(), rng.normal(0, 1, size=(4, 2)))


def test_deeper_layers_act_on_standardised_activity():
    from eandc.teachers import REFERENCE_INPUTS

    teacher = random_teacher(2, [4, 3], activation="g", seed=5)
    rng = np.random.default_rng(5)
    w1, b1 = rng.normal(size=(4, 2)), rng.normal(size=4)
    v, c = rng.normal(size=(3, 4)), rng.normal(size=3)
    np.testing.assert_array_equal(teacher.weights[0].numpy(), w1)
    reference = np.random.default_rng(0).normal(size=(REFERENCE_INPUTS, 2))
    h = teacher.activation(torch.from_numpy(reference @ w1.T + b1)).numpy()
    z = h @ teacher.weights[1].numpy().T + teacher.biases[1].numpy()
    np.testing.assert_allclose(z, ((h - h.mean(0)) / h.std(0)) @ v.T + c, atol=1e-12)
    np.testing.assert_allclose(z.mean(0), c, atol=1e-12)  # offsets N(0, 1), as in layer 1


def test_input_generators():
    X = gaussian_inputs(20_000, 3, seed=1)
    assert X.shape == (20_000, 3) and X.dtype == np.float64
    assert abs(X.std() - 1) < 0.02
    U = uniform_inputs(20_000, 2, seed=1)
    assert U.min() >= -np.sqrt(3) and U.max() <= np.sqrt(3) and abs(U.std() - 1) < 0.02
    with pytest.raises(ValueError):
        gaussian_inputs(0, 2)


def test_query_accepts_every_kind_of_teacher():
    teacher = random_teacher(3, [5], d_out=2, activation="tanh")
    X = gaussian_inputs(1000, 3)
    reference = teacher(X)
    module = teacher.to_torch().float()  # a float32 module is queried on a float64 copy
    def np_fn(x):
        hidden = np.tanh(x @ teacher.weights[0].numpy().T + teacher.biases[0].numpy())
        return hidden @ teacher.weights[1].numpy().T + teacher.biases[1].numpy()

    def torch_fn(x):
        return teacher.to_torch()(x)
    for black_box in (teacher, np_fn, torch_fn):
        y = query(black_box, X, chunk_size=128)
        assert isinstance(y, np.ndarray) and y.dtype == np.float64 and y.shape == (1000, 2)
        np.testing.assert_allclose(y, reference, rtol=1e-12, atol=1e-12)
    y32 = query(module, X, chunk_size=128)  # float32 weights, evaluated in float64
    with torch.no_grad():
        np.testing.assert_allclose(y32, module.double()(torch.from_numpy(X)).numpy(), rtol=1e-14)
    module.float()
    assert module.layers[0].weight.dtype == torch.float32  # the user's module is left alone
    assert isinstance(query(teacher, torch.from_numpy(X)), torch.Tensor)


def test_query_output_shapes():
    X = gaussian_inputs(10, 2)
    assert query(lambda x: x.sum(1), X).shape == (10, 1)
    with pytest.raises(ValueError, match=r"returned shape \(5, 1\) for 10 inputs"):
        query(lambda x: np.zeros((5, 1)), X)


def test_query_reports_a_teacher_that_raises_or_returns_nan():
    X = gaussian_inputs(10, 2)

    def broken(x):
        raise KeyError("boom")

    with pytest.raises(RuntimeError, match="teacher raised KeyError"):
        query(broken, X)
    with pytest.raises(ValueError, match="NaN or inf for 10 input"):
        query(lambda x: np.full((len(x), 1), np.nan), X)


@pytest.mark.parametrize("bad, message", [
    (np.zeros(5), "2-D"),
    (np.zeros((0, 2)), "empty"),
    (np.array([[0.0, np.inf]]), "NaN or inf"),
    (np.array([["a", "b"]]), "real numeric"),
    (np.zeros((3, 2), dtype=complex), "real numeric"),
])
def test_query_rejects_bad_inputs(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        query(random_teacher(2, [3]), bad)


def test_mlp_teacher_on_numpy_and_tensor_give_same():
    t = random_teacher(2, [3])
    X = gaussian_inputs(7, 2)
    assert isinstance(t, MLP)
    np.testing.assert_array_equal(query(t, X), t(X))
