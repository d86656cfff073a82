"""The span of a black box's first-layer weights, from its outputs alone (our addition).

A network sees its input ``x`` only through its first layer's preactivations ``W1 x + b1``, so
the Jacobian of its outputs with respect to ``x``, at any point, has its rows in the row space of
``W1``. Finite differences of the black box (a fourth-order central stencil along every input
coordinate) at a few points give such Jacobians; the singular value decomposition of their rows
stacked together gives an orthonormal basis ``U`` (``d x k``) of that row space. Its dimension
``k`` is the number of first-layer neurons when their weight vectors are linearly independent
(``k <= d``); it rises with the points probed until it reaches that number, and the probing
stops when more points no longer raise it.

Why it helps: the teacher's output at ``x`` equals its output at the projection ``x U U^T``.
Students can then take ``k`` inputs, ``z = x U``, instead of ``d``: a student neuron with
incoming weights ``a`` in those coordinates has weights ``U a`` on the inputs, exactly (and,
``U`` being orthonormal, the angles between incoming vectors are the same in both coordinates,
so the clustering's ``beta`` means what it meant). Two things follow on MNIST:

* every pixel's weight is determined, those of pixels that never vary across the images too:
  the finite differences vary each pixel on its own, where the paper masks such pixels out
  (a Boruta mask) because the images cannot determine their weights;
* the students have ``(d - k)`` fewer inputs per first-layer neuron to bring to exactly zero
  weight (784 -> 30 for the deep teacher).

Whitened coordinates (``whiten``, our addition): the students may take ``z_w = (x U - m) W``
instead, with ``m`` the queries' mean coordinates and ``W`` the whitening of their covariance
(principal axes scaled to unit variance). A network of ``z_w`` is an affine function of ``x``
in its first layer, lifted as easily. On MNIST the image coordinates are far from centred and
their spreads differ by orders of magnitude; whitened, the students' random first-layer neurons
start across their activation's bend and the Levenberg-Marquardt systems are far better
conditioned (MNIST's standard tanh teacher: 18 s instead of 43 s, the students at 1e-31
instead of 1e-12; ReLU 210 s instead of 333 s; g and sigmoid about the same).
Angles between incoming vectors, and so the clustering's ``beta``, are then those of the
whitened coordinates; the recovered network is compared with the teacher on the inputs.

The cost is ``4 d`` queries per point probed (the fourth-order stencil), on top of the
training queries. A black box with kinks (ReLU) is probed with a small step, so that the
stencil rarely straddles one; probes that do (the two- and four-point stencils disagree), and
an unclear drop in the singular values (no gap of ``MIN_GAP``), are errors that say so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from .activations import get_activation
from .mlp import MLP
from .reconstruction import finetune
from .recover import expand_and_cluster
from .teachers import check_inputs, query

__all__ = ["InputSubspace", "input_subspace", "expand_and_cluster_in_subspace", "probe_step"]

log = logging.getLogger(__name__)

# A singular value counts when it is above RANK_TOL times the largest; the next one down must be
# at least MIN_GAP times smaller (finite-difference errors sit near 1e-12 of the largest).
RANK_TOL = 1e-7
MIN_GAP = 1e3
# Finite-difference step, relative to the queries' standard deviation: smooth activations, and
# kinked ones (ReLU), whose piecewise-linear networks have no truncation error between kinks.
SMOOTH_STEP = 1e-3
KINKED_STEP = 1e-6
# The largest disagreement allowed between the two- and four-point stencils, relative to the
# largest derivative.
SMOOTHNESS_TOL = 1e-3
# Whitening needs the queries to vary along every direction of the subspace: the smallest
# variance must be above this share of the largest.
MIN_VARIANCE_RATIO = 1e-12


@dataclass(frozen=True)
class InputSubspace:
    """An orthonormal basis (``basis``, ``d x k``) of the span of a black box's first-layer
    weight vectors, the singular values it was cut from, and the queries it took. With
    ``center`` (``(k,)``) and ``whitening`` (``k x k``, :meth:`whitened`) the coordinates are
    ``(x U - center) whitening`` instead of ``x U``."""

    basis: np.ndarray
    singular_values: np.ndarray
    n_points: int
    n_queries: int
    center: np.ndarray | None = None
    whitening: np.ndarray | None = None

    @property
    def dimension(self) -> int:
        return self.basis.shape[1]

    def _tensor(self, array, device) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.float64, device=device)

    def project(self, X) -> torch.Tensor:
        """The coordinates of the inputs ``X`` (``(n, d)``): ``z = x U``, whitened where the
        subspace is."""
        X = check_inputs(X)
        if X.shape[1] != self.basis.shape[0]:
            raise ValueError(f"inputs have {X.shape[1]} features, the subspace lives in "
                             f"{self.basis.shape[0]}")
        Z = X @ self._tensor(self.basis, X.device)
        if self.whitening is None:
            return Z
        return (Z - self._tensor(self.center, X.device)) @ self._tensor(self.whitening, X.device)

    def embed(self, Z) -> torch.Tensor:
        """The inputs in the subspace whose coordinates are ``Z`` (``(n, k)``): ``x = z U^T``
        (``z`` un-whitened first where the subspace is whitened)."""
        Z = check_inputs(Z, name="subspace coordinates")
        if Z.shape[1] != self.dimension:
            raise ValueError(f"coordinates have {Z.shape[1]} columns, the subspace {self.dimension}")
        if self.whitening is not None:
            Z = (Z @ self._tensor(np.linalg.inv(self.whitening), Z.device)
                 + self._tensor(self.center, Z.device))
        return Z @ self._tensor(self.basis.T, Z.device)

    def lift(self, network: MLP) -> MLP:
        """``network`` (taking subspace coordinates) as a network of the original inputs, the
        same function of ``x`` as ``network`` is of :meth:`project` ``(x)``: its first-layer
        weights (and linear term) ``A`` become ``A M^T`` with ``M = U`` (``U whitening`` where
        whitened, the hidden and output biases then taking ``- A whitening^T center``)."""
        if network.d_in != self.dimension:
            raise ValueError(f"the network takes {network.d_in} inputs, the subspace has "
                             f"{self.dimension} dimensions")
        device = network.device
        M = self._tensor(self.basis, device)
        offset = torch.zeros(self.dimension, dtype=torch.float64, device=device)
        if self.whitening is not None:
            W = self._tensor(self.whitening, device)
            M, offset = M @ W, W.T @ self._tensor(self.center, device)
        biases = list(network.biases)
        biases[0] = biases[0] - network.weights[0] @ offset
        skip = None
        if network.skip is not None:
            skip = network.skip @ M.T
            biases[-1] = biases[-1] - network.skip @ offset
        weights = [network.weights[0] @ M.T, *network.weights[1:]]
        return MLP(weights, biases, network.activation.name, skip=skip, device=device)

    def whitened(self, X) -> InputSubspace:
        """The same subspace with whitened coordinates on the inputs ``X``: centred on their
        mean coordinates, rotated to their principal axes and scaled to unit variance along
        each (module doc). The inputs must vary along every direction of the subspace."""
        Z = replace(self, center=None, whitening=None).project(X)
        if Z.shape[0] < 2:
            raise ValueError("whitening needs at least two inputs")
        center = Z.mean(0)
        variances, axes = torch.linalg.eigh(torch.cov((Z - center).T).reshape(self.dimension, -1))
        if not variances[0] > MIN_VARIANCE_RATIO * variances[-1]:
            raise ValueError(
                f"the inputs hardly vary along a direction of the subspace (variances "
                f"{float(variances[0]):.3g} to {float(variances[-1]):.3g}): whitening would "
                "blow it up; use more varied inputs, or no whitening")
        whitening = axes / variances.sqrt()
        return replace(self, center=center.cpu().numpy(), whitening=whitening.cpu().numpy())


def jacobian_rows(teacher, points: torch.Tensor, step: float) -> torch.Tensor:
    """The Jacobians of ``teacher``'s outputs at ``points`` (``(p, d)``), by the fourth-order
    central stencil of step ``step`` along each input coordinate, stacked: ``(p d_out, d)``."""
    d = points.shape[1]
    shifts = torch.eye(d, dtype=torch.float64, device=points.device) * step
    outputs = []
    for x in points:  # one point at a time: 4 d probes of d inputs each
        probes = torch.cat([x + 2 * shifts, x + shifts, x - shifts, x - 2 * shifts])
        outputs.append(torch.as_tensor(query(teacher, probes)).reshape(4, d, -1))
    f2, f1, m1, m2 = torch.stack(outputs).unbind(1)  # each (p, d, d_out)
    derivatives = (8 * (f1 - m1) - (f2 - m2)) / (12 * step)
    # The two-point stencil differs from the four-point one by O(step^2) where the black box is
    # smooth, by O(1) where the probes straddle a kink.
    disagreement = float((derivatives - (f1 - m1) / (2 * step)).abs().max())
    if disagreement > SMOOTHNESS_TOL * float(derivatives.abs().max()):
        raise ValueError(
            f"the two- and four-point finite differences disagree by {disagreement:.3g} (largest "
            f"derivative {float(derivatives.abs().max()):.3g}): the black box is not smooth at "
            f"this step (a kink between the probes?); try a smaller step")
    return derivatives.transpose(1, 2).reshape(-1, d)


def _rank(s: np.ndarray) -> int:
    if s.size == 0 or s[0] == 0:
        return 0
    k = int((s > RANK_TOL * s[0]).sum())
    if k < len(s) and s[k] > 0 and s[k - 1] / s[k] < MIN_GAP:
        raise ValueError(
            f"no clear rank: singular values around the cut {s[max(0, k - 2):k + 2] / s[0]} "
            f"(relative to the largest) drop by less than {MIN_GAP:g}; the black box is not "
            "smooth enough at these points for finite differences (try a smaller step)")
    return k


def input_subspace(teacher, X, *, points_per_round: int | None = None, max_points: int = 512,
                   step: float = SMOOTH_STEP, seed: int = 0) -> InputSubspace:
    """The span of ``teacher``'s first-layer weights (see the module doc), probed at rows of
    ``X`` drawn at random, ``points_per_round`` at a time (default: enough for ``d`` rows of
    Jacobians, at most 16 points), until a round no longer raises the rank. ``step``: the
    finite-difference step relative to the standard deviation of ``X``."""
    X = check_inputs(X)
    n, d = X.shape
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}")
    if max_points < 1:
        raise ValueError(f"max_points must be positive, got {max_points}")
    scale = float(X.std()) or 1.0
    h = step * scale
    d_out = torch.as_tensor(query(teacher, X[:1])).shape[1]
    if points_per_round is None:
        points_per_round = min(16, max(2, -(-d // d_out)))
    order = np.random.default_rng(seed).permutation(n)
    rows, rank, used, s, Vt = [], -1, 0, np.zeros(0), np.zeros((0, d))
    while used < min(n, max_points):
        take = order[used:used + min(points_per_round, max_points - used)]
        rows.append(jacobian_rows(teacher, X[take], h).cpu())
        used += len(take)
        stacked = torch.cat(rows).numpy()
        _, s, Vt = np.linalg.svd(stacked, full_matrices=False)
        new_rank = _rank(s)
        log.debug("input subspace: %d points, rank %d", used, new_rank)
        if new_rank == rank and new_rank < len(stacked):
            break
        rank = new_rank
    else:  # the points ran out before a round left the rank unchanged
        if rank >= len(stacked):
            raise ValueError(f"the rank ({rank}) still equals the number of Jacobian rows after "
                             f"{used} points: allow more points (max_points) or more queries")
        log.warning("input subspace: rank %d after all %d points, not confirmed by a further "
                    "round", rank, used)
    if rank == 0:
        raise ValueError("the teacher's outputs do not change with its inputs at the probed points")
    return InputSubspace(basis=Vt[:rank].T.copy(), singular_values=s, n_points=used,
                         n_queries=4 * d * used + 1)


def probe_step(activation) -> float:
    """The finite-difference step for a black box of this activation: ``KINKED_STEP`` for the
    piecewise-linear ones (ReLU, leaky ReLU: the positive-scaling class), else ``SMOOTH_STEP``."""
    return KINKED_STEP if get_activation(activation).has_scaling_symmetry else SMOOTH_STEP


def expand_and_cluster_in_subspace(teacher, X, activation, n_hidden_layers=1, *,
                                   subspace: InputSubspace | None = None, seed: int = 0,
                                   whiten: bool = False, input_polish_iter: int = 0, **options):
    """:func:`eandc.expand_and_cluster` on the subspace coordinates of the queries.

    ``teacher`` must be callable (it is probed by finite differences, then queried at the
    projections ``x U U^T`` of ``X``, where its outputs are its outputs at ``x``). ``subspace``:
    one computed before (default: :func:`input_subspace` of ``teacher`` on ``X``, with
    :func:`probe_step` of the activation). ``whiten``: the students take the whitened
    coordinates of ``X`` (:meth:`InputSubspace.whitened`; the module doc says why; a
    ``subspace`` given whitened already is kept as it is). ``input_polish_iter``: Levenberg-Marquardt
    iterations of the lifted network on ``X`` itself, in the original inputs
    (:func:`eandc.reconstruction.finetune`; the teacher is queried at ``X`` for them), which
    remove the basis's finite-difference error (about 1e-12 with the smooth step, 1e-10 with the
    kinked one) from the weights along the directions in which ``X`` varies; ``final_loss`` is
    then the polished network's relative loss on ``X`` and ``timings["polish"]`` its seconds.
    ``options``: the other arguments of :func:`~eandc.expand_and_cluster`; a ``feature_mask``
    is refused (every input's weight is determined here). Returns ``(result, subspace)``:
    ``result.network`` is lifted to the original inputs, ``result.students`` stay in subspace
    coordinates.
    """
    if not callable(teacher):
        raise TypeError("the teacher must be callable: its input subspace is found by probing it")
    iterations = input_polish_iter
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"input_polish_iter must be a non-negative integer, got {iterations!r}")
    if not isinstance(whiten, bool):
        raise TypeError(f"whiten must be True or False, got {whiten!r}")
    if options.get("feature_mask") is not None:
        raise ValueError("a feature_mask does not apply in subspace coordinates: every input's "
                         "weight is determined by the finite differences")
    X = check_inputs(X)
    if subspace is None:
        subspace = input_subspace(teacher, X, step=probe_step(activation), seed=seed)
    if whiten and subspace.whitening is None:
        subspace = subspace.whitened(X)
    Z = subspace.project(X)
    log.info("input subspace: %d of %d dimensions (%d probe queries)%s", subspace.dimension,
             X.shape[1], subspace.n_queries, ", whitened" if subspace.whitening is not None else "")

    def in_subspace(Zq):
        return query(teacher, subspace.embed(Zq))

    result = expand_and_cluster(in_subspace, Z, activation, n_hidden_layers, seed=seed, **options)
    result = replace(result, network=subspace.lift(result.network))
    if iterations:
        start = time.perf_counter()
        network, loss = finetune(result.network, X, query(teacher, X), max_iter=iterations,
                                 progress=options.get("progress", False))
        log.info("polished on the inputs: relative loss %.1e after %d iterations", loss,
                 iterations)
        result = replace(result, network=network, final_loss=loss,
                         timings={**result.timings, "polish": time.perf_counter() - start})
    return result, subspace
