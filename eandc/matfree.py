"""Matrix-free Levenberg-Marquardt, for students too big for dense ``P x P`` systems.

The dense finisher (:func:`eandc.training.levenberg_marquardt`) builds the Gauss-Newton matrix
``J^T J`` of every student: ``N P^2`` numbers, 200 GB for ten MNIST students of 784-64-10
(P ~ 51,000). This module solves the same damped systems

    (J^T J + lam I) s = -J^T r

approximately by conjugate gradients (truncated Newton, "Hessian-free"), using only products
with the Jacobian, never the matrix:

* ``J v``: the directional derivative of the outputs, propagated forward through the layers;
* ``J^T u``: backpropagation of ``u`` through the layers;
* ``(J^T J) v`` chains the two, chunk of samples by chunk of samples, so memory stays
  ``O(N * chunk * width)`` beyond the layer activations, which are kept between products when
  they fit in ``ACTIVATION_CACHE_BYTES`` (and recomputed per chunk otherwise).

All students are processed at once (leading students axis), each with its own damping
(Nielsen's rule, as the dense finisher), its own conjugate-gradient stopping (relative residual
below a forcing term that shrinks with the loss, an iteration cap, and a truncation on
numerically lost curvature) and its own outer stopping (loss floor, stalled progress, damping
blow-up); a student that stops leaves the batch and costs nothing more. The conjugate gradients
are preconditioned by the diagonal of ``J^T J + lam I`` (Jacobi) or, for many inputs, by blocks
that keep the correlations between inputs in the first layer (:class:`InputBlocks`: on MNIST
queries, far fewer conjugate-gradient iterations per step than Jacobi) and, for one hidden
layer, also those between neurons (:class:`LayerBlocks`). The products can be
taken in float32 (``cg_dtype``) while everything else stays float64. Parameters of pruned
neurons stay frozen, as in the dense finisher.

:func:`matfree_levenberg_marquardt` has the dense finisher's return convention and checkpoint
behaviour (a killed run resumes bitwise from its loop state).
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .activations import Activation
from .mlp import Layout
from .training import (
    LM_STATE,
    LOSS_FLOOR,
    _target_scale,
    accept_or_damp,
    finished,
    lm_loop_state,
    student_losses,
)

__all__ = ["Linearization", "jvp", "vjp", "gauss_newton_product", "conjugate_gradient",
           "matfree_levenberg_marquardt", "activation_cache_bytes", "chunk_rows"]

log = logging.getLogger(__name__)

# Elements of one chunk's per-layer tensors (students x samples x units) computed at once.
CHUNK_ELEMENTS = 4_000_000
# The layer activations and slopes of all samples are kept between products up to this size;
# above it they are recomputed chunk by chunk for every product (one more matrix product each).
ACTIVATION_CACHE_BYTES = 2**30
# Conjugate-gradient iterations per Levenberg-Marquardt step, at most.
CG_MAX_ITER = 250
# The largest relative residual at which conjugate gradients stop (far from a solution).
CG_TOL = 0.1
# Near a solution the relative residual must shrink for fast convergence: conjugate gradients
# stop at min(CG_TOL, relative loss ** FORCING_POWER).
FORCING_POWER = 0.25

_BYTES = 8  # float64
# Conjugate-gradient preconditioners of the finisher (see matfree_levenberg_marquardt).
PRECONDITIONERS = ("auto", "layers", "blocks", "jacobi", None)
# "auto" takes blocks from this many inputs on (MNIST: 784), where the correlations between
# inputs slow the Jacobi-preconditioned gradients down: whole layers' blocks for students with one
# hidden layer, the first layer's units' blocks for deeper ones; below it, Jacobi. On MNIST (g
# teacher 784-16-10, 2 students 784-64-10, 6,000 queries, float32 products), 100 iterations:
# layers 231 s to relative losses 1.3e-7 / 5.8e-8, blocks 294 s to 1.4e-6 / 3.0e-6. On a toy
# problem (2 inputs, 4 students 2-8-1 near a 2-4-1 teacher) layers left 2 students at 1e-7 after
# 200 iterations where Jacobi takes all 4 to 1e-29 in 36.
BLOCKS_MIN_INPUTS = 64


def chunk_rows(n_students: int, layout: Layout) -> int:
    """Samples per chunk so that one chunk's per-layer tensors hold about ``CHUNK_ELEMENTS``."""
    units = max(layout.sizes) + sum(layout.widths) + layout.d_out
    return max(64, CHUNK_ELEMENTS // max(1, n_students * units))


def activation_cache_bytes(layout: Layout, n_students: int, n: int) -> int:
    """Bytes of every hidden layer's activations and slopes on ``n`` samples (the cache)."""
    return 2 * n_students * n * sum(layout.widths) * _BYTES


# ---------------------------------------------------------------------------------------------
# Products with the Jacobian, one chunk of samples at a time.

def _forward_chunk(weights, biases, activation: Activation, Xc: torch.Tensor):
    """Post-activations and slopes of every hidden layer, each ``(N, rows, width)``."""
    posts, slopes = [], []
    a = Xc
    for w, b in zip(weights[:-1], biases[:-1]):
        value, slope = activation.value_and_derivative(a @ w.transpose(1, 2) + b[:, None, :])
        posts.append(value)
        slopes.append(slope)
        a = value
    return posts, slopes


def _output_chunk(weights, biases, skip, posts, Xc):
    a = posts[-1] if posts else Xc
    out = a @ weights[-1].transpose(1, 2) + biases[-1][:, None, :]
    if skip is not None:
        out = out + Xc @ skip.transpose(1, 2)
    return out


def _jvp_chunk(weights, direction, posts, slopes, Xc):
    """``J v`` on one chunk, ``(N, rows, d_out)``: forward-mode derivative along ``direction``,
    given as (weights, biases, skip) views of ``v``."""
    d_weights, d_biases, d_skip = direction
    dz = Xc @ d_weights[0].transpose(1, 2) + d_biases[0][:, None, :]
    for l in range(1, len(weights)):
        dz = ((slopes[l - 1] * dz) @ weights[l].transpose(1, 2)
              + posts[l - 1] @ d_weights[l].transpose(1, 2) + d_biases[l][:, None, :])
    if d_skip is not None:
        dz = dz + Xc @ d_skip.transpose(1, 2)
    return dz


def _vjp_chunk(layout: Layout, weights, posts, slopes, Xc, u):
    """``J^T u`` on one chunk, ``(N, P)``: ``u`` ``(N, rows, d_out)`` backpropagated."""
    n_layers = len(weights)
    g_weights, g_biases = [None] * n_layers, [None] * n_layers
    delta = u
    for l in range(n_layers - 1, -1, -1):
        a_prev = posts[l - 1] if l else Xc
        g_weights[l] = delta.transpose(1, 2) @ a_prev
        g_biases[l] = delta.sum(1)
        if l:
            delta = (delta @ weights[l]) * slopes[l - 1]
    g_skip = u.transpose(1, 2) @ Xc if layout.skip else None
    return layout.flatten(g_weights, g_biases, g_skip)


def _diagonal_chunk(layout: Layout, weights, posts, slopes, Xc):
    """The diagonal of ``J^T J`` on one chunk, ``(N, P)``: the squared Jacobian entries summed
    over samples and outputs. ``power[n, j]`` is the squared norm over outputs of the
    derivatives of the outputs with respect to unit j's pre-activation on sample n."""
    n_students, rows = weights[0].shape[0], Xc.shape[0]
    n_layers = len(weights)
    power = torch.ones(n_students, rows, layout.d_out, dtype=Xc.dtype, device=Xc.device)
    delta = None  # (N, rows, d_out, width): d out_k / d preact_j, needed below two layers only
    d_weights, d_biases = [None] * n_layers, [None] * n_layers
    for l in range(n_layers - 1, -1, -1):
        a_prev = posts[l - 1] if l else Xc
        d_weights[l] = power.transpose(1, 2) @ a_prev.square()
        d_biases[l] = power.sum(1)
        if l == n_layers - 1 and l:
            if l > 1:
                delta = weights[l][:, None] * slopes[l - 1][:, :, None, :]
            power = slopes[l - 1].square() * weights[l].square().sum(1)[:, None, :]
        elif l:
            delta = (delta.flatten(1, 2) @ weights[l]).view(n_students, rows, layout.d_out, -1)
            delta = delta * slopes[l - 1][:, :, None, :]
            power = delta.square().sum(2)
    d_skip = None
    if layout.skip:
        d_skip = Xc.square().sum(0).expand(n_students, layout.d_out, layout.d_in)
    return layout.flatten(d_weights, d_biases, d_skip)


class Linearization:
    """The students at ``theta`` ``(N, P)`` on the queries ``X``: products with their Jacobian.

    Every product takes an optional index ``rows`` of students (a subset of the N, in the order
    given); the vectors then have one row per index.
    """

    def __init__(self, theta: torch.Tensor, layout: Layout, activation: Activation,
                 X: torch.Tensor, cache_bytes: int = ACTIVATION_CACHE_BYTES):
        self.theta, self.layout, self.activation, self.X = theta, layout, activation, X
        n_students, n = theta.shape[0], X.shape[0]
        step = chunk_rows(n_students, layout)
        self.bounds = [(start, min(start + step, n)) for start in range(0, n, step)]
        self.cached = activation_cache_bytes(layout, n_students, n) <= cache_bytes
        self._cache: list | None = None
        if self.cached:
            weights, biases, _ = layout.unflatten(theta)
            self._cache = [_forward_chunk(weights, biases, activation, X[a:b])
                           for a, b in self.bounds]

    def _chunks(self, rows: torch.Tensor | None):
        """(chunk of X, weights, biases, skip, posts, slopes) for the chosen students."""
        theta = self.theta if rows is None else self.theta[rows]
        weights, biases, skip = self.layout.unflatten(theta)
        for c, (a, b) in enumerate(self.bounds):
            Xc = self.X[a:b]
            if self._cache is None:
                posts, slopes = _forward_chunk(weights, biases, self.activation, Xc)
            elif rows is None:
                posts, slopes = self._cache[c]
            else:
                posts, slopes = ([t[rows] for t in part] for part in self._cache[c])
            yield Xc, weights, biases, skip, posts, slopes

    def outputs(self, rows=None) -> torch.Tensor:
        """The students' outputs ``(N, n, d_out)``."""
        return torch.cat([_output_chunk(w, b, s, posts, Xc)
                          for Xc, w, b, s, posts, _ in self._chunks(rows)], dim=1)

    def jvp(self, v: torch.Tensor, rows=None) -> torch.Tensor:
        """``J v`` ``(N, n, d_out)`` for directions ``v`` ``(N, P)``."""
        direction = self.layout.unflatten(v)
        return torch.cat([_jvp_chunk(w, direction, posts, slopes, Xc)
                          for Xc, w, _, _, posts, slopes in self._chunks(rows)], dim=1)

    def vjp(self, u: torch.Tensor, rows=None) -> torch.Tensor:
        """``J^T u`` ``(N, P)`` for output vectors ``u`` ``(N, n, d_out)``."""
        total = None
        for (Xc, w, _, _, posts, slopes), (a, b) in zip(self._chunks(rows), self.bounds):
            part = _vjp_chunk(self.layout, w, posts, slopes, Xc, u[:, a:b])
            total = part if total is None else total.add_(part)
        return total

    def gauss_newton(self, v: torch.Tensor, rows=None) -> torch.Tensor:
        """``J^T J v`` ``(N, P)``, one chunk of samples at a time."""
        direction = self.layout.unflatten(v)
        total = None
        for Xc, w, _, _, posts, slopes in self._chunks(rows):
            part = _vjp_chunk(self.layout, w, posts, slopes, Xc,
                              _jvp_chunk(w, direction, posts, slopes, Xc))
            total = part if total is None else total.add_(part)
        return total

    def gradient(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``J^T r``, sum of squared residuals) per student, ``r`` the residuals on ``y``."""
        grad = None
        sse = torch.zeros(self.theta.shape[0], dtype=self.theta.dtype, device=self.theta.device)
        for (Xc, w, b, s, posts, slopes), (start, stop) in zip(self._chunks(None), self.bounds):
            r = _output_chunk(w, b, s, posts, Xc) - y[start:stop]
            sse += r.square().sum((1, 2))
            part = _vjp_chunk(self.layout, w, posts, slopes, Xc, r)
            grad = part if grad is None else grad.add_(part)
        return grad, sse

    def layer_grams(self, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For one hidden layer: the Gram matrices of its slopes, ``s^T s`` ``(N, h, h)``, and of
        its activities with a column of ones, ``H~^T H~`` ``(N, h + 1, h + 1)``, with the units
        where ``alive`` ``(N, h)`` is 0 (pruned neurons) zeroed (:class:`LayerBlocks`)."""
        slope_gram = hidden_gram = None
        for _, _, _, _, posts, slopes in self._chunks(None):
            s = slopes[0].to(alive.dtype) * alive[:, None, :]
            ones = torch.ones(*s.shape[:2], 1, dtype=s.dtype, device=s.device)
            hidden = torch.cat([posts[0].to(alive.dtype) * alive[:, None, :], ones], 2)
            part_s, part_h = s.transpose(1, 2) @ s, hidden.transpose(1, 2) @ hidden
            slope_gram = part_s if slope_gram is None else slope_gram.add_(part_s)
            hidden_gram = part_h if hidden_gram is None else hidden_gram.add_(part_h)
        return slope_gram, hidden_gram

    def gauss_newton_diagonal(self) -> torch.Tensor:
        """The diagonal of ``J^T J`` ``(N, P)`` (squared Jacobian column norms)."""
        n_students = self.theta.shape[0]
        sub = max(1, CHUNK_ELEMENTS // max(1, n_students * self.layout.d_out
                                            * max(self.layout.sizes[1:])))
        total = None
        for Xc, w, _, _, posts, slopes in self._chunks(None):
            for a in range(0, Xc.shape[0], sub):
                part = _diagonal_chunk(self.layout, w, [t[:, a:a + sub] for t in posts],
                                       [t[:, a:a + sub] for t in slopes], Xc[a:a + sub])
                total = part if total is None else total.add_(part)
        return total


