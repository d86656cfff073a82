"""Matrix-free Levenberg-Marquardt: Jacobian products, conjugate gradients, training, wiring."""

import time

import pytest
import torch

import eandc.matfree as matfree
from eandc import ACTIVATIONS, gaussian_inputs, random_teacher
from eandc.activations import Activation
from eandc.checkpoint import Checkpoint
from eandc.mlp import MLP, Layout
from eandc.resources import ResourceError, check_training_memory, training_memory
from eandc.storage import load_arrays
from eandc.training import (
    DENSE_MAX_PARAMS,
    choose_finisher,
    compact_students,
    frozen_parameters,
    init_students,
    jacobian,
    levenberg_marquardt,
    train_students,
)


def _relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("widths", [(5,), (5, 4)])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("d_out", [1, 3])
def test_jacobian_products_match_the_dense_jacobian(activation, widths, skip, d_out, monkeypatch):
    monkeypatch.setattr(matfree, "CHUNK_ELEMENTS", 300)  # several chunks of samples
    act = ACTIVATIONS[activation]
    layout = Layout(3, widths, d_out, skip=skip)
    gen = torch.Generator().manual_seed(len(widths) + 2 * skip + 4 * d_out)
    theta = torch.randn(3, layout.size, dtype=torch.float64, generator=gen)
    X = torch.randn(150, 3, dtype=torch.float64, generator=gen)
    v = torch.randn(3, layout.size, dtype=torch.float64, generator=gen)
    u = torch.randn(3, 150, d_out, dtype=torch.float64, generator=gen)
    out, jac = jacobian(theta, layout, act, X)
    jv = torch.einsum("nsop,np->nso", jac, v)
    expected = {"jvp": jv, "vjp": torch.einsum("nsop,nso->np", jac, u),
                "gauss_newton": torch.einsum("nsop,nso->np", jac, jv),
                "diagonal": jac.square().sum((1, 2)), "outputs": out}
    for cache_bytes in (2**30, 0):  # activations kept between products, or recomputed
        lin = matfree.Linearization(theta, layout, act, X, cache_bytes)
        assert len(lin.bounds) > 1 and lin.cached == (cache_bytes > 0)
        got = {"jvp": lin.jvp(v), "vjp": lin.vjp(u), "gauss_newton": lin.gauss_newton(v),
               "diagonal": lin.gauss_newton_diagonal(), "outputs": lin.outputs()}
        for name, value in got.items():
            assert _relative_error(value, expected[name]) < 1e-12, (name, cache_bytes)
        rows = torch.tensor([2, 0])  # a subset of the students, in any order
        assert _relative_error(lin.gauss_newton(v[rows], rows), expected["gauss_newton"][rows]) < 1e-12
        assert _relative_error(lin.jvp(v[rows], rows), jv[rows]) < 1e-12
    assert _relative_error(matfree.jvp(theta, layout, act, X, v), jv) < 1e-12
    assert _relative_error(matfree.vjp(theta, layout, act, X, u), expected["vjp"]) < 1e-12


def _small_system(skip=False):
    teacher = random_teacher(2, [4], activation="g", seed=0)
    X = torch.from_numpy(gaussian_inputs(500, 2, seed=0)) + 3.0  # far from centred
    layout = Layout(2, (8,), 1, skip)
    theta = init_students(layout, teacher.activation, 3, teacher(X), seed=1).theta
    out, jac = jacobian(theta, layout, teacher.activation, X)
    jac = jac.flatten(1, 2)
    gram = jac.transpose(1, 2) @ jac
    grad = (jac.transpose(1, 2) @ (out - teacher(X)).flatten(1, 2).unsqueeze(-1)).squeeze(-1)
    lin = matfree.Linearization(theta, layout, teacher.activation, X)
    shift = 1e-2 * gram.diagonal(dim1=1, dim2=2).mean(1)
    return lin, gram, grad, shift


@pytest.mark.parametrize("precondition,skip", [(None, False), ("jacobi", False),
                                               ("blocks", False), ("blocks", True),
                                               ("layers", False), ("layers", True)])
def test_conjugate_gradients_run_to_convergence_equal_the_dense_solve(precondition, skip):
    lin, gram, grad, shift = _small_system(skip)
    eye = torch.eye(gram.shape[1], dtype=gram.dtype)
    exact = torch.linalg.solve(gram + shift[:, None, None] * eye, -grad)
    diagonal = lin.gauss_newton_diagonal()
    preconditioner = {None: None, "jacobi": matfree.jacobi(diagonal),
                      "blocks": matfree.InputBlocks(lin.X, lin.layout)(diagonal),
                      "layers": matfree.LayerBlocks(lin.X, lin.layout)(lin)}[precondition]
    rtol = torch.full_like(shift, 1e-13)
    step, iterations = matfree.conjugate_gradient(lin.gauss_newton, -grad, shift, rtol, 2000,
                                                  preconditioner)
    assert _relative_error(step, exact) < 1e-9
    assert (iterations < 2000).all()


