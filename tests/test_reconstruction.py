"""A planted overparameterised student batch reconstructs the teacher exactly."""

import math

import numpy as np
import pytest
import torch
from test_clustering import planted_students

from eandc import MLP, compare, gaussian_inputs, random_teacher
from eandc.clustering import cluster_layer
from eandc.reconstruction import align_output_bias, assemble_network, finetune, fit_linear_term, prune


@pytest.mark.parametrize("activation", ["g", "tanh", "sigmoid", "softplus", "relu"])
def test_planted_students_reconstruct_the_teacher_exactly(activation):
    teacher = random_teacher(2, [4], activation=activation, seed=5)
    students, _ = planted_students(teacher, 8, 12, noise=1e-6)
    X = torch.from_numpy(gaussian_inputs(4000, 2, seed=0))
    y = teacher(X)
    clustering = cluster_layer(students, 0, gamma=0.5, beta=math.pi / 6)
    net = assemble_network(students, clustering, losses=None)
    net = align_output_bias(net, X, y)
    if net.activation.leaves_linear_term:
        net = fit_linear_term(net, X, y)
    net, loss = finetune(net, X, y)
    net, loss, _ = prune(net, X, y)
    assert loss < 1e-26
    result = compare(teacher, net, gaussian_inputs(3000, 2, seed=9))
    assert result.widths_match
    assert result.max_distance < 1e-12
    assert result.relative_rmse < 1e-12


def test_prune_removes_a_silent_and_a_duplicate_neuron_only():
    """Teacher neuron 1 split into two halves, plus a neuron with zero outgoing weight."""
    teacher = random_teacher(2, [3], activation="tanh", seed=3)
    W, b, A, c = teacher.weights[0], teacher.biases[0], teacher.weights[1], teacher.biases[1]
    w = torch.cat([W, W[1:2], torch.tensor([[0.5, 0.5]], dtype=torch.float64)])
    bb = torch.cat([b, b[1:2], torch.tensor([0.2], dtype=torch.float64)])
    a = torch.cat([A[:, :1], 0.5 * A[:, 1:2], A[:, 2:3], 0.5 * A[:, 1:2],
                   torch.zeros(1, 1, dtype=torch.float64)], 1)
    net = MLP([w, a], [bb, c], "tanh")
    X = torch.from_numpy(gaussian_inputs(2000, 2, seed=0))
    y = teacher(X)
    pruned, loss, notes = prune(net, X, y)
    assert pruned.widths == [3] and loss < 1e-26
    assert sum(line.startswith("removed") for line in notes) == 2


def planted_deep_students(teacher, n_students, widths, seed=0, noise=1e-9):
    """Deep students computing a 2-hidden-layer teacher exactly (up to ``noise``): teacher neurons
    in random slots of each layer, some split into two copies sharing the outgoing weights, the
    rest silent (zero outgoing weights, random incoming)."""
    from eandc.mlp import Layout, StudentBatch

    rng = np.random.default_rng(seed)
    (W1, W2, A), (b1, b2, c) = teacher.weights, teacher.biases
    W1, W2, A, b1, b2, c = (t.numpy() for t in (W1, W2, A, b1, b2, c))
    layout = Layout(teacher.d_in, tuple(widths), teacher.d_out)
    thetas = []
    for _ in range(n_students):
        s1 = _slots(rng, W1.shape[0], widths[0])  # teacher neuron j -> list of (slot, share)
        s2 = _slots(rng, W2.shape[0], widths[1])
        w1 = rng.normal(size=(widths[0], W1.shape[1]))
        v1 = rng.normal(size=widths[0])
        w2 = np.zeros((widths[1], widths[0]))
        v2 = rng.normal(size=widths[1])
        w2[:, :] = rng.normal(size=w2.shape)  # junk rows: random incoming
        a = np.zeros((teacher.d_out, widths[1]))
        for j, copies in s1.items():
            for slot, _ in copies:
                w1[slot] = W1[j] + noise * rng.normal(size=W1.shape[1])
                v1[slot] = b1[j]
        silent1 = set(range(widths[0])) - {slot for copies in s1.values() for slot, _ in copies}
        for i, copies in s2.items():
            row = np.zeros(widths[0])
            for j, copies1 in s1.items():
                for slot, share in copies1:
                    row[slot] = share * W2[i, j]
            for slot, share in copies:
                w2[slot] = row + noise * rng.normal(size=widths[0])
                v2[slot] = b2[i]
                a[:, slot] = share * A[:, i]
        for slot in silent1:  # silent layer-1 neurons: no layer-2 neuron listens
            w2[:, slot] = 0.0
        thetas.append(layout.flatten([torch.tensor(w1), torch.tensor(w2), torch.tensor(a)],
                                     [torch.tensor(v1), torch.tensor(v2), torch.tensor(c)]))
    return StudentBatch(torch.stack(thetas), layout, teacher.activation)


