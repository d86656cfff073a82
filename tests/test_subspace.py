"""The input subspace (eandc.subspace): the span of a black box's first-layer weights, found from
its outputs by finite differences, and Expand-and-Cluster in its coordinates."""

import numpy as np
import pytest
import torch
from conftest import random_mlp

import eandc
from eandc.subspace import (
    KINKED_STEP,
    SMOOTH_STEP,
    InputSubspace,
    expand_and_cluster_in_subspace,
    input_subspace,
    probe_step,
)


def outside_span(weights: np.ndarray, basis: np.ndarray) -> float:
    """Largest share of a weight vector's norm outside the span of ``basis``."""
    rest = weights - weights @ basis @ basis.T
    return float((np.linalg.norm(rest, axis=1) / np.linalg.norm(weights, axis=1)).max())


@pytest.mark.parametrize("activation, widths", [
    ("tanh", [3]), ("g", [3]), ("sigmoid", [3]), ("softplus", [3]), ("relu", [3]),
    ("g", [3, 4]), ("tanh", [4, 2, 3])])
def test_the_span_of_the_first_layer_weights_is_found(activation, widths):
    teacher = eandc.random_teacher(12, widths, activation=activation, seed=3, d_out=2)
    X = eandc.gaussian_inputs(500, 12, seed=4)
    found = input_subspace(teacher, X, step=KINKED_STEP if activation == "relu" else 1e-3)
    assert found.dimension == widths[0]
    np.testing.assert_allclose(found.basis.T @ found.basis, np.eye(widths[0]), atol=1e-12)
    assert outside_span(teacher.weights[0].numpy(), found.basis) < 1e-8
    s = found.singular_values / found.singular_values[0]
    assert s[widths[0] - 1] > 1e-4 and s[widths[0]] < 1e-9  # a clear cut


def test_more_neurons_than_inputs_span_every_input():
    teacher = eandc.random_teacher(3, [5], activation="tanh", seed=0)
    found = input_subspace(teacher, eandc.gaussian_inputs(200, 3, seed=1))
    assert found.dimension == 3


def test_it_probes_until_a_round_adds_nothing_and_counts_its_queries():
    teacher = eandc.random_teacher(10, [6], activation="tanh", seed=0)  # one output
    seen = set()

    def black_box(X):
        seen.update(row.tobytes() for row in np.asarray(X))
        return teacher(X)

    found = input_subspace(black_box, eandc.gaussian_inputs(300, 10, seed=1), points_per_round=2)
    assert found.dimension == 6
    assert found.n_points == 8  # ranks 2, 4, 6, then 6 again
    assert found.n_queries == len(seen) == 4 * 10 * 8 + 1


def test_too_few_points_for_the_rank_is_an_error():
    teacher = eandc.random_teacher(10, [6], activation="tanh", seed=0)
    with pytest.raises(ValueError, match="max_points"):
        input_subspace(teacher, eandc.gaussian_inputs(300, 10, seed=1), points_per_round=2,
                       max_points=3)


def test_a_black_box_that_ignores_its_inputs_is_refused():
    with pytest.raises(ValueError, match="do not change"):
        input_subspace(lambda X: np.ones((len(X), 2)), eandc.gaussian_inputs(50, 4, seed=0))


def test_a_step_that_straddles_kinks_is_reported():
    teacher = eandc.random_teacher(12, [8], activation="relu", seed=0, d_out=2)
    X = eandc.gaussian_inputs(500, 12, seed=1)
    with pytest.raises(ValueError, match="not smooth at this step"):
        input_subspace(teacher, X, step=0.5)
    assert input_subspace(teacher, X, step=KINKED_STEP).dimension == 8


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_piecewise_linear_black_boxes_are_probed_with_the_small_step(activation):
    assert probe_step(activation) == KINKED_STEP and probe_step("tanh") == SMOOTH_STEP
    teacher = eandc.random_teacher(12, [8], activation=activation, seed=0, d_out=2)
    X = eandc.gaussian_inputs(500, 12, seed=1)
    assert input_subspace(teacher, X, step=probe_step(activation)).dimension == 8


@pytest.mark.parametrize("bad, match", [({"step": 0.0}, "step"), ({"max_points": 0}, "max_points")])
def test_bad_arguments_are_named(bad, match):
    teacher = eandc.random_teacher(4, [2], activation="tanh", seed=0)
    with pytest.raises(ValueError, match=match):
        input_subspace(teacher, eandc.gaussian_inputs(50, 4, seed=0), **bad)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("whiten", [False, True])
