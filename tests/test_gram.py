"""The structured Gauss-Newton matrix of one-hidden-layer students against the Jacobian's."""

import pytest
import torch

import eandc.gram as gram
from eandc import ACTIVATIONS
from eandc.mlp import Layout
from eandc.training import (
    DENSE_MAX_GRAM_FLOPS,
    _gauss_newton,
    choose_finisher,
    gram_multiply_adds,
    jacobian,
    levenberg_marquardt,
    structured_gram,
)


def _from_jacobian(theta, layout, activation, X, y):
    """The reference: J^T J, J^T r and the squared error from the full Jacobian."""
    out, jac = jacobian(theta, layout, activation, X)
    jac = jac.flatten(1, 2)
    r = (out - y).flatten(1)
    return (jac.transpose(1, 2) @ jac, (jac.transpose(1, 2) @ r[:, :, None])[:, :, 0],
            r.square().sum(1))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("d_out", [1, 4])
def test_matches_the_jacobian_to_1e_12(activation, skip, d_out, monkeypatch):
    monkeypatch.setattr(gram, "CHUNK_ELEMENTS", 500)  # several chunks of samples
    layout = Layout(3, (6,), d_out, skip=skip)
    gen = torch.Generator().manual_seed(d_out + 2 * skip)
    theta = torch.randn(3, layout.size, dtype=torch.float64, generator=gen)
    X = torch.randn(257, 3, dtype=torch.float64, generator=gen)
    y = torch.randn(257, d_out, dtype=torch.float64, generator=gen)
    got = gram.gauss_newton(theta, layout, ACTIVATIONS[activation], X, y)
    want = _from_jacobian(theta, layout, ACTIVATIONS[activation], X, y)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert float((a - b).abs().max() / b.abs().max()) < 1e-12
    assert float((got[0] - got[0].transpose(1, 2)).abs().max() / got[0].abs().max()) < 1e-14


@pytest.mark.parametrize("pairs_max_inputs", [128, 3], ids=["pairs", "whole-block"])
def test_many_inputs_take_the_whole_block(pairs_max_inputs, monkeypatch):
    """Above PAIRS_MAX_INPUTS inputs the first-layer block is one product: the same matrix."""
    monkeypatch.setattr(gram, "PAIRS_MAX_INPUTS", pairs_max_inputs)
    layout = Layout(5, (4,), 3, skip=True)
    gen = torch.Generator().manual_seed(5)
    theta = torch.randn(2, layout.size, dtype=torch.float64, generator=gen)
    X = torch.randn(90, 5, dtype=torch.float64, generator=gen)
    y = torch.randn(90, 3, dtype=torch.float64, generator=gen)
    got = gram.gauss_newton(theta, layout, ACTIVATIONS["softplus"], X, y)
    want = _from_jacobian(theta, layout, ACTIVATIONS["softplus"], X, y)
    assert all(float((a - b).abs().max() / b.abs().max()) < 1e-12 for a, b in zip(got, want))
    first = 4 * 6
    pairs = 10 * 21 if pairs_max_inputs == 128 else first * first
    features = 4 + 1 + 5
    assert gram.gram_multiply_adds(layout, 90) == 90 * (pairs + first * features + features ** 2)


def test_the_natural_order_is_a_permutation_of_the_layout():
    for layout in (Layout(4, (3,), 2), Layout(4, (3,), 2, skip=True), Layout(1, (1,), 1)):
        order = gram.natural_order(layout)
        assert torch.equal(order.sort().values, torch.arange(layout.size))


def test_refuses_deep_students():
    assert not gram.applies(Layout(3, (4, 4), 2))
    with pytest.raises(ValueError, match="one hidden layer"):
        gram.gauss_newton(torch.zeros(1, Layout(3, (4, 4), 2).size, dtype=torch.float64),
                          Layout(3, (4, 4), 2), ACTIVATIONS["tanh"], torch.zeros(5, 3),
                          torch.zeros(5, 2))


def test_the_dense_finisher_takes_it_for_several_outputs():
    """The finisher's matrices come from eandc.gram for one hidden layer and several outputs,
    from the Jacobian otherwise (the same numbers either way), and its cost model follows."""
    wide_out, one_out, deep = Layout(3, (5,), 4), Layout(3, (5,), 1), Layout(3, (5, 5), 4)
    assert structured_gram(wide_out) and not structured_gram(one_out)
    assert not structured_gram(deep)
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(2, wide_out.size, dtype=torch.float64, generator=gen)
    X = torch.randn(100, 3, dtype=torch.float64, generator=gen)
    y = torch.randn(100, 4, dtype=torch.float64, generator=gen)
    got = _gauss_newton(theta, wide_out, ACTIVATIONS["g"], X, y)
    want = _from_jacobian(theta, wide_out, ACTIVATIONS["g"], X, y)
    assert all(float((a - b).abs().max() / b.abs().max()) < 1e-12 for a, b in zip(got, want))
    # the MNIST chapter's students in their teacher's input subspace: 16-64-10 with the linear term
    subspace = Layout(16, (64,), 10, skip=True)
    assert gram_multiply_adds(subspace, 20_000) < 20_000 * 10 * subspace.size ** 2 / 10
    assert gram_multiply_adds(subspace, 20_000) < DENSE_MAX_GRAM_FLOPS
    assert choose_finisher(subspace, 4, 20_000, 20_000) == "dense"
    assert gram_multiply_adds(one_out, 100) == 100 * one_out.size ** 2


def test_levenberg_marquardt_fits_a_teacher_with_it():
    """Dense Levenberg-Marquardt on structured matrices takes students 2-3-3 to a 2-2-3
    teacher's outputs to machine precision."""
    act = ACTIVATIONS["tanh"]
    gen = torch.Generator().manual_seed(3)
    teacher = Layout(2, (2,), 3)
    t_theta = torch.randn(1, teacher.size, dtype=torch.float64, generator=gen)
    X = torch.randn(400, 2, dtype=torch.float64, generator=gen)
    from eandc.mlp import forward
    y = forward(t_theta, teacher, act, X)[0]
    layout = Layout(2, (3,), 3)
    theta = torch.randn(4, layout.size, dtype=torch.float64, generator=gen)
    _, rel, _ = levenberg_marquardt(theta, layout, act, X, y, max_iter=300)
    assert int((rel < 1e-20).sum()) >= 2, rel
