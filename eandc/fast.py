"""Fused analytic loss gradient of many students at once, for the first-order (Adam) phase.

Two implementations of the same arithmetic, behind :func:`loss_and_gradient`:

* ``"native"``: the compiled CPU kernel of :mod:`eandc.native` (float64, every student's forward
  and backward pass in one sweep over the samples, the activation from vectorised polynomials).
  ``backend="auto"`` takes it wherever it applies (``eandc.native.unsupported_reason``).
* ``"torch"``: chunked PyTorch, for GPUs, float32, GELU and wide (MNIST-sized) layers. What the
  profiler showed (``torch.profiler``, one thread, g students 8-64-1 x 10 on 6,410 rows, the
  Adam phase of problem T2 of ``benchmarks/training_speed.py``): the autograd step spends ~85% of
  its time in element-wise kernels (``add``, ``sigmoid``, ``mul``, ``sub``, ``softplus`` and their
  backward) over whole ``(students, samples, width)`` tensors of 33 MB, which do not fit in
  cache, and only ~7% in ``bmm``. Here the same arithmetic runs over chunks of samples that stay
  in the L2 cache, the derivative comes with the value (``Activation.value_and_derivative``), the
  first layer of all students is one matrix product, and the backward pass is a few batched
  matrix products: 1.2-2.9x faster than autograd on CPU (T1, T2), 1.9x per full-batch step on
  MNIST-sized students (T3, GEMM-bound; peak RSS 494 MB instead of 1,331). ``compiled=True``
  runs the activation through ``torch.compile``: 3-4x faster activation kernels in isolation, but
  no consistent gain on the whole step for 4-20 s of compiling per activation and process, so it
  is off by default; without a working compiler it falls back to the eager activation.

The benchmark's figures for both are in ``benchmarks/README.md``.
:func:`autograd_loss_and_gradient` is the reference (autograd through :func:`eandc.mlp.forward`).
"""

from __future__ import annotations

import logging
import math

import torch

from . import native
from .activations import Activation
from .mlp import Layout, forward

__all__ = ["loss_and_gradient", "autograd_loss_and_gradient", "compiled_value_and_derivative",
           "CHUNK_ELEMENTS", "BACKENDS", "chosen_backend"]

log = logging.getLogger(__name__)

# Hidden activities (students x samples x width) per chunk: a few of these fit in the L2 cache.
CHUNK_ELEMENTS = 1 << 16
# ... but at least this many samples per chunk, so that wide inputs still make efficient GEMMs.
MIN_CHUNK_ROWS = 128

BACKENDS = ("auto", "native", "torch")

_compiled: dict[str, object] = {}


