"""The fused analytic gradient (eandc.fast, its torch backend; tests/test_native.py covers the
native one) against autograd, and the batched forward against independent torch.nn modules (the
skip term; tests/test_mlp.py covers networks without it)."""

import math

import numpy as np
import pytest
import torch
from conftest import random_students

from eandc import MLP, StudentBatch
from eandc.activations import ACTIVATIONS
from eandc.fast import autograd_loss_and_gradient, compiled_value_and_derivative, loss_and_gradient
from eandc.mlp import forward
from eandc.training import adam_learning_rate, adam_phase, epoch_order


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("widths", [(5,), (6, 4)], ids=["depth1", "depth2"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_fused_gradient_matches_autograd(activation, widths, skip):
    theta, layout, act, X, y = random_students(activation, widths, skip)
    ref_loss, ref_grad = autograd_loss_and_gradient(theta, layout, act, X, y)
    # chunk_elements=1: chunks of MIN_CHUNK_ROWS rows, so the 257 samples take three chunks
    for chunk in (1, 1 << 16):
        loss, grad = loss_and_gradient(theta, layout, act, X, y, chunk_elements=chunk, backend="torch")
        assert loss.shape == ref_loss.shape and grad.shape == theta.shape
        assert float(((loss - ref_loss).abs() / ref_loss).max()) < 1e-12
        assert _relative(grad, ref_grad) < 1e-12
        for s in range(theta.shape[0]):  # every student's own gradient, not only the batch's
            assert _relative(grad[s], ref_grad[s]) < 1e-12


def test_fused_gradient_leaves_inputs_alone_and_takes_a_leaf_that_requires_grad():
    theta, layout, act, X, y = random_students("g", (5,), True)
    before = theta.clone()
    leaf = theta.clone().requires_grad_(True)
    for backend in ("auto", "torch"):
        loss, grad = loss_and_gradient(leaf, layout, act, X, y, backend=backend)
        assert not loss.requires_grad and not grad.requires_grad
        assert torch.equal(theta, before)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
def test_compiled_activation_matches_or_falls_back():
    theta, layout, act, X, y = random_students("tanh", (5,), False)
    ref_loss, ref_grad = autograd_loss_and_gradient(theta, layout, act, X, y)
    loss, grad = loss_and_gradient(theta, layout, act, X, y, compiled=True)
    assert _relative(grad, ref_grad) < 1e-12
    assert float(((loss - ref_loss).abs() / ref_loss).max()) < 1e-12
    assert compiled_value_and_derivative(act) is compiled_value_and_derivative(act)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("gradient", ["fused", "chunked", "compiled"])
def test_adam_phase_fused_follows_the_autograd_path(gradient):
    theta, layout, act, X, y = random_students("g", (5,), False)
    ref = adam_phase(theta, layout, act, X, y, 20, gradient="autograd")
    got = adam_phase(theta, layout, act, X, y, 20, gradient=gradient)
    assert _relative(got - theta, ref - theta) < 1e-9
    with pytest.raises(ValueError, match="gradient"):
        adam_phase(theta, layout, act, X, y, 1, gradient="numerical")


def test_minibatch_adam_follows_independent_students_on_the_same_minibatches():
    theta, layout, act, X, y = random_students("g", (5, 3), False, n=100)
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


def test_adam_with_a_decaying_rate_follows_independent_students():
    """``lr_end``: each step's rate is ``lr (lr_end / lr) ** (step / (steps - 1))``, as an
    independent optimizer per student with that schedule takes it."""
    theta, layout, act, X, y = random_students("g", (5,), False, n=100)
    steps, lr, lr_end = 10, 1e-2, 1e-4
    got = adam_phase(theta, layout, act, X, y, steps, lr=lr, lr_end=lr_end)
    for s in range(theta.shape[0]):
        own = theta[s:s + 1].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([own], lr=lr)
        for step in range(steps):
            optimizer.param_groups[0]["lr"] = lr * (lr_end / lr) ** (step / (steps - 1))
            optimizer.zero_grad()
            (forward(own, layout, act, X) - y).square().mean().backward()
            optimizer.step()
        assert _relative(got[s] - theta[s], own.detach()[0] - theta[s]) < 1e-9
    assert adam_learning_rate(0, steps, lr, lr_end) == lr
    assert adam_learning_rate(steps - 1, steps, lr, lr_end) == pytest.approx(lr_end, rel=1e-12)
    constant = adam_phase(theta, layout, act, X, y, steps, lr=lr)
    assert torch.equal(adam_phase(theta, layout, act, X, y, steps, lr=lr, lr_end=lr), constant)
    assert _relative(got - theta, constant - theta) > 1e-2  # the decay did change the steps
    for bad in (0.0, -1e-3, math.nan, math.inf, "1e-4"):
        with pytest.raises(ValueError, match="lr_end"):
            adam_phase(theta, layout, act, X, y, 1, lr_end=bad)


@pytest.mark.parametrize("activation", ["g", "softplus", "leaky_relu"])
def test_batched_forward_with_skip_matches_independent_modules(activation):
    theta, layout, act, X, _ = random_students(activation, (6, 4), True, n_students=4)
    batch = StudentBatch(theta, layout, act)
    out = forward(theta, layout, act, X)
    for s in range(batch.n_students):
        student = batch.student(s)
        module = MLP(student.weights, student.biases, activation, skip=student.skip).to_torch()
        torch.testing.assert_close(out[s], module(X), rtol=1e-13, atol=1e-13)