def jvp(theta, layout: Layout, activation: Activation, X, v) -> torch.Tensor:
    """``J v`` ``(N, n, d_out)``: the students' output derivatives along ``v`` ``(N, P)``."""
    return Linearization(theta, layout, activation, X).jvp(v)


def vjp(theta, layout: Layout, activation: Activation, X, u) -> torch.Tensor:
    """``J^T u`` ``(N, P)`` for output vectors ``u`` ``(N, n, d_out)``."""
    return Linearization(theta, layout, activation, X).vjp(u)


def gauss_newton_product(theta, layout: Layout, activation: Activation, X, v) -> torch.Tensor:
    """``J^T J v`` ``(N, P)``."""
    return Linearization(theta, layout, activation, X).gauss_newton(v)


# ---------------------------------------------------------------------------------------------
# Conjugate gradients, one system per student.

def jacobi(diagonal: torch.Tensor):
    """The Jacobi preconditioner of :func:`conjugate_gradient`: ``r / (diag(G) + shift)``."""
    def apply(r, shift, rows):
        d = diagonal if rows is None else diagonal[rows]
        return r / (d + shift[:, None])
    return apply


class InputBlocks:
    """A block preconditioner for the first layer, Jacobi for every other parameter.

    The Gauss-Newton block of one first-layer unit j, its incoming weights and bias
    ``[w_j; b_j]``, is ``sum_n c_nj x~_n x~_n^T`` with ``x~ = [x; 1]`` and ``c_nj`` the squared
    norm over outputs of the derivatives with respect to its pre-activation on sample n. Its
    Kronecker (K-FAC) approximation ``c_j X~^T X~ / n``, with ``c_j = sum_n c_nj`` (the bias
    entry of the diagonal), keeps the correlations between inputs that the Jacobi
    preconditioner drops; they dominate the conditioning when the inputs are strongly
    correlated and far from centred (MNIST pixels). ``X~^T X~ = V S V^T`` is diagonalised once
    per query set, so the damped block solves ``(c_j S / n + shift)^-1`` cost two products with
    V per unit; a linear term's rows (``skip``) get the exact block ``X^T X + shift``.
    """

    def __init__(self, X: torch.Tensor, layout: Layout):
        self.layout, self.n = layout, X.shape[0]
        ones = torch.ones(X.shape[0], 1, dtype=X.dtype, device=X.device)
        X1 = torch.cat([X, ones], 1)
        self.scales, self.basis = torch.linalg.eigh(X1.T @ X1)
        self.scales.clamp_(min=0)
        if layout.skip:
            self.skip_scales, self.skip_basis = torch.linalg.eigh(X.T @ X)
            self.skip_scales.clamp_(min=0)

    def __call__(self, diagonal: torch.Tensor):
        """The preconditioner of :func:`conjugate_gradient` for ``G`` of diagonal ``diagonal``."""
        layout = self.layout
        w_slice, b_slice = layout.layer_slices()[0]
        d, h = layout.d_in, layout.widths[0]
        weight = diagonal[:, b_slice] / self.n  # c_j, (N, h)
        jacobi_of = jacobi(diagonal)

        def block_solve(r, scales, basis, shift, c=None):
            # (c S + shift)^-1 in the eigenbasis, one block per row of r's middle axis
            coef = r @ basis
            denominator = scales + shift[:, None, None] if c is None else \
                c[:, :, None] * scales + shift[:, None, None]
            return (coef / denominator) @ basis.T

        def apply(r, shift, rows):
            z = jacobi_of(r, shift, rows)
            c = weight if rows is None else weight[rows]
            first = torch.cat([r[:, w_slice].reshape(-1, h, d), r[:, b_slice, None]], 2)
            first = block_solve(first, self.scales, self.basis, shift, c)
            z[:, w_slice] = first[:, :, :d].reshape(len(r), -1)
            z[:, b_slice] = first[:, :, d]
            if layout.skip:
                sk = layout.skip_slice
                z[:, sk] = block_solve(r[:, sk].reshape(len(r), layout.d_out, d),
                                       self.skip_scales, self.skip_basis, shift).reshape(len(r), -1)
            return z
        return apply