def chosen_backend(layout: Layout, activation: Activation, X: torch.Tensor, backend: str = "auto",
                   compiled: bool = False, theta: torch.Tensor | None = None) -> str:
    """``"native"`` or ``"torch"``: what :func:`loss_and_gradient` runs for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or compiled:
        if backend == "native":
            raise ValueError("compiled=True runs the torch backend, not the native one")
        return "torch"
    reason = native.unsupported_reason(layout, activation, X, theta)
    if reason is None:
        return "native"
    if backend == "native":
        raise ValueError(f"the native kernel does not apply: {reason}")
    return "torch"


def compiled_value_and_derivative(activation: Activation):
    """``activation.value_and_derivative`` through ``torch.compile`` (one per activation and
    process); the eager function when compiling fails (no C compiler, unsupported platform)."""
    if activation.name in _compiled:
        return _compiled[activation.name]
    eager = activation.value_and_derivative
    try:
        compiled = torch.compile(eager, dynamic=True)
    except Exception as error:  # noqa: BLE001 - any failure means: run eagerly
        log.warning("torch.compile unavailable (%s); using the eager activation", error)
        _compiled[activation.name] = eager
        return eager

    def value_and_derivative(z):
        try:
            return compiled(z)
        except Exception as error:  # noqa: BLE001 - compile errors surface at the first call
            log.warning("torch.compile of %s failed (%s: %s); using the eager activation",
                        activation.name, type(error).__name__, str(error).splitlines()[0][:200])
            _compiled[activation.name] = eager
            return eager(z)

    _compiled[activation.name] = value_and_derivative
    return value_and_derivative


def _chunk_rows(n: int, n_students: int, width: int, chunk_elements: int) -> int:
    rows = max(MIN_CHUNK_ROWS, chunk_elements // max(1, n_students * width))
    n_chunks = math.ceil(n / max(1, rows))
    return math.ceil(n / n_chunks)  # chunks of (nearly) equal size


@torch.no_grad()
def loss_and_gradient(theta: torch.Tensor, layout: Layout, activation: Activation, X: torch.Tensor,
                      y: torch.Tensor, *, chunk_elements: int = CHUNK_ELEMENTS,
                      compiled: bool = False, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error of each student ``(N,)`` and its gradient w.r.t. ``theta`` ``(N, P)``.

    The gradient is that of the sum of the students' losses (each student's own gradient), in
    the flat layout. ``backend``: ``"auto"`` (the native kernel where it applies, else torch),
    ``"native"`` (an error where it does not apply) or ``"torch"``. The torch path: forward pass
    keeping each hidden layer's activation derivative, then backpropagation by matrix products,
    ``chunk_elements`` hidden activities at a time (``compiled``: the activation through
    ``torch.compile``).
    """
    if not layout.widths:
        raise ValueError("loss_and_gradient needs at least one hidden layer")
    if chosen_backend(layout, activation, X, backend, compiled, theta) == "native":
        return native.loss_and_gradient(theta, layout, activation, X, y)
    vd = compiled_value_and_derivative(activation) if compiled else activation.value_and_derivative
    weights, biases, skip = layout.unflatten(theta.detach())
    n_students, n, n_layers, d_in = theta.shape[0], X.shape[0], layout.n_layers, layout.d_in
    width = layout.sizes[1]
    like = dict(dtype=theta.dtype, device=theta.device)
    # first layer of every student as one matrix: rows (student, neuron), columns inputs
    w_first, b_first = weights[0].reshape(n_students * width, d_in), biases[0].reshape(1, -1)
    g_first = torch.zeros(n_students * width, d_in, **like)
    gb_first = torch.zeros(n_students * width, **like)
    g_w = [torch.zeros_like(w) for w in weights[1:]]
    g_b = [torch.zeros_like(b) for b in biases[1:]]
    g_skip = torch.zeros_like(skip) if skip is not None else None
    sse = torch.zeros(n_students, **like)
    rows = _chunk_rows(n, n_students, max(layout.widths), chunk_elements)
    for start in range(0, n, rows):
        x, target = X[start:start + rows], y[start:start + rows]
        m = x.shape[0]
        # (N, m, width) with students strided: element-wise results keep this layout
        z = torch.addmm(b_first, x, w_first.T).view(m, n_students, width).transpose(0, 1)
        value, slope = vd(z)
        posts, slopes = [value], [slope]
        for l in range(1, n_layers - 1):
            value, slope = vd(torch.baddbmm(biases[l].unsqueeze(1), posts[-1], weights[l].transpose(1, 2)))
            posts.append(value)
            slopes.append(slope)
        out = torch.baddbmm(biases[-1].unsqueeze(1), posts[-1], weights[-1].transpose(1, 2))
        if skip is not None:
            out += torch.matmul(x, skip.transpose(1, 2))
        delta = out.sub_(target)
        sse += delta.square().sum(dim=(1, 2))
        delta.mul_(2.0 / (n * layout.d_out))
        if skip is not None:
            g_skip += torch.matmul(delta.transpose(1, 2), x)
        for l in range(n_layers - 1, 0, -1):
            g_w[l - 1].baddbmm_(delta.transpose(1, 2), posts[l - 1])
            g_b[l - 1] += delta.sum(1)
            delta = slopes[l - 1] * torch.bmm(delta, weights[l])  # slope first: its layout wins
        delta = delta.transpose(0, 1).reshape(m, n_students * width)  # a view: same layout as z
        g_first.addmm_(delta.T, x)
        gb_first += delta.sum(0)
    grad = layout.flatten([g_first.view(n_students, width, d_in), *g_w],
                          [gb_first.view(n_students, width), *g_b], g_skip)
    return sse / (n * layout.d_out), grad


def autograd_loss_and_gradient(theta: torch.Tensor, layout: Layout, activation: Activation,
                               X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the same losses and gradient by autograd through :func:`eandc.mlp.forward`."""
    theta = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        losses = (forward(theta, layout, activation, X) - y).square().mean(dim=(1, 2))
        (grad,) = torch.autograd.grad(losses.sum(), theta)
    return losses.detach(), grad
