"""The fused analytic gradient (eandc.fast) against autograd, and the batched forward against
independent torch.nn modules (the skip term; tests/test_mlp.py covers networks without it)."""

import math

import numpy as np
import pytest
import torch

from eandc import ACTIVATIONS, MLP, StudentBatch
from eandc.fast import autograd_loss_and_gradient, compiled_value_and_derivative, loss_and_gradient
from eandc.mlp import Layout, forward
from eandc.training import adam_phase, epoch_order


def _problem(activation, widths, skip, n_students=3, n=257, d_in=3, d_out=2, seed=0):
    """Random students (weights N(0, 1/fan_in), as eandc initialises them), inputs and targets.

    The scale keeps pre-activations well below 20, where torch's softplus switches to the
    identity while ``value_and_derivative`` still returns sigmoid(z) = 1 - 2e-9 as derivative.
    """
    gen = torch.Generator().manual_seed(seed)
    layout = Layout(d_in, widths, d_out, skip)
    weights, biases = [], []
    for fan_in, fan_out in zip(layout.sizes[:-1], layout.sizes[1:]):
        weights.append(torch.randn(n_students, fan_out, fan_in, generator=gen, dtype=torch.float64)
                       / math.sqrt(fan_in))
        biases.append(torch.randn(n_students, fan_out, generator=gen, dtype=torch.float64))
    skip_w = torch.randn(n_students, d_out, d_in, generator=gen, dtype=torch.float64) if skip else None
    theta = layout.flatten(weights, biases, skip_w)
    X = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    return theta, layout, ACTIVATIONS[activation], X, y


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("widths", [(5,), (6, 4)], ids=["depth1", "depth2"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_fused_gradient_matches_autograd(activation, widths, skip):
    theta, layout, act, X, y = _problem(activation, widths, skip)
    ref_loss, ref_grad = autograd_loss_and_gradient(theta, layout, act, X, y)
    # chunk_elements=1: chunks of MIN_CHUNK_ROWS rows, so the 257 samples take three chunks
    for chunk in (1, 1 << 16):
        loss, grad = loss_and_gradient(theta, layout, act, X, y, chunk_elements=chunk)
        assert loss.shape == ref_loss.shape and grad.shape == theta.shape
        assert float(((loss - ref_loss).abs() / ref_loss).max()) < 1e-12
        assert _relative(grad, ref_grad) < 1e-12
        for s in range(theta.shape[0]):  # every student's own gradient, not only the batch's
            assert _relative(grad[s], ref_grad[s]) < 1e-12


def test_fused_gradient_leaves_inputs_alone_and_takes_a_leaf_that_requires_grad():
    theta, layout, act, X, y = _problem("g", (5,), True)
    before = theta.clone()
    leaf = theta.clone().requires_grad_(True)
    loss, grad = loss_and_gradient(leaf, layout, act, X, y)
    assert not loss.requires_grad and not grad.requires_grad
    assert torch.equal(theta, before)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
def test_compiled_activation_matches_or_falls_back():
    theta, layout, act, X, y = _problem("tanh", (5,), False)
    ref_loss, ref_grad = autograd_loss_and_gradient(theta, layout, act, X, y)
    loss, grad = loss_and_gradient(theta, layout, act, X, y, compiled=True)
    assert _relative(grad, ref_grad) < 1e-12
    assert float(((loss - ref_loss).abs() / ref_loss).max()) < 1e-12
    assert compiled_value_and_derivative(act) is compiled_value_and_derivative(act)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("gradient", ["fused", "compiled"])
def test_adam_phase_fused_follows_the_autograd_path(gradient):
    theta, layout, act, X, y = _problem("g", (5,), False)
    ref = adam_phase(theta, layout, act, X, y, 20, gradient="autograd")
    got = adam_phase(theta, layout, act, X, y, 20, gradient=gradient)
    assert _relative(got - theta, ref - theta) < 1e-9
    with pytest.raises(ValueError, match="gradient"):
        adam_phase(theta, layout, act, X, y, 1, gradient="numerical")


def test_minibatch_adam_follows_independent_students_on_the_same_minibatches():
    theta, layout, act, X, y = _problem("g", (5, 3), False, n=100)
    steps, batch = 12, 32  # 4 minibatches per epoch, the last of 4 rows: 3 epochs
    got = adam_phase(theta, layout, act, X, y, steps, lr=1e-2, batch_size=batch, seed=5)
    for s in range(theta.shape[0]):  # each student alone, autograd, its own optimizer
        own = theta[s:s + 1].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([own], lr=1e-2)
        for step in range(steps):
            epoch, k = divmod(step, 4)
            rows = epoch_order(len(X), 5, epoch)[k * batch:(k + 1) * batch]
            optimizer.zero_grad()
            (forward(own, layout, act, X[rows]) - y[rows]).square().mean().backward()
            optimizer.step()
        assert _relative(got[s] - theta[s], own.detach()[0] - theta[s]) < 1e-9
    assert not torch.equal(epoch_order(len(X), 5, 0), epoch_order(len(X), 5, 1))
    full = adam_phase(theta, layout, act, X, y, steps, lr=1e-2)
    assert torch.equal(adam_phase(theta, layout, act, X, y, steps, lr=1e-2, batch_size=len(X)), full)
    assert _relative(got - theta, full - theta) > 1e-3  # the minibatches did change the steps
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            adam_phase(theta, layout, act, X, y, 1, batch_size=bad)
    assert torch.equal(adam_phase(theta, layout, act, X, y, 3, batch_size=np.int64(32), seed=5),
                       adam_phase(theta, layout, act, X, y, 3, batch_size=32, seed=5))


@pytest.mark.parametrize("activation", ["g", "softplus", "leaky_relu"])
def test_batched_forward_with_skip_matches_independent_modules(activation):
    theta, layout, act, X, _ = _problem(activation, (6, 4), True, n_students=4)
    batch = StudentBatch(theta, layout, act)
    out = forward(theta, layout, act, X)
    for s in range(batch.n_students):
        student = batch.student(s)
        module = MLP(student.weights, student.biases, activation, skip=student.skip).to_torch()
        torch.testing.assert_close(out[s], module(X), rtol=1e-13, atol=1e-13)