def _slots(rng, k, width):
    order = rng.permutation(width)
    out, pos = {}, 0
    for j in range(k):
        parts = 2 if rng.random() < 0.5 else 1
        shares = rng.dirichlet(np.ones(parts)) if parts > 1 else [1.0]
        out[j] = [(int(order[pos + p]), float(shares[p])) for p in range(parts)]
        pos += parts
    return out


def test_planted_deep_students_reconstruct_the_teacher_exactly_layer_by_layer():
    from eandc.reconstruction import write_shared_layer

    teacher = random_teacher(2, [4, 3], activation="g", seed=1)
    students = planted_deep_students(teacher, 8, [12, 9])
    X = torch.from_numpy(gaussian_inputs(4000, 2, seed=0))
    y = teacher(X)
    for s in range(students.n_students):
        torch.testing.assert_close(students.student(s)(X), y, rtol=1e-7, atol=1e-7)
    first = cluster_layer(students, 0)
    assert first.width == 4
    shared = write_shared_layer(students, first, losses=None)
    assert shared.widths == [4, 9]
    for s in range(shared.n_students):  # writing the shared layer in keeps every function
        torch.testing.assert_close(shared.student(s)(X), y, rtol=1e-6, atol=1e-6)
    second = cluster_layer(shared, 1)
    assert second.width == 3
    net = align_output_bias(assemble_network(shared, second, losses=None), X, y)
    net, loss, _ = prune(net, X, y)
    assert net.widths == [4, 3] and loss < 1e-26
    result = compare(teacher, net, gaussian_inputs(3000, 2, seed=9))
    assert result.max_distance < 1e-12 and result.relative_rmse < 1e-12


def test_prune_moves_a_neuron_that_is_linear_on_the_queries_into_the_linear_term():
    teacher = random_teacher(2, [3], activation="relu", seed=2)
    X = torch.from_numpy(gaussian_inputs(3000, 2, seed=0))
    y = teacher(X)
    # an extra ReLU whose bias keeps it active on every query: a linear function there
    w = torch.cat([teacher.weights[0], torch.tensor([[0.3, -0.4]], dtype=torch.float64)])
    b = torch.cat([teacher.biases[0], torch.tensor([50.0], dtype=torch.float64)])
    a = torch.cat([teacher.weights[1], torch.tensor([[0.7]], dtype=torch.float64)], 1)
    extra = MLP([w, a], [b, teacher.biases[1] - 35.0], "relu", skip=torch.zeros(1, 2))
    assert (X @ w[3] + b[3] > 0).all()
    pruned, loss, _ = prune(extra, X, y)
    assert pruned.widths == [3] and loss < 1e-26
    assert compare(teacher, pruned, gaussian_inputs(2000, 2, seed=5)).relative_rmse < 1e-12


def test_prune_keeps_the_last_neuron_of_a_layer():
    """A one-neuron layer whose neuron is a removal candidate (a ReLU active on every query:
    linear there) keeps it: a layer cannot have zero neurons."""
    X = torch.from_numpy(gaussian_inputs(500, 2, seed=0))
    w, b = torch.tensor([[0.3, -0.4]], dtype=torch.float64), torch.tensor([50.0], dtype=torch.float64)
    net = MLP([w, torch.tensor([[0.7]], dtype=torch.float64)], [b, torch.zeros(1, dtype=torch.float64)],
              "relu", skip=torch.zeros(1, 2))
    pruned, loss, notes = prune(net, X, net(X) + 0.1 * torch.sin(X[:, :1]))
    assert pruned.widths == [1] and notes == []


