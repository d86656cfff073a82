"""Training many students as one batched program: a first-order phase, then a second-order finisher.

All students share the queries ``X`` and targets ``y``; each has its own parameters (one row of an
``(N, P)`` tensor) and its own loss, the mean squared error over samples and outputs. The
*relative* loss divides it by the variance of the targets, so that 1e-30 means machine precision
whatever the scale of the teacher.

1. :func:`adam_phase`: Adam on every student at once, full-batch or on minibatches (analytic
   gradient by :mod:`eandc.fast`: the compiled kernel of :mod:`eandc.native` on the CPU, chunked
   PyTorch elsewhere, autograd as the reference), to leave the flat region around the
   initialisation cheaply.
2. :func:`levenberg_marquardt`: Levenberg-Marquardt with one damping factor per student. Each
   iteration builds the Gauss-Newton matrix ``J^T J`` and gradient ``J^T r`` from analytic
   Jacobians, accumulated over chunks of samples so memory stays bounded (for one hidden layer
   and several outputs, by :mod:`eandc.gram`, which sums over the outputs first), and solves
   one ``P x P`` system per student (batched Cholesky). A student stops costing time once it
   reaches the loss floor, stops improving, or runs out of iterations.

:func:`train_students` chains them: Adam and LM on a random subset of the queries (cheap), then
LM on all of them (exact). In between, :func:`compact_students` prunes inside each student the
neurons its function hardly uses: an overparameterised student near a solution creeps towards
it slowly (its minima are degenerate), while the compacted one converges quadratically.
Second-order iterations then run on the *packed* students (:func:`packed_students`: the pruned
neurons left out, each layer as wide as its student with the most neurons alive), which makes
them cheaper: an iteration costs ``O(P^2)`` per sample, so a student that compaction has
halved costs a quarter.
Students with more than ``DENSE_MAX_PARAMS`` parameters, or whose dense systems would not fit
in memory, are finished instead by the matrix-free Levenberg-Marquardt of :mod:`eandc.matfree`
(conjugate gradients on Jacobian products, no ``P x P`` matrix); ``finisher="dense"`` or
``"matfree"`` forces the choice.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint, native
from . import gram as shallow_gram
from .activations import Activation
from .fast import chosen_backend, loss_and_gradient
from .mlp import Layout, StudentBatch, forward
from .resources import available_memory, check_training_memory, training_memory

__all__ = ["init_students", "train_students", "adam_phase", "epoch_order", "levenberg_marquardt",
           "student_losses", "jacobian", "choose_finisher", "TrainingReport"]

log = logging.getLogger(__name__)

# Float64 relative losses below this are at machine precision: nothing left to gain.
LOSS_FLOOR = 1e-28
# Elements of a Jacobian chunk (students x samples x outputs x parameters) held at once.
JACOBIAN_CHUNK_ELEMENTS = 4_000_000
# Students above this relative loss are far from a solution: compacting them is pointless.
COMPACTION_MAX_LOSS = 1e-4
# Tolerances of the successive compaction rounds (coarse first; a round that hurts a student is
# undone for that student, and the next, finer round tries again).
COMPACTION_TOLERANCES = (1e-2, 1e-3, 1e-4)
# How adam_phase computes its gradient (see there), and the eandc.fast backend of each.
GRADIENTS = {"fused": "auto", "native": "native", "chunked": "torch", "compiled": "torch",
             "autograd": None}
# Above this many parameters per student, train_students finishes with the matrix-free
# Levenberg-Marquardt (eandc.matfree): a dense iteration costs O(n P^2 + P^3) time per student.
DENSE_MAX_PARAMS = 4_000
# ... and when one dense iteration's Gauss-Newton matrix costs more than this many
# multiply-adds per student (gram_multiply_adds: rows x outputs x P^2 from the Jacobian, far
# fewer through eandc.gram for one hidden layer and several outputs): the deep MNIST network
# reconstructed from 30-30-30 clusters (3,200 parameters, 20,000 queries x 10 logits: 2e12)
# took 42 s per dense iteration on 2 cores, 0.2-4.4 s per matrix-free one.
DENSE_MAX_GRAM_FLOPS = 5e11
# Second-order training packs the students (leaves their pruned neurons out) when that removes
# at least this share of the parameters (see packed_students).
PACK_MIN_SAVING = 0.1
FINISHERS = ("auto", "dense", "matfree")


def init_students(layout: Layout, activation: Activation, n_students: int, y: torch.Tensor,
                  seed: int = 0, device=None, scale: float = 1.0) -> StudentBatch:
    """Random students: weights ``N(0, scale^2/fan_in)``, hidden biases ``N(0, scale^2)``, output
    bias mean(y). A small ``scale`` starts the students near the origin, where gradient descent
    first aligns neurons with the directions the data favour (what deep students need)."""
    if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"init scale must be a positive number, got {scale!r}")
    gen = torch.Generator().manual_seed(int(seed))
    weights, biases = [], []
    for l, (fan_in, fan_out) in enumerate(zip(layout.sizes[:-1], layout.sizes[1:])):
        weights.append(torch.randn(n_students, fan_out, fan_in, generator=gen, dtype=torch.float64)
                       / math.sqrt(fan_in) * scale)
        if l < layout.n_layers - 1:
            biases.append(scale * torch.randn(n_students, fan_out, generator=gen, dtype=torch.float64))
        else:
            biases.append(y.mean(0).cpu().expand(n_students, fan_out).clone())
    skip = torch.zeros(n_students, layout.d_out, layout.d_in, dtype=torch.float64)
    theta = layout.flatten(weights, biases, skip if layout.skip else None)
    return StudentBatch(theta.to(device), layout, activation)


def format_losses(losses) -> str:
    """Losses in scientific notation, for messages: ``[3.1e-09 2.0e-30 ...]``."""
    return "[" + " ".join(f"{float(v):.1e}" for v in np.asarray(losses).ravel()) + "]"


def _target_scale(y: torch.Tensor) -> float:
    """Variance of the targets (over samples, averaged over outputs): the unit of relative losses."""
    var = float(y.var(dim=0, unbiased=False).mean())
    return var if var > 0 else 1.0


def _chunk_rows(n_students: int, d_out: int, n_params: int) -> int:
    return max(64, JACOBIAN_CHUNK_ELEMENTS // max(1, n_students * d_out * n_params))


def student_losses(theta: torch.Tensor, layout: Layout, activation: Activation, X: torch.Tensor,
                   y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each student, shape ``(N,)``, computed in chunks of samples."""
    rows = _chunk_rows(theta.shape[0], 1, max(layout.sizes))
    total = torch.zeros(theta.shape[0], dtype=theta.dtype, device=theta.device)
    for start in range(0, X.shape[0], rows):
        r = forward(theta, layout, activation, X[start:start + rows]) - y[start:start + rows]
        total += r.square().sum(dim=(1, 2))
    return total / (X.shape[0] * layout.d_out)


