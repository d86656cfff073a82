import numpy as np
import pytest
import torch

from eandc import gaussian_inputs, random_teacher
from eandc.activations import get_activation
from eandc.mlp import Layout, StudentBatch, forward
from eandc.training import (
    compact_students,
    frozen_parameters,
    init_students,
    jacobian,
    levenberg_marquardt,
    packed_students,
    pruned_neurons,
    student_losses,
    train_students,
    unpacked_students,
    zero_neuron,
)


@pytest.mark.parametrize("activation", ["g", "tanh", "sigmoid", "softplus", "gelu", "silu", "relu"])
@pytest.mark.parametrize("skip", [False, True])
def test_analytic_jacobian_matches_autograd(activation, skip):
    layout = Layout(3, (5, 4), 2, skip=skip)
    act = get_activation(activation)
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(3, layout.size, dtype=torch.float64, generator=gen)
    X = torch.randn(11, 3, dtype=torch.float64, generator=gen)
    out, jac = jacobian(theta, layout, act, X)
    for i in range(3):
        ref = torch.autograd.functional.jacobian(lambda t: forward(t, layout, act, X), theta[i])
        torch.testing.assert_close(jac[i], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, forward(theta, layout, act, X), rtol=0, atol=0)


def test_losses_are_per_student_and_chunked():
    layout = Layout(2, (3,), 1)
    act = get_activation("tanh")
    theta = torch.randn(4, layout.size, dtype=torch.float64)
    X = torch.randn(5000, 2, dtype=torch.float64)
    y = torch.randn(5000, 1, dtype=torch.float64)
    expected = (forward(theta, layout, act, X) - y).square().mean(dim=(1, 2))
    torch.testing.assert_close(student_losses(theta, layout, act, X, y), expected, rtol=1e-13, atol=0)


def test_levenberg_marquardt_reaches_the_floor_from_near_the_teacher():
    teacher = random_teacher(2, [3], activation="tanh", seed=2)
    X = torch.from_numpy(gaussian_inputs(2000, 2, seed=0))
    y = teacher(X)
    theta = teacher.theta[None].repeat(3, 1)
    theta = theta + 0.05 * torch.randn(theta.shape, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(1))
    trained, rel, _ = levenberg_marquardt(theta, teacher.layout, teacher.activation, X, y, max_iter=100)
    assert (rel < 1e-26).all()