class LayerBlocks(InputBlocks):
    """Kronecker blocks of whole layers (K-FAC) for students with one hidden layer.

    :class:`InputBlocks` treats each first-layer unit alone and the output layer by its diagonal.
    Wide students near a solution hold groups of near-duplicate neurons and neurons that barely
    act; their Gauss-Newton blocks are strongly coupled, and those couplings are what is left of
    the ill-conditioning. Here both layers keep them:

    * the first layer's block, ``sum_n sum_o W_oj W_ok s_nj s_nk x~_n x~_n^T`` over units j, k
      (``s`` the activation's slopes, ``W`` the output weights), is approximated by the
      Kronecker product ``S (x) X~^T X~`` with ``S = (W^T W) * (s^T s) / n`` (elementwise
      product; its diagonal is :class:`InputBlocks`'s ``c_j``);
    * the output layer's block is exactly ``I (x) H~^T H~``, ``H~ = [h, 1]`` the hidden
      activities (pruned neurons', whose weights are all exact zeros, taken as zero);
    * a linear term's rows get their exact block, as in :class:`InputBlocks`.

    ``(S (x) A + shift)^-1`` costs two eigendecompositions (A once per query set, ``S`` and
    ``H~^T H~`` once per iteration, ``h x h`` per student) and four small products per solve.
    """

    def __init__(self, X: torch.Tensor, layout: Layout):
        if layout.n_layers != 2:
            raise ValueError("LayerBlocks is for students with one hidden layer; deeper students "
                             "take InputBlocks")
        super().__init__(X, layout)

    def __call__(self, lin: Linearization):
        """The preconditioner of :func:`conjugate_gradient` for the students of ``lin``."""
        layout = self.layout
        (w1, b1), (w2, b2) = layout.layer_slices()
        d, h, o = layout.d_in, layout.widths[0], layout.d_out
        weights, biases, _ = layout.unflatten(lin.theta.to(self.basis.dtype))
        out_weights = weights[1]  # (N, o, h)
        pruned = (weights[0] == 0).all(2) & (biases[0] == 0) & (out_weights == 0).all(1)
        slope_gram, hidden_gram = lin.layer_grams((~pruned).to(out_weights.dtype))
        S = (out_weights.transpose(1, 2) @ out_weights) * slope_gram / self.n
        s_scales, s_basis = torch.linalg.eigh(S)
        h_scales, h_basis = torch.linalg.eigh(hidden_gram)
        s_scales, h_scales = s_scales.clamp(min=0), h_scales.clamp(min=0)

        def apply(r, shift, rows):
            pick = (lambda t: t) if rows is None else (lambda t: t[rows])
            z = torch.empty_like(r)
            us, ss, uh, sh = pick(s_basis), pick(s_scales), pick(h_basis), pick(h_scales)
            first = torch.cat([r[:, w1].reshape(-1, h, d), r[:, b1, None]], 2)
            coef = us.transpose(1, 2) @ first @ self.basis
            coef = coef / (ss[:, :, None] * self.scales + shift[:, None, None])
            first = us @ coef @ self.basis.T
            z[:, w1] = first[:, :, :d].reshape(len(r), -1)
            z[:, b1] = first[:, :, d]
            second = torch.cat([r[:, w2].reshape(-1, o, h), r[:, b2, None]], 2)
            coef = (second @ uh) / (sh[:, None, :] + shift[:, None, None])
            second = coef @ uh.transpose(1, 2)
            z[:, w2] = second[:, :, :h].reshape(len(r), -1)
            z[:, b2] = second[:, :, h]
            if layout.skip:
                sk = layout.skip_slice
                coef = r[:, sk].reshape(len(r), o, d) @ self.skip_basis
                z[:, sk] = ((coef / (self.skip_scales + shift[:, None, None]))
                            @ self.skip_basis.T).reshape(len(r), -1)
            return z
        return apply