def jacobian(theta: torch.Tensor, layout: Layout, activation: Activation, X: torch.Tensor):
    """Outputs ``(N, n, d_out)`` and Jacobian ``(N, n, d_out, P)`` of every student's outputs.

    Analytic backpropagation for all outputs at once; the column order is the flat layout's.
    """
    weights, biases, skip = layout.unflatten(theta)
    n_students, n = theta.shape[0], X.shape[0]
    posts, slopes = [X.expand(n_students, n, layout.d_in)], []
    for w, b in zip(weights[:-1], biases[:-1]):
        value, slope = activation.value_and_derivative(posts[-1] @ w.transpose(1, 2) + b[:, None, :])
        posts.append(value)
        slopes.append(slope)
    out = posts[-1] @ weights[-1].transpose(1, 2) + biases[-1][:, None, :]
    if skip is not None:
        out = out + X @ skip.transpose(1, 2)

    eye = torch.eye(layout.d_out, dtype=theta.dtype, device=theta.device)
    delta = eye.expand(n_students, n, layout.d_out, layout.d_out)  # d out_k / d preact_j
    blocks = []
    for l in range(layout.n_layers - 1, -1, -1):
        a_prev = posts[l]
        blocks.append((delta.unsqueeze(-1) * a_prev[:, :, None, None, :]).flatten(-2))
        blocks.append(delta)
        if l:
            delta = (delta @ weights[l].unsqueeze(1)) * slopes[l - 1][:, :, None, :]
    ordered = []
    for l in range(layout.n_layers):  # blocks were collected from the top layer down
        w_block, b_block = blocks[2 * (layout.n_layers - 1 - l)], blocks[2 * (layout.n_layers - 1 - l) + 1]
        ordered += [w_block, b_block]
    if skip is not None:
        ordered.append((eye[None, None, :, :, None] * X[None, :, None, None, :]).expand(
            n_students, n, layout.d_out, layout.d_out, layout.d_in).flatten(-2))
    return out, torch.cat(ordered, dim=-1)