def test_input_blocks_invert_the_first_layer_block_when_its_kronecker_form_is_exact():
    """With an identity activation and one hidden unit, the first layer's block is
    c X~^T X~ exactly, and the preconditioner applied to (block + shift) v gives v back."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(40, 3, dtype=torch.float64, generator=gen) + 2.0
    layout = Layout(3, (1,), 2)
    theta = torch.randn(2, layout.size, dtype=torch.float64, generator=gen)
    act = Activation("identity", lambda z: (z, torch.ones_like(z)), "none")
    lin = matfree.Linearization(theta, layout, act, X)
    diagonal = lin.gauss_newton_diagonal()
    apply = matfree.InputBlocks(X, layout)(diagonal)
    shift = torch.tensor([0.5, 2.0], dtype=torch.float64)
    v = torch.randn(2, layout.size, dtype=torch.float64, generator=gen)
    (w, b), (w_out, b_out) = layout.layer_slices()
    v[:, w_out] = 0
    v[:, b_out] = 0
    gv = lin.gauss_newton(v) + shift[:, None] * v  # only the first layer is moved ...
    first = torch.cat([torch.arange(w.start, w.stop), torch.arange(b.start, b.stop)])
    got = apply(gv, shift, None)
    assert _relative_error(got[:, first], v[:, first]) < 1e-12  # ... and its blocks are exact
    with pytest.raises(ValueError, match="precondition must be one of"):
        matfree.matfree_levenberg_marquardt(theta, layout, act, X, lin.outputs(), precondition="x")


def test_layer_blocks_are_exact_where_their_kronecker_form_is():
    """With an identity activation, the first layer's block is S (x) X~^T X~ exactly, for any
    width; the output layer's block is exact for any activation. The preconditioner applied to
    (G + shift) v gives v back on the layer that v moves."""
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(60, 3, dtype=torch.float64, generator=gen) + 2.0
    layout = Layout(3, (4,), 2)
    theta = torch.randn(2, layout.size, dtype=torch.float64, generator=gen)
    identity = Activation("identity", lambda z: (z, torch.ones_like(z)), "none")
    shift = torch.tensor([0.5, 2.0], dtype=torch.float64)
    (w, b), (w_out, b_out) = layout.layer_slices()
    first = torch.cat([torch.arange(w.start, w.stop), torch.arange(b.start, b.stop)])
    second = torch.cat([torch.arange(w_out.start, w_out.stop), torch.arange(b_out.start, b_out.stop)])
    for act, moved in [(identity, first), (ACTIVATIONS["tanh"], second)]:
        lin = matfree.Linearization(theta, layout, act, X)
        apply = matfree.LayerBlocks(X, layout)(lin)
        v = torch.zeros(2, layout.size, dtype=torch.float64)
        v[:, moved] = torch.randn(2, len(moved), dtype=torch.float64, generator=gen)
        got = apply(lin.gauss_newton(v) + shift[:, None] * v, shift, None)
        assert _relative_error(got[:, moved], v[:, moved]) < 1e-12, act.name
        rows = torch.tensor([1])
        got_row = apply((lin.gauss_newton(v) + shift[:, None] * v)[rows], shift[rows], rows)
        assert _relative_error(got_row[:, moved], v[rows][:, moved]) < 1e-12
    with pytest.raises(ValueError, match="one hidden layer"):
        matfree.LayerBlocks(X, Layout(3, (4, 4), 2))


def test_conjugate_gradients_stop_per_student():
    lin, gram, grad, shift = _small_system()
    rtol = torch.tensor([1e-1, 1e-12, 1e-3], dtype=torch.float64)
    step, iterations = matfree.conjugate_gradient(lin.gauss_newton, -grad, shift, rtol, 500)
    residual = (torch.einsum("npq,nq->np", gram, step) + shift[:, None] * step + grad).norm(dim=1)
    assert (residual <= 1.0001 * rtol * grad.norm(dim=1)).all()
    assert iterations[0] < iterations[2] < iterations[1]
    _, capped = matfree.conjugate_gradient(lin.gauss_newton, -grad, shift, rtol, 3)
    assert capped.tolist() == [min(3, int(i)) for i in iterations]


def _near_teacher_students(noise=0.05, n_students=4):
    """8-wide students that hold the 2-4-1 g teacher plus four unused neurons, perturbed."""
    teacher = random_teacher(2, [4], activation="g", seed=0)
    X = torch.from_numpy(gaussian_inputs(2000, 2, seed=0))
    layout = Layout(2, (8,), 1)
    gen = torch.Generator().manual_seed(3)
    W, b, A, c = teacher.weights[0], teacher.biases[0], teacher.weights[1], teacher.biases[1]
    thetas = []
    for _ in range(n_students):
        w = torch.cat([W, torch.randn(4, 2, dtype=torch.float64, generator=gen)])
        bias = torch.cat([b, torch.randn(4, dtype=torch.float64, generator=gen)])
        a = torch.cat([A, torch.zeros(1, 4, dtype=torch.float64)], 1)
        theta = layout.flatten([w[None], a[None]], [bias[None], c[None]])[0]
        thetas.append(theta + noise * torch.randn(theta.shape, dtype=torch.float64, generator=gen))
    return torch.stack(thetas), layout, teacher.activation, X, teacher(X)


def test_matrix_free_lm_reaches_the_floor_like_the_dense_lm():
    theta, layout, act, X, y = _near_teacher_students()
    _, rel_dense, _ = levenberg_marquardt(theta, layout, act, X, y, max_iter=200)
    trained, rel, iterations = matfree.matfree_levenberg_marquardt(theta, layout, act, X, y,
                                                                   max_iter=200)
    assert (rel_dense < 1e-20).all()
    assert (rel < 1e-20).all() and iterations < 200
    assert rel.shape == (4,) and trained.shape == theta.shape


def test_float32_products_inside_conjugate_gradients_reach_the_same_floor():
    """Only the Gauss-Newton products are float32: gradients, losses and steps stay float64."""
    theta, layout, act, X, y = _near_teacher_students(n_students=2)
    trained, rel, _ = matfree.matfree_levenberg_marquardt(theta, layout, act, X, y, max_iter=200,
                                                          cg_dtype="float32")
    assert trained.dtype == torch.float64 and (rel < 1e-20).all(), rel
    with pytest.raises(ValueError, match="cg_dtype must be"):
        matfree.matfree_levenberg_marquardt(theta, layout, act, X, y, cg_dtype="float16")
    students = init_students(layout, act, 2, y, seed=0)
    with pytest.raises(ValueError, match="matrix-free finisher only"):
        train_students(students, X, y, finisher="dense", cg_dtype="float32")


def test_a_large_network_is_fine_tuned_matrix_free(monkeypatch):
    """Above DENSE_MAX_PARAMS the fine-tune of a reconstructed network goes matrix-free."""
    import eandc.training
    from eandc.reconstruction import finetune

    theta, layout, act, X, y = _near_teacher_students(noise=1e-3, n_students=1)
    calls = []
    original = matfree.matfree_levenberg_marquardt

    def spy(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return original(*args, **kwargs)

    monkeypatch.setattr(matfree, "matfree_levenberg_marquardt", spy)
    net = MLP.from_flat(theta[0], layout, act)
    _, dense_loss = finetune(net, X, y)
    assert calls == [] and dense_loss < 1e-20
    monkeypatch.setattr(eandc.training, "DENSE_MAX_PARAMS", 10)
    _, loss = finetune(net, X, y)
    assert calls == ["fine-tune"] and loss < 1e-20


def test_exact_conjugate_gradients_follow_the_dense_lm_step_by_step():
    theta, layout, act, X, y = _near_teacher_students(noise=0.2, n_students=2)
    dense, rel_dense, _ = levenberg_marquardt(theta, layout, act, X, y, max_iter=6)
    free, rel_free, _ = matfree.matfree_levenberg_marquardt(
        theta, layout, act, X, y, max_iter=6, cg_tol=1e-14, cg_max_iter=2000, precondition=False)
    assert _relative_error(free, dense) < 1e-6
    torch.testing.assert_close(rel_free, rel_dense, rtol=1e-4, atol=1e-30)


@pytest.mark.parametrize("precondition", ["auto", "layers"])
def test_pruned_neurons_stay_frozen(precondition):
    theta, layout, act, X, y = _near_teacher_students(noise=0.0, n_students=1)
    compact, removed = compact_students(theta, layout, act, X, y)  # the 4 unused neurons go
    assert removed == 4
    frozen = frozen_parameters(compact, layout)
    noisy = compact + 1e-3 * torch.randn(compact.shape, dtype=torch.float64) * (~frozen)
    trained, rel, _ = matfree.matfree_levenberg_marquardt(noisy, layout, act, X, y, max_iter=100,
                                                          precondition=precondition)
    assert torch.equal(trained[frozen], torch.zeros_like(trained[frozen]))
    assert rel[0] < 1e-20


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_bitwise(tmp_path, monkeypatch):
    theta, layout, act, X, y = _near_teacher_students(noise=0.3)
    options = dict(max_iter=15, cg_max_iter=20)
    reference = matfree.matfree_levenberg_marquardt(theta, layout, act, X, y, **options)
    path = tmp_path / "checkpoint.npz"
    original = Checkpoint.write

    def write(self):  # a kill right after the 6th loop-state write
        original(self)
        if self.writes >= 6:
            raise Interrupt

    monkeypatch.setattr(Checkpoint, "write", write)
    with pytest.raises(Interrupt), Checkpoint(path, 0.0):
        matfree.matfree_levenberg_marquardt(theta, layout, act, X, y, **options)
    monkeypatch.undo()
    _, meta = load_arrays(path)
    assert meta["s"] and not meta["r"], "the interruption should fall inside the loop"
    with Checkpoint(path, 0.0) as checkpoint:
        assert checkpoint.resumed_from == {"finished_steps": 0, "interrupted_steps": 1}
        resumed = matfree.matfree_levenberg_marquardt(theta, layout, act, X, y, **options)
    assert torch.equal(resumed[0], reference[0]) and torch.equal(resumed[1], reference[1])
    assert resumed[2] == reference[2]


def test_a_mid_size_problem_trains_to_a_low_loss_in_seconds():
    """64-wide students of 3,459 parameters: a dense iteration builds and factors 3,459 x 3,459
    systems (tens of seconds here); matrix-free ones take about a second."""
    teacher = random_teacher(50, [8], d_out=3, activation="tanh", seed=0)
    X = torch.from_numpy(gaussian_inputs(5000, 50, seed=0))
    y = teacher(X)
    students = init_students(Layout(50, (64,), 3), teacher.activation, 2, y, seed=0)
    start = time.perf_counter()
    trained, report = train_students(students, X, y, adam_steps=300, max_iter=12,
                                     compaction_rounds=0, finisher="matfree")
    seconds = time.perf_counter() - start
    assert report.finisher == "matfree"
    assert (report.relative_losses < 1e-5).all(), report.relative_losses
    assert seconds < 120
    dense = training_memory(students.layout, 2, 5000, 5000, "dense")
    free = training_memory(students.layout, 2, 5000, 5000, "matfree")
    assert sum(dense.values()) > 5 * sum(free.values())


def test_finisher_choice():
    mnist = Layout(784, (64,), 10)
    assert choose_finisher(mnist, 10, 30_000, 30_000) == "matfree"
    assert choose_finisher(Layout(2, (6,), 1), 4, 2000, 1000) == "dense"
    deep = Layout(30, (30, 30, 31), 10)  # few parameters, but a costly Gauss-Newton matrix
    assert deep.size < DENSE_MAX_PARAMS
    assert choose_finisher(deep, 1, 20_000, 20_000) == "matfree"
    assert choose_finisher(deep, 1, 2_000, 2_000) == "dense"
    assert choose_finisher(mnist, 10, 30_000, 30_000, finisher="dense") == "dense"
    assert choose_finisher(Layout(2, (6,), 1), 4, 2000, 1000, finisher="matfree") == "matfree"
    with pytest.raises(ValueError, match="unknown finisher"):
        choose_finisher(mnist, 10, 30_000, 30_000, finisher="sparse")


def test_small_students_go_matrix_free_when_dense_systems_do_not_fit(monkeypatch):
    layout = Layout(50, (60,), 1)  # 3,121 parameters: under the threshold
    assert layout.size < 4_000
    monkeypatch.setenv("EANDC_MAX_MEMORY", "1G")  # 20 dense systems need 3 GiB
    assert choose_finisher(layout, 20, 5000, 5000) == "matfree"
    assert choose_finisher(layout, 2, 5000, 5000) == "dense"  # 2 systems: 0.3 GiB


def test_mnist_size_memory_estimate_fits_without_p_by_p_systems(monkeypatch):
    layout = Layout(784, (64,), 10)  # 50,890 parameters
    parts = training_memory(layout, 10, 30_000, 30_000, "matfree")
    assert "Gauss-Newton systems" not in parts
    assert {"conjugate-gradient vectors", "activation cache", "Jacobian-product chunk"} <= set(parts)
    total = sum(parts.values())
    assert total < 2 * 2**30
    monkeypatch.setenv("EANDC_MAX_MEMORY", "4G")
    assert check_training_memory(layout, 10, 30_000, 30_000, finisher="matfree") == total
    with pytest.raises(ResourceError, match="dense finisher"):
        check_training_memory(layout, 10, 30_000, 30_000, finisher="dense")


def test_the_cli_passes_the_finisher_choice():
    from eandc.cli import build_parser

    args = build_parser().parse_args(["recover", "--teacher", "t.npz", "--finisher", "matfree"])
    assert args.finisher == "matfree"
    assert build_parser().parse_args(["recover", "--teacher", "t.npz"]).finisher is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["recover", "--teacher", "t.npz", "--finisher", "sparse"])