def test_a_lifted_network_computes_the_same_function_of_the_inputs(skip, whiten):
    basis, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(9, 3)))
    subspace = InputSubspace(basis, np.ones(3), n_points=1, n_queries=1)
    net = random_mlp([3, 5, 2], "softplus", seed=1, skip=skip)
    X = torch.as_tensor(eandc.gaussian_inputs(100, 9, seed=2))
    if whiten:  # queries far from centred, with very different spreads
        X = 3.0 + X * torch.linspace(0.01, 10.0, 9, dtype=torch.float64)
        subspace = subspace.whitened(X)
    lifted = subspace.lift(net)
    assert lifted.d_in == 9 and (lifted.skip is not None) == skip
    torch.testing.assert_close(lifted(X), net(subspace.project(X)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(subspace.project(subspace.embed(subspace.project(X))),
                               subspace.project(X), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="subspace has 3"):
        subspace.lift(random_mlp([4, 5, 2], "softplus"))
    with pytest.raises(ValueError, match="subspace lives in 9"):
        subspace.project(np.zeros((2, 8)))


def test_whitened_coordinates_are_centred_with_unit_covariance():
    basis, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(9, 3)))
    plain = InputSubspace(basis, np.ones(3), n_points=1, n_queries=1)
    X = 5.0 + torch.as_tensor(eandc.gaussian_inputs(500, 9, seed=2)) @ torch.diag(
        torch.logspace(-3, 1, 9, dtype=torch.float64))
    Z = plain.whitened(X).project(X)
    torch.testing.assert_close(Z.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cov(Z.T), torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
    on_a_line = torch.outer(torch.linspace(0, 1, 50, dtype=torch.float64),
                            torch.ones(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="hardly vary"):
        plain.whitened(on_a_line)
    with pytest.raises(ValueError, match="two inputs"):
        plain.whitened(X[:1])


def test_a_teacher_is_recovered_exactly_in_subspace_coordinates():
    teacher = eandc.random_teacher(20, [3], activation="tanh", seed=1)
    X = eandc.gaussian_inputs(2_000, 20, seed=2)
    result, found = expand_and_cluster_in_subspace(teacher, X, "tanh", student_widths=[12],
                                                   n_students=4, progress=False, seed=1)
    assert found.dimension == 3 and result.students.layout.d_in == 3
    comparison = eandc.compare(teacher, result.network, eandc.gaussian_inputs(1_000, 20, seed=3))
    assert result.widths == [3], result.summary()
    assert comparison.max_distance <= 1e-12, comparison.summary()
    assert comparison.relative_rmse <= 1e-9, comparison.summary()


def test_a_teacher_is_recovered_exactly_in_whitened_coordinates():
    """Queries far from centred, with spreads from 0.01 to 10: the students take whitened
    coordinates; the network, lifted, is the teacher on the inputs themselves."""
    teacher = eandc.random_teacher(20, [3], activation="softplus", seed=1)
    X = 2.0 + eandc.gaussian_inputs(2_000, 20, seed=2) * np.logspace(-2, 1, 20)
    result, found = expand_and_cluster_in_subspace(teacher, X, "softplus", student_widths=[12],
                                                   n_students=4, progress=False, seed=1,
                                                   whiten=True)
    Z = found.project(X)
    assert found.whitening is not None
    torch.testing.assert_close(torch.cov(Z.T), torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=0)
    held_out = 2.0 + eandc.gaussian_inputs(1_000, 20, seed=3) * np.logspace(-2, 1, 20)
    comparison = eandc.compare(teacher, result.network, held_out)
    assert result.widths == [3], result.summary()
    assert comparison.max_distance <= 1e-12, comparison.summary()
    assert comparison.relative_rmse <= 1e-9, comparison.summary()


def test_a_polish_on_the_inputs_removes_the_finite_difference_error():
    """A ReLU teacher probed with the kinked step: the lifted network carries the basis's
    rounding error; a few iterations on the inputs themselves remove it."""
    teacher = eandc.random_teacher(30, [3], activation="relu", seed=1)
    X = eandc.gaussian_inputs(2_000, 30, seed=2)
    held_out = eandc.gaussian_inputs(1_000, 30, seed=3)
    runs = {}
    for polish in (0, 5):
        result, _ = expand_and_cluster_in_subspace(teacher, X, "relu", student_widths=[12],
                                                   n_students=4, progress=False, seed=1,
                                                   input_polish_iter=polish)
        assert result.widths == [3], result.summary()
        runs[polish] = (result, eandc.compare(teacher, result.network, held_out).relative_rmse)
    assert "polish" in runs[5][0].timings and "polish" not in runs[0][0].timings
    assert runs[5][1] <= 1e-14 < runs[0][1], (runs[0][1], runs[5][1])
    assert runs[5][0].final_loss <= 1e-28


def test_subspace_recovery_refuses_what_does_not_apply():
    teacher = eandc.random_teacher(4, [2], activation="tanh", seed=0)
    X = eandc.gaussian_inputs(100, 4, seed=0)
    with pytest.raises(TypeError, match="callable"):
        expand_and_cluster_in_subspace(teacher(X), X, "tanh")
    with pytest.raises(ValueError, match="feature_mask"):
        expand_and_cluster_in_subspace(teacher, X, "tanh", feature_mask=np.ones(4, bool))
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="input_polish_iter"):
            expand_and_cluster_in_subspace(teacher, X, "tanh", input_polish_iter=bad)
    with pytest.raises(TypeError, match="whiten"):
        expand_and_cluster_in_subspace(teacher, X, "tanh", whiten="yes")