def conjugate_gradient(product, b: torch.Tensor, shift: torch.Tensor, rtol: torch.Tensor,
                       max_iter: int, preconditioner=None):
    """Solve ``(G + shift I) x = b`` per row by (preconditioned) conjugate gradients.

    ``product(v, rows)`` returns ``G v`` for the rows ``rows`` of the batch (``None``: all), G
    symmetric positive semi-definite; ``shift`` ``(N,)`` is positive. Row i stops when its
    residual is below ``rtol[i] * |b_i|``, after ``max_iter`` iterations, or when the curvature
    along its search direction falls below ``shift / 2`` (impossible in exact arithmetic: the
    precision is lost, and the iterate so far is kept). ``preconditioner(r, shift, rows)``, when
    given, applies a symmetric positive definite approximation of ``(G + shift I)^-1`` to the
    residuals ``r`` of the rows ``rows`` (:func:`jacobi`, :class:`InputBlocks`). Returns (x,
    iterations per row).
    """
    n = b.shape[0]
    x = torch.zeros_like(b)
    r = b.clone()
    z = r if preconditioner is None else preconditioner(r, shift, None)
    p = z.clone()
    rz = (r * z).sum(1)
    target = rtol * b.norm(dim=1)
    running = r.norm(dim=1) > target
    iterations = torch.zeros(n, dtype=torch.long, device=b.device)
    for _ in range(max_iter):
        rows = running.nonzero().flatten()
        if len(rows) == 0:
            break
        sel = None if len(rows) == n else rows
        p_r = p[rows]
        Ap = product(p_r, sel) + shift[rows, None] * p_r
        curvature = (p_r * Ap).sum(1)
        lost = ~(curvature > 0.5 * shift[rows] * p_r.square().sum(1))
        alpha = torch.where(lost, torch.zeros_like(curvature), rz[rows] / curvature)
        x[rows] += alpha[:, None] * p_r
        r_r = r[rows] - alpha[:, None] * Ap
        r[rows] = r_r
        z_r = r_r if preconditioner is None else preconditioner(r_r, shift[rows], sel)
        rz_new = (r_r * z_r).sum(1)
        beta = rz_new / rz[rows]
        p[rows] = z_r + beta[:, None] * p_r
        rz[rows] = rz_new
        iterations[rows] += (~lost).long()
        running[rows] = ~lost & (r_r.norm(dim=1) > target[rows])
    return x, iterations