def _pruned_at_random(layout, n_students, seed):
    """Random students, each with 2 or more neurons of every hidden layer pruned."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_students, layout.size, dtype=torch.float64, generator=gen)
    weights, biases, _ = layout.unflatten(theta)  # views
    for s in range(n_students):
        for l, width in enumerate(layout.widths):
            for j in torch.randperm(width, generator=gen)[:2 + (s + l) % (width - 2)].tolist():
                zero_neuron(weights[l][s], biases[l][s], weights[l + 1][s], j)
    return theta


@pytest.mark.parametrize("layout", [Layout(3, (7,), 2, skip=True), Layout(4, (6, 5, 4), 2)])
def test_packing_leaves_out_the_pruned_neurons_and_unpacking_restores_them(layout):
    act = get_activation("g")
    theta = _pruned_at_random(layout, 4, seed=0)
    X = torch.randn(40, layout.d_in, dtype=torch.float64)
    packed, packed_layout, index = packed_students(theta, layout)
    alive = [int((~m).sum(1).max()) for m in pruned_neurons(theta, layout)]
    assert packed_layout.widths == tuple(alive) and packed_layout.skip == layout.skip
    torch.testing.assert_close(forward(packed, packed_layout, act, X), forward(theta, layout, act, X),
                               rtol=1e-13, atol=1e-13)
    assert torch.equal(unpacked_students(packed, packed_layout, index, layout), theta)
    assert packed_students(packed, packed_layout) is None  # nothing left to leave out


def test_levenberg_marquardt_iterations_are_the_same_packed():
    layout = Layout(3, (8,), 1)
    act = get_activation("g")
    teacher = random_teacher(3, [3], activation="g", seed=1)
    X = torch.from_numpy(gaussian_inputs(300, 3, seed=0))
    y = teacher(X)
    theta = _pruned_at_random(layout, 3, seed=2)
    full, rel_full, _ = levenberg_marquardt(theta, layout, act, X, y, max_iter=3)
    packed, packed_layout, index = packed_students(theta, layout)
    small, rel_small, _ = levenberg_marquardt(packed, packed_layout, act, X, y, max_iter=3)
    torch.testing.assert_close(unpacked_students(small, packed_layout, index, layout), full,
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rel_small, rel_full, rtol=1e-10, atol=0)
    assert not torch.equal(full, theta)  # the iteration moved the students


def test_compaction_preserves_the_function_and_frozen_neurons_stay_zero():
    teacher = random_teacher(2, [2], activation="tanh", seed=0)
    X = torch.from_numpy(gaussian_inputs(1000, 2, seed=0))
    y = teacher(X)
    W, b, A, c = (teacher.weights[0], teacher.biases[0], teacher.weights[1], teacher.biases[1])
    # a student with a duplicate of neuron 0 (flipped sign), a silent neuron and the teacher's two
    w = torch.stack([W[0], -W[0], W[1], torch.tensor([0.3, -0.2], dtype=torch.float64)])
    bb = torch.stack([b[0], -b[0], b[1], torch.tensor(0.1, dtype=torch.float64)])
    a = torch.stack([0.3 * A[:, 0], -0.7 * A[:, 0], A[:, 1], torch.zeros(1, dtype=torch.float64)], 1)
    layout = Layout(2, (4,), 1)
    theta = layout.flatten([w[None], a[None]], [bb[None], c[None]])
    act = teacher.activation
    torch.testing.assert_close(forward(theta, layout, act, X)[0], y, rtol=1e-12, atol=1e-12)
    compact, removed = compact_students(theta, layout, act, X, y)
    assert removed == 2
    assert pruned_neurons(compact, layout)[0].sum() == 2
    torch.testing.assert_close(forward(compact, layout, act, X)[0], y, rtol=1e-12, atol=1e-12)
    frozen = frozen_parameters(compact, layout)
    assert frozen.sum() == 2 * (2 + 1 + 1)
    noisy = compact + 1e-3 * torch.randn(compact.shape, dtype=torch.float64) * (~frozen)
    trained, rel, _ = levenberg_marquardt(noisy, layout, act, X, y, max_iter=50)
    assert torch.equal(trained[frozen], torch.zeros_like(trained[frozen]))
    assert rel[0] < 1e-26


def test_train_students_reports_each_phase_and_reaches_low_loss():
    teacher = random_teacher(2, [2], activation="tanh", seed=1)
    X = torch.from_numpy(gaussian_inputs(2000, 2, seed=0))
    y = teacher(X)
    students = init_students(Layout(2, (6,), 1), teacher.activation, 4, y, seed=0)
    trained, report = train_students(students, X, y, adam_steps=100, max_iter=200)
    assert isinstance(trained, StudentBatch) and trained.n_students == 4
    assert set(report.seconds) >= {"adam", "lm_subset", "lm_all"}
    assert np.median(report.relative_losses) < 1e-12


def test_students_are_deterministic_for_a_seed():
    teacher = random_teacher(2, [2], activation="g", seed=1)
    X = torch.from_numpy(gaussian_inputs(1500, 2, seed=0))
    y = teacher(X)
    runs = [train_students(init_students(Layout(2, (4,), 1), teacher.activation, 3, y, seed=5), X, y,
                           adam_steps=50, max_iter=30, polish_iter=5)[0].theta for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("finisher", ["dense", "matfree"])
def test_fixed_layers_stay_bitwise_unchanged_while_the_rest_trains(finisher):
    teacher = random_teacher(2, [3, 2], activation="g", seed=0)
    X = torch.as_tensor(gaussian_inputs(600, 2, seed=1))
    y = teacher(X)
    layout = Layout(2, (4, 3), 1)
    students = init_students(layout, teacher.activation, 3, y, seed=2, scale=0.3)
    trained, report = train_students(students, X, y, adam_steps=20, max_iter=15, polish_iter=0,
                                     compaction_rounds=3, fixed_layers=1, finisher=finisher)
    w0, b0, _ = layout.unflatten(students.theta)
    w1, b1, _ = layout.unflatten(trained.theta)
    assert torch.equal(w1[0], w0[0]) and torch.equal(b1[0], b0[0])
    assert not torch.equal(w1[1], w0[1]) and not torch.equal(w1[2], w0[2])
    free = ~frozen_parameters(students.theta, layout, fixed_layers=1)
    assert int(free.sum()) == 3 * (layout.size - 4 * 3)


def test_compaction_rounds_use_the_tolerances_given(monkeypatch):
    from eandc import training

    teacher = random_teacher(2, [2], activation="g", seed=0)
    X = torch.as_tensor(gaussian_inputs(400, 2, seed=1))
    y = teacher(X)
    students = init_students(Layout(2, (6,), 1), teacher.activation, 2, y, seed=3)
    used = []
    original = training.compact_students

    def compact(*args, silent_tol, duplicate_tol, **kwargs):
        used.append((silent_tol, duplicate_tol))
        return original(*args, silent_tol=silent_tol, duplicate_tol=duplicate_tol, **kwargs)

    monkeypatch.setattr(training, "compact_students", compact)
    monkeypatch.setattr(training, "LOSS_FLOOR", 0.0)  # every student is a compaction candidate
    monkeypatch.setattr(training, "COMPACTION_MAX_LOSS", float("inf"))
    train_students(students, X, y, adam_steps=20, max_iter=5, polish_iter=0, compaction_rounds=2,
                   compaction_tolerances=[0.05, 0.02, 0.01])
    assert used == [(0.05, 0.05), (0.02, 0.02)]
    with pytest.raises(ValueError, match="compaction tolerances"):
        train_students(students, X, y, compaction_tolerances=[0.5, 2.0])