def pruned_neurons(theta: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Per hidden layer, an ``(N, width)`` mask of pruned neurons: those whose incoming weights,
    bias and outgoing weights are all exactly zero (how :func:`compact_students` removes one)."""
    weights, biases, _ = layout.unflatten(theta)
    masks = []
    for l in range(layout.n_layers - 1):
        silent_in = (weights[l] == 0).all(-1) & (biases[l] == 0)
        silent_out = (weights[l + 1] == 0).all(-2)
        masks.append(silent_in & silent_out)
    return masks


def packed_students(theta: torch.Tensor, layout: Layout):
    """The same students without their pruned neurons, for cheaper second-order iterations.

    Returns ``(packed theta, packed layout, index)``, each hidden layer as wide as its student
    with the most neurons alive (the others padded with pruned neurons, exact zeros) and
    ``index[l]`` ``(N, packed width)`` saying where each packed neuron of hidden layer ``l``
    sits in the original one; ``None`` when packing would save less than ``PACK_MIN_SAVING``
    of the parameters. A Levenberg-Marquardt iteration costs ``O(P^2)`` per sample: once
    compaction has pruned half of a wide student's neurons, its packed iterations cost a
    quarter. :func:`unpacked_students` puts them back.
    """
    masks = pruned_neurons(theta, layout)
    widths = tuple(max(1, int((~m).sum(1).max())) for m in masks)
    packed_layout = Layout(layout.d_in, widths, layout.d_out, layout.skip)
    if packed_layout.size > (1 - PACK_MIN_SAVING) * layout.size:
        return None
    # alive neurons first, in their order, then pruned ones as padding
    index = [torch.argsort(m.to(torch.int8), dim=1, stable=True)[:, :w] for m, w in zip(masks, widths)]
    weights, biases, skip = layout.unflatten(theta)
    packed_w, packed_b = [], []
    for l, (w, b) in enumerate(zip(weights, biases)):
        if l < len(index):  # rows: this hidden layer's neurons
            w = torch.gather(w, 1, index[l][:, :, None].expand(-1, -1, w.shape[2]))
            b = torch.gather(b, 1, index[l])
        if l > 0:  # columns: the hidden layer below
            w = torch.gather(w, 2, index[l - 1][:, None, :].expand(-1, w.shape[1], -1))
        packed_w.append(w)
        packed_b.append(b)
    return packed_layout.flatten(packed_w, packed_b, skip), packed_layout, index


def unpacked_students(packed: torch.Tensor, packed_layout: Layout, index, layout: Layout):
    """The inverse of :func:`packed_students`: ``(N, P)`` parameters in ``layout``, the neurons
    left out (pruned) as exact zeros."""
    n_students = packed.shape[0]
    arange = partial(torch.arange, device=packed.device)
    students = arange(n_students)[:, None, None]
    weights, biases, skip = packed_layout.unflatten(packed)
    full_w, full_b = [], []
    for l, (w, b) in enumerate(zip(weights, biases)):
        fan_out, fan_in = layout.sizes[l + 1], layout.sizes[l]
        rows = index[l] if l < len(index) else arange(fan_out).expand(n_students, -1)
        cols = index[l - 1] if l > 0 else arange(fan_in).expand(n_students, -1)
        out_w = packed.new_zeros(n_students, fan_out, fan_in)
        out_w[students, rows[:, :, None], cols[:, None, :]] = w
        out_b = packed.new_zeros(n_students, fan_out)
        out_b[students[:, :, 0], rows] = b
        full_w.append(out_w)
        full_b.append(out_b)
    return layout.flatten(full_w, full_b, skip)


def frozen_parameters(theta: torch.Tensor, layout: Layout, fixed_layers: int = 0) -> torch.Tensor:
    """``(N, P)`` mask of the parameters that training leaves alone: those of pruned neurons, and
    the incoming weights and biases of the first ``fixed_layers`` hidden layers."""
    frozen = torch.zeros_like(theta, dtype=torch.bool)
    index = torch.arange(layout.size, device=theta.device)
    w_idx, b_idx, _ = layout.unflatten(index)
    for l in range(fixed_layers):
        frozen[:, w_idx[l].flatten()] = True
        frozen[:, b_idx[l]] = True
    for l, mask in enumerate(pruned_neurons(theta, layout)):
        for s, j in mask.nonzero().tolist():
            frozen[s, w_idx[l][j]] = True
            frozen[s, b_idx[l][j]] = True
            frozen[s, w_idx[l + 1][:, j]] = True
    return frozen


def compact_students(theta: torch.Tensor, layout: Layout, activation: Activation, X: torch.Tensor,
                     y: torch.Tensor, silent_tol: float = 1e-3, duplicate_tol: float = 1e-3,
                     fixed_layers: int = 0) -> tuple[torch.Tensor, int]:
    """Prune, inside each student, the neurons its function hardly uses; return (theta, count).

    A neuron is *silent* when its outgoing contribution (norm of its outgoing weights times the
    standard deviation of its activity over ``X``) is below ``silent_tol`` times the targets'
    standard deviation: its mean contribution moves into the next bias. Near a solution, a
    student often represents one teacher neuron by a *group* of close neurons whose first-order
    errors cancel; two neurons within cosine distance ``duplicate_tol`` (up to the activation's
    sign symmetry) are merged into one placed at their outgoing-weight-weighted mean (right to
    second order), carrying the sum of their outgoing weights with the symmetry's sign, scale
    and constant corrections. A pruned neuron's weights become exact zeros, which later
    training keeps frozen. The caller checks the result by retraining (it may be wrong when two
    teacher neurons are closer than ``duplicate_tol``). The first ``fixed_layers`` hidden layers
    (shared by every student) are left as they are.
    """
    theta = theta.detach().clone()
    weights, biases, skip = layout.unflatten(theta)  # views: edits below write into theta
    target_std = _target_scale(y) ** 0.5
    shallow_with_skip = skip is not None and layout.n_layers == 2
    removed = 0
    for s in range(theta.shape[0]):
        a = X
        for l in range(layout.n_layers - 1):
            w, b, w_next, b_next = weights[l][s], biases[l][s], weights[l + 1][s], biases[l + 1][s]
            if l < fixed_layers:  # a shared layer: left as it is
                a = activation(a @ w.T + b)
                continue
            alive = ~(((w == 0).all(1) & (b == 0)) & (w_next == 0).all(0))
            h = activation(a @ w.T + b)
            silent = alive & (w_next.norm(dim=0) * h.std(0) < silent_tol * target_std)
            for j in silent.nonzero().flatten().tolist():
                b_next += w_next[:, j] * h[:, j].mean()
                zero_neuron(w, b, w_next, j)
                removed += 1
            alive &= ~silent
            while int(alive.sum()) > 1:
                pair = closest_pair(w, b, alive, activation.has_sign_symmetry)
                if pair is None or pair[2] >= duplicate_tol:
                    break
                j, k, _, sign = pair
                merge_neurons(activation, w, b, w_next, b_next, j, k, sign,
                       skip[s] if shallow_with_skip else None)
                alive[j] = False
                removed += 1
            a = activation(a @ w.T + b)
    return theta, removed


def zero_neuron(w, b, w_next, j):
    """Prune neuron j in place: its incoming, bias and outgoing weights become exact zeros."""
    w[j] = 0
    b[j] = 0
    w_next[:, j] = 0


def closest_pair(w, b, alive, signed):
    """(j, k, cosine distance, sign) of the closest two alive neurons, j the weaker one."""
    idx = alive.nonzero().flatten()
    v = torch.cat([w[idx], b[idx, None]], 1)
    unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = unit @ unit.T
    dist = 1 - (cos.abs() if signed else cos)
    dist.fill_diagonal_(float("inf"))
    flat = int(dist.argmin())
    j, k = divmod(flat, len(idx))
    return int(idx[j]), int(idx[k]), float(dist[j, k]), (1.0 if cos[j, k] > 0 else -1.0)


def merge_neurons(activation, w, b, w_next, b_next, j, k, sign, skip):
    """Fold neuron j into neuron k (their incoming vectors agree up to ``sign``)."""
    v_j, v_k = torch.cat([w[j], b[j:j + 1]]), torch.cat([w[k], b[k:k + 1]])
    lam = float(v_j.norm() / v_k.norm().clamp_min(1e-300)) if activation.has_scaling_symmetry else 1.0
    flips = activation.symmetry in ("odd", "odd_constant")
    factor = (sign if flips else 1.0) * lam  # outgoing weight of j, expressed on neuron k
    a_j, a_k = factor * w_next[:, j], w_next[:, k].clone()
    if activation.symmetry == "odd_constant" and sign < 0:
        b_next += activation.flip_constant * w_next[:, j]
    if activation.leaves_linear_term and sign < 0 and skip is not None:
        linear = -activation.flip_slope * lam * w_next[:, j]  # s(-z) = s(z) - c z
        skip += linear[:, None] * w[k][None, :]
        b_next += linear * b[k]
    if float(a_j @ a_k) > 0 and not activation.has_scaling_symmetry:
        weight_j = float(a_j.norm())
        weight_k = float(a_k.norm())
        v_new = (weight_j * sign * v_j + weight_k * v_k) / (weight_j + weight_k)
        w[k], b[k] = v_new[:-1], v_new[-1]
    w_next[:, k] = a_k + a_j
    zero_neuron(w, b, w_next, j)


def structured_gram(layout: Layout) -> bool:
    """True when the students' Gauss-Newton matrices are built by :mod:`eandc.gram` (one
    hidden layer and several outputs: the sum over the outputs is taken first), else from the
    Jacobian."""
    return shallow_gram.applies(layout) and layout.d_out > 1


def gram_multiply_adds(layout: Layout, n: int) -> float:
    """Multiply-adds of one student's dense Gauss-Newton matrix on ``n`` samples."""
    if structured_gram(layout):
        return shallow_gram.gram_multiply_adds(layout, n)
    return float(n) * layout.d_out * layout.size ** 2