# ---------------------------------------------------------------------------------------------
# Levenberg-Marquardt.

@checkpoint.memoize("matfree_lm", lambda out: ({"theta": out[0], "rel": out[1]}, {"it": out[2]}),
                    lambda saved, info, theta, *a, **k: (saved["theta"].to(theta.device),
                                                         saved["rel"].to(theta.device), info["it"]))
def matfree_levenberg_marquardt(theta: torch.Tensor, layout: Layout, activation: Activation,
                                X: torch.Tensor, y: torch.Tensor, *, max_iter: int = 500,
                                loss_floor: float = LOSS_FLOOR, patience: int = 40,
                                min_improvement: float = 1e-3, cg_max_iter: int = CG_MAX_ITER,
                                cg_tol: float = CG_TOL, precondition: str | None = "auto",
                                cache_bytes: int = ACTIVATION_CACHE_BYTES, progress: bool = False,
                                desc: str = "matrix-free levenberg-marquardt", callback=None,
                                fixed_layers: int = 0, cg_dtype: str | torch.dtype | None = None):
    """Batched matrix-free Levenberg-Marquardt; returns (theta, relative losses ``(N,)``,
    iterations used), like :func:`eandc.training.levenberg_marquardt`.

    Per student and iteration, conjugate gradients (at most ``cg_max_iter`` products, relative
    residual ``min(cg_tol, rel_loss ** FORCING_POWER)``) solve the damped Gauss-Newton system;
    the damping follows Nielsen's rule. ``precondition``: ``"layers"`` (:class:`LayerBlocks`:
    Kronecker blocks of whole layers, one hidden layer only), ``"blocks"``
    (:class:`InputBlocks`: the first layer's units by blocks, the rest by the diagonal; Jacobi
    when the first layer is fixed), ``"jacobi"`` (the diagonal), ``None`` (none), ``"auto"``
    (from ``BLOCKS_MIN_INPUTS`` inputs on ``"layers"`` for one hidden layer and ``"blocks"``
    for more, else ``"jacobi"``; ``True``/``False`` mean ``"auto"`` and ``None``).
    A student leaves the batch when its relative loss is below ``loss_floor``, when its loss
    improved by less than a factor ``1 - min_improvement`` over the last ``patience``
    iterations, or when its damping blows up. ``callback(info)``, when given, is called after
    every iteration with a dict: ``it``, ``rel`` and ``lam`` (all students' relative losses and
    damping factors), ``active``
    (students left), ``cg_iterations`` (per student of this iteration's batch), ``seconds``.
    """
    precondition = {True: "auto", False: None}.get(precondition, precondition)
    if precondition == "auto":
        precondition = "jacobi" if layout.d_in < BLOCKS_MIN_INPUTS else \
            "layers" if layout.n_layers == 2 else "blocks"
    if precondition not in PRECONDITIONERS:
        raise ValueError(f"precondition must be one of {PRECONDITIONERS}, got {precondition!r}")
    theta = theta.detach().clone()
    n_rows = X.shape[0] * layout.d_out
    scale = _target_scale(y) * n_rows  # sse of a relative loss of 1
    # the first layer's blocks only where it trains (fixed layers are frozen)
    blocks = InputBlocks(X, layout) if precondition == "blocks" and not fixed_layers else None
    layers = LayerBlocks(X, layout) if precondition == "layers" else None  # checks the layout
    if isinstance(cg_dtype, str):
        if cg_dtype not in ("float32", "float64"):
            raise ValueError(f"cg_dtype must be 'float32' or 'float64', got {cg_dtype!r}")
        cg_dtype = getattr(torch, cg_dtype)
    X_cg = X.to(cg_dtype) if cg_dtype is not None and cg_dtype != X.dtype else None
    state, done_iter, saved = lm_loop_state(theta, layout, fixed_layers)
    theta, lam, nu, best, best_at, sse, active, frozen = (state[k] for k in LM_STATE)
    bar = tqdm(total=max_iter, initial=done_iter, desc=desc, disable=not progress, leave=False)
    it = done_iter
    for it in range(done_iter + 1, max_iter + 1):
        start = time.perf_counter()
        if X_cg is None:
            lin = lin_cg = Linearization(theta[active], layout, activation, X, cache_bytes)
        else:  # the products in cg_dtype keep the cache; the gradient recomputes its pass
            lin = Linearization(theta[active], layout, activation, X, 0)
            lin_cg = Linearization(theta[active].to(cg_dtype), layout, activation, X_cg,
                                   cache_bytes)
        free = (~frozen[active]).to(theta.dtype)
        grad, sse_now = lin.gradient(y)
        grad = grad * free
        sse[active] = sse_now
        new = torch.isnan(lam[active])
        diagonal = None
        if (precondition and layers is None) or new.any():
            diagonal = lin.gauss_newton_diagonal() * free
        if new.any():
            mean_diag = diagonal.sum(1) / free.sum(1).clamp_min(1)
            lam[active[new]] = 1e-3 * mean_diag[new].clamp_min(1e-300)
        lam_a = lam[active]
        rtol = (sse_now / scale).clamp_min(0) ** FORCING_POWER
        rtol = rtol.clamp(max=cg_tol)

        def product(v, rows, lin=lin_cg, free=free):
            mask = free if rows is None else free[rows]
            return lin.gauss_newton((v * mask).to(lin.theta.dtype), rows).to(v.dtype) * mask

        preconditioner = None
        if precondition:
            inner = layers(lin) if layers is not None else \
                blocks(diagonal) if blocks is not None else jacobi(diagonal)

            def preconditioner(r, shift, rows, inner=inner, free=free):
                return inner(r, shift, rows) * (free if rows is None else free[rows])
        step, cg_iterations = conjugate_gradient(product, -grad, lam_a, rtol, cg_max_iter,
                                                 preconditioner)
        ok = torch.isfinite(step).all(1)
        step = torch.where(ok[:, None], step, torch.zeros_like(step))
        trial = theta[active] + step
        sse_trial = student_losses(trial, layout, activation, X, y) * n_rows
        accept_or_damp(theta, sse, lam, nu, active, trial, step, grad, ok, sse_now, sse_trial)
        done = finished(sse, lam, best, best_at, active, it, scale, loss_floor, patience,
                        min_improvement)
        log.debug("%s iteration %d: %d students, conjugate-gradient iterations %s, best %.1e, "
                  "%.2f s", desc, it, len(active), cg_iterations.tolist(), float(best.min()),
                  time.perf_counter() - start)
        if callback is not None:
            callback({"it": it, "rel": (sse / scale).cpu(), "lam": lam.cpu(), "active": len(active),
                      "cg_iterations": cg_iterations.cpu(),
                      "seconds": time.perf_counter() - start})
        active = active[~done]
        bar.update(1)
        bar.set_postfix(active=len(active), cg=int(cg_iterations.max()),
                        best=f"{float(best.min()):.1e}")
        if len(active) == 0:
            break
        if saved.due():  # every variable the loop carries over must be in this state
            saved.save(dict(theta=theta, lam=lam, nu=nu, best=best, best_at=best_at, sse=sse,
                            active=active, frozen=frozen), {"it": it})
    bar.close()
    rel = student_losses(theta, layout, activation, X, y) / _target_scale(y)
    return theta, rel, it