@pytest.mark.parametrize("depth", [1, 2])
def test_widen_last_layer_adds_fresh_neurons_fitted_to_the_residual(depth):
    """The widened network keeps every old weight, adds ``extra`` neurons to its last hidden
    layer only, and fits the queries at least as well (least-squares outgoing weights); the same
    seed draws the same neurons; a bad ``extra`` is named."""
    from eandc.reconstruction import widen_last_layer
    teacher = random_teacher(3, [5] * depth, activation="tanh", seed=2)
    X = torch.from_numpy(gaussian_inputs(500, 3, seed=0))
    y = teacher(X)
    weights, biases = list(teacher.weights), list(teacher.biases)  # less its last neuron
    weights[-2], biases[-2], weights[-1] = weights[-2][:-1], biases[-2][:-1], weights[-1][:, :-1]
    net = MLP(weights, biases, "tanh")
    wide = widen_last_layer(net, X, y, 3, seed=5)
    assert wide.widths == net.widths[:-1] + [net.widths[-1] + 3]
    for old, new in zip(net.weights[:-1], wide.weights[:-1]):
        assert torch.equal(new[:old.shape[0], :old.shape[1]], old)
    assert torch.equal(wide.weights[-1][:, :net.widths[-1]], net.weights[-1])
    loss = lambda m: float(((m(X) - y) ** 2).mean())  # noqa: E731
    assert loss(wide) <= loss(net)
    again = widen_last_layer(net, X, y, 3, seed=5).theta
    assert torch.allclose(again, wide.theta, rtol=0, atol=1e-12)
    assert not torch.allclose(widen_last_layer(net, X, y, 3, seed=6).theta, wide.theta)
    with pytest.raises(ValueError, match="extra"):
        widen_last_layer(net, X, y, 0)


def _next_preactivations(students, layer, X):
    """Per student, what hidden layer ``layer + 1`` (or the output, less the linear term) receives."""
    out = []
    for s in range(students.n_students):
        net = students.student(s)
        out.append(net.hidden(X)[layer] @ net.weights[layer + 1].T + net.biases[layer + 1])
    return out


def test_refitting_the_next_layer_gives_back_what_sharing_dropped():
    """A student neuron outside every cluster that the next layer listens to is dropped when
    the layer is shared; the least-squares refit of the next layer takes back what the shared
    neurons can, never less than the weights ``write_shared_layer`` sums (a feasible choice
    of the same fit), and keeps exact students exact."""
    from eandc.mlp import StudentBatch
    from eandc.reconstruction import refit_next_layer, write_shared_layer

    teacher = random_teacher(2, [4, 3], activation="g", seed=1)
    exact = planted_deep_students(teacher, 8, [12, 9])
    X = torch.from_numpy(gaussian_inputs(2000, 2, seed=0))
    y = teacher(X)
    clustering = cluster_layer(exact, 0)
    refitted = refit_next_layer(write_shared_layer(exact, clustering, losses=None), exact, 0, X)
    for s in range(refitted.n_students):
        torch.testing.assert_close(refitted.student(s)(X), y, rtol=1e-6, atol=1e-6)

    weights, biases, skip = exact.layout.unflatten(exact.theta)
    weights = [w.clone() for w in weights]
    used = np.zeros((exact.n_students, 12), dtype=bool)
    for cluster in clustering.kept:
        used[clustering.student[cluster.members], clustering.neuron[cluster.members]] = True
    gen = torch.Generator().manual_seed(3)
    for s in range(exact.n_students):  # layer 2 now listens to one neuron outside the clusters
        stray = int(np.flatnonzero(~used[s])[0])
        weights[1][s][:, stray] = torch.randn(9, generator=gen, dtype=torch.float64)
    students = StudentBatch(exact.layout.flatten(weights, biases, skip), exact.layout,
                            exact.activation)
    plain = write_shared_layer(students, cluster_layer(students, 0), losses=None)
    refitted = refit_next_layer(plain, students, 0, X)
    target = _next_preactivations(students, 0, X)
    for s, (a, b, t) in enumerate(zip(_next_preactivations(plain, 0, X),
                                      _next_preactivations(refitted, 0, X), target)):
        plain_error, refit_error = float((a - t).square().sum()), float((b - t).square().sum())
        assert refit_error <= plain_error * (1 + 1e-9), (s, plain_error, refit_error)
        assert refit_error < 0.5 * plain_error, (s, plain_error, refit_error)