def _gauss_newton(theta, layout, activation, X, y):
    """(J^T J, J^T r, sum of squared residuals) per student, accumulated over sample chunks."""
    if structured_gram(layout):
        return shallow_gram.gauss_newton(theta, layout, activation, X, y)
    n_students, n_params = theta.shape
    gram = torch.zeros(n_students, n_params, n_params, dtype=theta.dtype, device=theta.device)
    grad = torch.zeros(n_students, n_params, dtype=theta.dtype, device=theta.device)
    sse = torch.zeros(n_students, dtype=theta.dtype, device=theta.device)
    rows = _chunk_rows(n_students, layout.d_out, n_params)
    for start in range(0, X.shape[0], rows):
        out, jac = jacobian(theta, layout, activation, X[start:start + rows])
        r = (out - y[start:start + rows]).flatten(1, 2)
        jac = jac.flatten(1, 2)
        gram += jac.transpose(1, 2) @ jac
        grad += (jac.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1)
        sse += r.square().sum(1)
    return gram, grad, sse


@dataclass
class TrainingReport:
    """What a training run did: relative losses per student, iterations, wall time per phase."""

    relative_losses: np.ndarray
    iterations: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    finisher: str = "dense"  # the second-order finisher used: "dense" or "matfree"

    def n_converged(self, tol: float) -> int:
        return int((self.relative_losses <= tol).sum())


@checkpoint.memoize("adam", lambda theta: ({"theta": theta}, {}),
                    lambda saved, info, theta, *a, **k: saved["theta"].to(theta.device))
def adam_phase(theta: torch.Tensor, layout: Layout, activation: Activation, X: torch.Tensor,
               y: torch.Tensor, steps: int, lr: float = 3e-3, progress: bool = False,
               gradient: str = "fused", fixed_layers: int = 0, batch_size: int | None = None,
               seed: int = 0, lr_end: float | None = None) -> torch.Tensor:
    """``steps`` Adam steps on the sum of the students' losses (each its own gradient).

    ``lr_end``: ``None`` keeps the learning rate at ``lr``; else it decays geometrically from
    ``lr`` at the first step to ``lr_end`` at the last (:func:`adam_learning_rate`).

    ``batch_size``: ``None`` (or at least the number of rows) for full-batch steps; else each
    step takes the next ``batch_size`` rows of an epoch's random order of the rows
    (:func:`epoch_order`, from ``seed``), every student the same rows, as the published recipe
    does. ``gradient``: ``"fused"`` (analytic, :func:`eandc.fast.loss_and_gradient`: the
    compiled kernel of :mod:`eandc.native` where it applies, else chunked PyTorch), ``"native"``
    or ``"chunked"`` (one of those two, forced), ``"compiled"`` (chunked, the activation through
    ``torch.compile``: no consistent gain measured) or ``"autograd"`` (the reference: autograd
    through :func:`forward`). Where the native kernel runs, so does the whole loop: the
    gradient and ``torch.optim.Adam``'s update of every student, many steps per call
    (:func:`eandc.native.adam_steps`), with the optimizer's state kept as torch keeps it.
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {tuple(GRADIENTS)}, got {gradient!r}")
    if gradient == "native":  # refused before any work, not at the first step
        chosen_backend(layout, activation, X, "native", theta=theta)
    n = X.shape[0]
    _check_batch_size(batch_size)
    for name, value in (("lr", lr), ("lr_end", lr_end)):  # refused before any work
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if batch_size is not None and batch_size >= n:
        batch_size = None  # one minibatch of every row: full-batch steps
    fixed = frozen_parameters(theta, layout, fixed_layers) if fixed_layers else None
    theta = theta.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    start, saved = 0, checkpoint.loop()  # an interrupted earlier run's state, when resuming
    if saved.state is not None:
        with torch.no_grad():
            theta.copy_(saved.state[0]["theta"])
        checkpoint.load_adam_state(optimizer, theta, saved.state[0])
        start = saved.state[1]["step"]
    if GRADIENTS[gradient] is not None and chosen_backend(
            layout, activation, X, GRADIENTS[gradient], theta=theta) == "native":
        _native_adam_loop(theta, optimizer, layout, activation, X, y, range(start, steps), lr,
                          lr_end, batch_size, seed, fixed, saved, progress)
        return theta.detach()
    Xb, yb, orders = X, y, _EpochOrders(n, seed)
    for step in tqdm(range(start, steps), desc="adam", disable=not progress, leave=False):
        optimizer.zero_grad(set_to_none=True)
        if batch_size is not None:
            rows = orders.minibatch(step, batch_size).to(X.device)
            Xb, yb = X[rows], y[rows]
        if gradient == "autograd":
            loss = (forward(theta, layout, activation, Xb) - yb).square().mean(dim=(1, 2)).sum()
            loss.backward()
        else:
            theta.grad = loss_and_gradient(theta, layout, activation, Xb, yb,
                                           compiled=gradient == "compiled",
                                           backend=GRADIENTS[gradient])[1]
        if fixed is not None:
            theta.grad.masked_fill_(fixed, 0.0)  # Adam then leaves these entries unchanged
        if lr_end is not None:
            optimizer.param_groups[0]["lr"] = adam_learning_rate(step, steps, lr, lr_end)
        optimizer.step()
        if saved.due():
            saved.save(dict(checkpoint.adam_state(optimizer, theta), theta=theta), {"step": step + 1})
    return theta.detach()


# The compiled Adam loop runs this many seconds between returns to Python (progress, checkpoint).
NATIVE_BLOCK_SECONDS = 0.25


def _native_adam_loop(theta, optimizer, layout, activation, X, y, steps, lr, lr_end, batch_size,
                      seed, fixed, saved, progress):
    """:func:`adam_phase`'s loop over ``steps`` (a range of step numbers; ``batch_size`` ``None``
    for full-batch steps) in the compiled kernel
    (:func:`eandc.native.adam_steps`: the gradient and ``optimizer``'s update, every student
    through many steps per call), in place on ``theta`` and ``optimizer``'s state, which stay
    as ``torch.optim.Adam`` keeps them (so checkpoints are the same either way). It returns to
    Python about every ``NATIVE_BLOCK_SECONDS`` to show progress and record the checkpoint."""
    group, state = optimizer.param_groups[0], optimizer.state[theta]
    if not state:  # as torch.optim.Adam initialises it at its first step
        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(theta),
                     exp_avg_sq=torch.zeros_like(theta))
    params, total, orders = theta.detach(), steps.stop, _EpochOrders(X.shape[0], seed)
    frozen = fixed.contiguous() if fixed is not None else None
    step, block = steps.start, 1
    with tqdm(total=len(steps), desc="adam", disable=not progress, leave=False) as bar:
        while step < total:
            count = min(block, total - step)
            lrs = torch.tensor([adam_learning_rate(s, total, lr, lr_end)
                                for s in range(step, step + count)], dtype=torch.float64)
            rows = bounds = None
            if batch_size is not None:
                pieces = [orders.minibatch(s, batch_size) for s in range(step, step + count)]
                rows = torch.cat(pieces)
                bounds = torch.tensor([0] + [len(r) for r in pieces]).cumsum(0)
            t0 = time.perf_counter()
            native.adam_steps(params, state["exp_avg"], state["exp_avg_sq"], int(state["step"]),
                              layout, activation, X, y, lrs, group["betas"], group["eps"], rows,
                              bounds, frozen)
            elapsed = time.perf_counter() - t0
            state["step"] += count
            step += count
            bar.update(count)
            if saved.due():
                saved.save(dict(checkpoint.adam_state(optimizer, theta), theta=theta),
                           {"step": step})
            block = max(1, min(8 * count, int(count * NATIVE_BLOCK_SECONDS / max(elapsed, 1e-6))))


def adam_learning_rate(step: int, steps: int, lr: float, lr_end: float | None = None) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps`` in :func:`adam_phase`: ``lr``,
    or with ``lr_end`` the geometric interpolation ``lr (lr_end / lr) ** (step / (steps - 1))``
    (a function of the step alone, so a resumed run takes the same rates)."""
    if lr_end is None or steps <= 1:
        return float(lr)
    return float(lr) * (float(lr_end) / float(lr)) ** (step / (steps - 1))


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or
                                   not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` rows in minibatch epoch ``epoch`` of :func:`adam_phase` (a
    function of ``seed`` and ``epoch`` only, so a resumed run meets the same minibatches)."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=gen)


class _EpochOrders:
    """The rows of :func:`adam_phase`'s minibatch steps: step ``s`` takes minibatch ``k`` of epoch
    ``e`` (``s = e * per_epoch + k``) in :func:`epoch_order`, the last epoch's order kept."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.order = n, seed, None, None

    def minibatch(self, step: int, batch_size: int) -> torch.Tensor:
        epoch, k = divmod(step, math.ceil(self.n / batch_size))
        if epoch != self.epoch:  # also mid-epoch when resuming: the order is recomputed
            self.epoch, self.order = epoch, epoch_order(self.n, self.seed, epoch)
        return self.order[k * batch_size:(k + 1) * batch_size]


LM_STATE = ("theta", "lam", "nu", "best", "best_at", "sse", "active", "frozen")


def lm_loop_state(theta, layout, fixed_layers):
    """(state, iterations done, checkpoint loop) of a Levenberg-Marquardt run: the state
    (``LM_STATE``: parameters, damping and its factor, best loss and when, current loss, active
    students, frozen parameters) fresh, or an interrupted earlier run's when resuming."""
    n_students = theta.shape[0]
    lam = torch.full((n_students,), float("nan"), dtype=theta.dtype, device=theta.device)
    state = dict(theta=theta, lam=lam, nu=torch.full_like(lam, 2.0),
                 best=torch.full_like(lam, float("inf")),
                 best_at=torch.zeros(n_students, dtype=torch.long),
                 sse=torch.full_like(lam, float("inf")),
                 active=torch.arange(n_students, device=theta.device),
                 frozen=frozen_parameters(theta, layout, fixed_layers))
    done_iter, saved = 0, checkpoint.loop()
    if saved.state is not None:
        loaded, done_iter = saved.state[0], saved.state[1]["it"]
        state.update({k: loaded[k].to(theta.device) for k in LM_STATE if k != "best_at"})
        state["best_at"] = loaded["best_at"]
    return state, done_iter, saved


def accept_or_damp(theta, sse, lam, nu, active, trial, step, grad, ok, sse_now, sse_trial):
    """One Levenberg-Marquardt decision per active student, in place: a step that lowers the
    loss is taken and the damping eased by Nielsen's rule; otherwise the damping grows."""
    lam_a = lam[active]
    predicted = -(step * grad).sum(1) + lam_a * step.square().sum(1)
    gain = (sse_now - sse_trial) / predicted.clamp_min(1e-300)
    accept = ok & torch.isfinite(sse_trial) & (sse_trial < sse_now)
    idx = active[accept]
    theta[idx] = trial[accept]
    sse[idx] = sse_trial[accept]
    lam[idx] = lam_a[accept] * torch.clamp(1 - (2 * gain[accept] - 1) ** 3, min=1 / 3)
    nu[idx] = 2.0
    rejected = active[~accept]
    lam[rejected] = lam[rejected] * nu[rejected]
    nu[rejected] = nu[rejected] * 2


def finished(sse, lam, best, best_at, active, it, scale, loss_floor, patience, min_improvement):
    """Which active students stop: at the loss floor, without progress for ``patience``
    iterations (``best``/``best_at`` are updated in place), or with a blown-up damping."""
    rel = sse[active] / scale
    improved = rel < best[active] * (1 - min_improvement)
    best_at[active[improved].cpu()] = it
    best[active] = torch.minimum(best[active], rel)
    done = (rel <= loss_floor) | (it - best_at[active.cpu()].to(active.device) >= patience)
    done |= ~torch.isfinite(lam[active]) | (lam[active] > 1e20 * lam[active].clamp_min(1).max())
    return done


@checkpoint.memoize("lm", lambda out: ({"theta": out[0], "rel": out[1]}, {"it": out[2]}),
                    lambda saved, info, theta, *a, **k: (saved["theta"].to(theta.device),
                                                         saved["rel"].to(theta.device), info["it"]))
def levenberg_marquardt(theta: torch.Tensor, layout: Layout, activation: Activation,
                        X: torch.Tensor, y: torch.Tensor, *, max_iter: int = 500,
                        loss_floor: float = LOSS_FLOOR, patience: int = 40,
                        min_improvement: float = 1e-3, progress: bool = False,
                        desc: str = "levenberg-marquardt", fixed_layers: int = 0):
    """Batched Levenberg-Marquardt; returns (theta, relative losses ``(N,)``, iterations used).
    Pruned neurons and the first ``fixed_layers`` hidden layers stay as they are.

    Per student: damping ``lam`` updated by Nielsen's rule; the student leaves the batch when
    its relative loss is below ``loss_floor``, when its loss improved by less than a factor
    ``1 - min_improvement`` over the last ``patience`` iterations, or when its damping blows up.
    """
    theta = theta.detach().clone()
    n_students, n_params = theta.shape
    scale = _target_scale(y) * X.shape[0] * layout.d_out  # sse of a relative loss of 1
    eye = torch.eye(n_params, dtype=theta.dtype, device=theta.device)
    state, done_iter, saved = lm_loop_state(theta, layout, fixed_layers)
    theta, lam, nu, best, best_at, sse, active, frozen = (state[k] for k in LM_STATE)
    bar = tqdm(total=max_iter, initial=done_iter, desc=desc, disable=not progress, leave=False)
    it = done_iter
    for it in range(done_iter + 1, max_iter + 1):
        gram, grad, sse_now = _gauss_newton(theta[active], layout, activation, X, y)
        fz = frozen[active]
        free = (~fz).to(theta.dtype)
        if fz.any():  # pruned neurons: no step, and an identity block in the system
            gram = gram * free[:, :, None] * free[:, None, :] + torch.diag_embed(fz.to(theta.dtype))
            grad = grad * free
        sse[active] = sse_now
        new = torch.isnan(lam[active])
        if new.any():  # the mean curvature of the free parameters: the same once packed
            diag = (gram.diagonal(dim1=1, dim2=2) * free).sum(1) / free.sum(1).clamp_min(1)
            lam[active[new]] = 1e-3 * diag[new].clamp_min(1e-300)
        lam_a = lam[active]
        chol, info = torch.linalg.cholesky_ex(gram + lam_a[:, None, None] * eye)
        ok = info == 0
        step = torch.zeros_like(grad)
        if ok.any():
            step[ok] = -torch.cholesky_solve(grad[ok].unsqueeze(-1), chol[ok]).squeeze(-1)
        trial = theta[active] + step
        sse_trial = student_losses(trial, layout, activation, X, y) * X.shape[0] * layout.d_out
        accept_or_damp(theta, sse, lam, nu, active, trial, step, grad, ok, sse_now, sse_trial)
        done = finished(sse, lam, best, best_at, active, it, scale, loss_floor, patience,
                        min_improvement)
        active = active[~done]
        bar.update(1)
        bar.set_postfix(active=len(active), best=f"{float(best.min()):.1e}")
        if len(active) == 0:
            break
        if saved.due():  # every variable the loop carries over must be in this state
            saved.save(dict(theta=theta, lam=lam, nu=nu, best=best, best_at=best_at, sse=sse,
                            active=active, frozen=frozen), {"it": it})
    bar.close()
    rel = student_losses(theta, layout, activation, X, y) / _target_scale(y)
    return theta, rel, it


def choose_finisher(layout: Layout, n_students: int, n: int, subset_rows: int, device=None,
                    finisher: str = "auto") -> str:
    """``"dense"`` or ``"matfree"``: the Levenberg-Marquardt variant :func:`train_students` uses.

    ``"auto"`` picks the matrix-free one when a student has more than ``DENSE_MAX_PARAMS``
    parameters, when building one student's dense ``P x P`` system on the ``n`` queries costs
    more than ``DENSE_MAX_GRAM_FLOPS``, or when the dense systems would not fit in the available
    memory.
    """
    if finisher not in FINISHERS:
        raise ValueError(f"unknown finisher {finisher!r}; choose one of: {', '.join(FINISHERS)}")
    if finisher != "auto":
        return finisher
    if layout.size > DENSE_MAX_PARAMS or gram_multiply_adds(layout, n) > DENSE_MAX_GRAM_FLOPS:
        return "matfree"
    need = sum(training_memory(layout, n_students, n, subset_rows, finisher="dense").values())
    free = available_memory(device)
    return "matfree" if free is not None and need > free else "dense"


@checkpoint.memoize(
    "train_students",
    lambda out: ({"theta": out[0].theta, "rel": out[1].relative_losses},
                 {"iterations": out[1].iterations, "seconds": out[1].seconds,
                  "finisher": out[1].finisher}),
    lambda saved, info, students, *a, **k: (
        StudentBatch(saved["theta"].to(students.device), students.layout, students.activation),
        TrainingReport(saved["rel"].numpy(), info["iterations"], info["seconds"],
                       info.get("finisher", "dense"))))
def train_students(students: StudentBatch, X: torch.Tensor, y: torch.Tensor, *,
                   adam_steps: int = 300, adam_lr: float = 3e-3, adam_batch: int | None = None,
                   adam_lr_end: float | None = None,
                   subset_rows: int | None = None,
                   max_iter: int = 400, polish_iter: int = 100, compaction_rounds: int = 3,
                   compaction_tolerances=COMPACTION_TOLERANCES, seed: int = 0,
                   finisher: str = "auto", fixed_layers: int = 0, cg_dtype: str | None = None,
                   progress: bool = False) -> tuple[StudentBatch, TrainingReport]:
    """Train every student of the batch on (X, y): Adam and LM on a subset, then LM on all rows.

    ``subset_rows`` defaults to ``max(1000, 10 P)`` rows (all of them when there are fewer).
    ``adam_batch``: rows per Adam step (``None``: all the subset's rows; see :func:`adam_phase`).
    ``adam_lr_end``: the learning rate decays geometrically from ``adam_lr`` to it over the Adam
    steps (``None``: constant).
    ``finisher``: the Levenberg-Marquardt variant, ``"dense"`` (:func:`levenberg_marquardt`),
    ``"matfree"`` (:func:`eandc.matfree.matfree_levenberg_marquardt`) or ``"auto"`` (see
    :func:`choose_finisher`). ``fixed_layers``: how many hidden layers, from the input, stay as
    they are (layers already clustered and shared by every student). ``compaction_tolerances``:
    the silent and duplicate tolerances of the successive compaction rounds (at most
    ``compaction_rounds`` of them; see :func:`compact_students`). ``cg_dtype``: the precision
    of the matrix-free finisher's Gauss-Newton products (``"float32"`` halves their cost on a
    CPU; see :func:`eandc.matfree.matfree_levenberg_marquardt`); the dense finisher has none
    and refuses it. Returns the trained batch
    and a :class:`TrainingReport` with relative losses on all of X.
    """
    layout, activation = students.layout, students.activation
    n = X.shape[0]
    compaction_tolerances = tuple(float(t) for t in compaction_tolerances)
    _check_batch_size(adam_batch)  # before any work, even when there are no Adam steps
    if not all(0 < t < 1 for t in compaction_tolerances):
        raise ValueError(f"compaction tolerances lie in (0, 1), got {compaction_tolerances}")
    if subset_rows is None:
        subset_rows = max(1000, 10 * layout.size)
    finisher = choose_finisher(layout, students.n_students, n, min(n, subset_rows), X.device,
                               finisher)
    check_training_memory(layout, students.n_students, n, min(n, subset_rows), X.device,
                          finisher=finisher)
    if finisher == "matfree":
        from .matfree import matfree_levenberg_marquardt
        finish = partial(matfree_levenberg_marquardt, cg_dtype=cg_dtype)
        name = "matrix-free levenberg-marquardt"
    elif cg_dtype is not None:
        raise ValueError(f"cg_dtype applies to the matrix-free finisher only (this batch takes "
                         f"the {finisher} one)")
    else:
        finish, name = levenberg_marquardt, "levenberg-marquardt"

    def second_order(theta, X, y, **options):
        """The finisher, on the packed students where compaction pruned enough neurons."""
        packed = packed_students(theta, layout)
        if packed is None:
            return finish(theta, layout, activation, X, y, fixed_layers=fixed_layers, **options)
        packed_theta, packed_layout, index = packed
        packed_theta, rel, it = finish(packed_theta, packed_layout, activation, X, y,
                                       fixed_layers=fixed_layers, **options)
        return unpacked_students(packed_theta, packed_layout, index, layout), rel, it

    seconds, iterations = {}, {}
    theta = students.theta
    if subset_rows < n:
        gen = torch.Generator().manual_seed(int(seed) + 7919)
        rows = torch.randperm(n, generator=gen)[:subset_rows].to(X.device)
        Xs, ys = X[rows], y[rows]
    else:
        Xs, ys = X, y
    t0 = time.perf_counter()
    if adam_steps:
        theta = adam_phase(theta, layout, activation, Xs, ys, adam_steps, adam_lr, progress,
                           batch_size=adam_batch, seed=seed,
                           fixed_layers=fixed_layers, lr_end=adam_lr_end)
    seconds["adam"] = time.perf_counter() - t0
    iterations["adam"] = adam_steps

    t0 = time.perf_counter()
    theta, rel, iterations["lm_subset"] = second_order(
        theta, Xs, ys, max_iter=max_iter, progress=progress,
        desc=f"{name} (subset)" if Xs is not X else name)
    for tol in compaction_tolerances[:compaction_rounds]:
        candidates = torch.nonzero((rel > LOSS_FLOOR) & (rel < COMPACTION_MAX_LOSS)).flatten()
        if len(candidates) == 0:
            break
        compact, removed = compact_students(theta[candidates], layout, activation, Xs, ys,
                                            silent_tol=tol, duplicate_tol=tol,
                                            fixed_layers=fixed_layers)
        if removed == 0:
            continue
        compact, rel_compact, it = second_order(
            compact, Xs, ys, max_iter=max_iter, progress=progress, desc=f"{name} (compacted)")
        iterations["lm_subset"] += it
        better = rel_compact <= torch.clamp(10 * rel[candidates], min=1e-20)
        theta[candidates[better]] = compact[better]
        rel[candidates[better]] = rel_compact[better]
        log.info("compaction: %d neurons pruned, %d of %d students kept the result", removed,
                 int(better.sum()), len(candidates))
    seconds["lm_subset"] = time.perf_counter() - t0
    if Xs is not X:
        t0 = time.perf_counter()
        theta, rel, iterations["lm_all"] = second_order(
            theta, X, y, max_iter=polish_iter, patience=10, progress=progress,
            desc=f"{name} (all rows)")
        seconds["lm_all"] = time.perf_counter() - t0
    log.info("trained %d students (%s finisher): relative losses %s", len(rel), finisher,
             format_losses(rel.cpu().numpy()))
    report = TrainingReport(rel.cpu().numpy(), iterations, seconds, finisher)
    return StudentBatch(theta, layout, activation), report
