"""Clustering one hidden layer's neurons across students, as the paper's Algorithm 1 does.

For layer ``l`` every hidden neuron of every student contributes its incoming vector ``[w; b]``,
except the silent ones (:func:`silent_neurons`: zero outgoing weights, or coinciding neurons
whose outgoing weights cancel), whose incoming vectors the data do not determine. Optionally
(``exclude``, :func:`undetermined_neurons`, our addition) also the neurons that matter less to
their student's outputs on the queries than the student's own error.
The activation's symmetries are folded:

* ReLU-like units (positive scaling): each vector is divided by its norm; the norm is kept so that
  reconstruction can move it into the outgoing weights;
* units with a sign symmetry: the paper canonicalises the sign on the first input coordinate;
  we canonicalise it on a generic direction that no neuron is close to orthogonal to
  (:func:`canonical_signs`), so that a neuron whose first weight is near zero is not split in
  two. Angles are taken up to sign. Each member's sign relative to its cluster's reference is
  recorded for reconstruction.

The paper measures distances between the rows ``[w; b]`` themselves. Optionally
(``input_metric``, :func:`preactivation_metric`) they are measured between the neurons'
preactivations ``a . w + b`` on the queries instead (our addition): the rows are multiplied by a
square root of the second moments of the layer's inputs ``[a; 1]``, so that the distance
between two neurons is the RMS difference of their preactivations and their angle is that of
their preactivations. For a layer whose inputs are correlated (a deep layer reading the
activities of the one below), weights along directions in which the inputs hardly vary are
barely determined by the data and the raw rows scatter along them; the preactivations do not.

Then: average-linkage dendrogram; cut it where the number of clusters holding neurons of at
least ``ceil(gamma N)`` *distinct students* is largest (the end of the first plateau of that
count, as in the authors' code), considering only *stable* counts and ranking them by the
clusters that would also pass the angle test (:func:`choose_cut`); drop
smaller clusters; drop clusters whose median pairwise angle exceeds ``beta``. Each kept cluster
is one neuron of the recovered layer. Its *core*, the members within ``beta`` of its medoid, is
what reconstruction reads: average linkage can attach a stray neuron to a tight cluster without
moving its median angle. Average linkage can also attach so many stray neurons (of students
that converged to another near-solution) that the median angle fails: such a cluster is kept
when its tight group alone (:func:`dense_core`) holds ``ceil(gamma N)`` students and has a
median angle below ``beta / 2`` (our addition), and that group is its core. Half of ``beta``:
a group picked from a diffuse bag of stray neurons has a median angle just below ``beta`` by
chance, while the copies of a neuron agree far more closely.

Counting distinct students rather than members matters: a student that splits one teacher
neuron into duplicates would otherwise inflate a cluster's size. Stability matters too: when
students agree to high precision, the copies of one neuron can fragment, at heights of the
order of their spread, into pieces that each hold ``ceil(gamma N)`` students (with gamma = 0.5:
N/2 and N/2), and the largest count is then a count of fragments. Such counts last only while
the cut height grows by a few tens of percent; the true count lasts from the copies' spread up
to the distance between neurons. So the count is maximised over plateaus that persist while the
height at least doubles. A stable plateau whose count is below the largest count divided by the most
fragments one neuron's copies can form (``N // ceil(gamma N)``) is no answer either: deep
students' rows of huge norm, merging far above the rest, make the plateaus just below the top
last long. The plateau above the last merge persists for ever only when all the
rows pass the angle test together (one neuron); otherwise, for students too imprecise for any
plateau to persist (deep students far from zero loss), it would always win with one cluster,
and the count is maximised over all plateaus, as the paper does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import pdist

from .activations import Activation
from .mlp import StudentBatch

__all__ = ["LayerClustering", "Cluster", "cluster_layer", "neuron_features", "pairwise_distances",
           "preactivation_metric",
           "min_students", "silent_neurons", "ablation_effects", "undetermined_neurons",
           "choose_cut", "dense_core", "all_one_neuron"]

log = logging.getLogger(__name__)

ABLATION_ROWS = 2000  # queries that ablation_effects reads (evenly spaced)
ABLATION_ELEMENTS = 1 << 24  # activities held at once by ablation_effects below the last layer
# undetermined_neurons tests only the students at or below this relative loss (the deep MNIST
# students: 2e-4 to 3e-4 after the expansion, 5e-7 to 1e-6 before the third layer's clustering;
# students of a few dozen steps, at 1e-2 to 1, would lose nearly every neuron).
UNDETERMINED_MAX_LOSS = 1e-3


def min_students(gamma: float, n_students: int) -> int:
    """Fewest distinct students a kept cluster must hold: ``ceil(gamma N)`` (at least 2)."""
    return max(2, math.ceil(gamma * n_students - 1e-9))


@dataclass
class Cluster:
    """One cluster at the cut: its members (rows of the feature table) and why it is kept or not."""

    members: np.ndarray
    n_students: int
    median_angle: float
    kept: bool
    reason: str
    core: np.ndarray  # members within beta of the cluster's medoid: what reconstruction uses


@dataclass
class LayerClustering:
    """Everything the clustering of one layer computed, for reconstruction and for figures.

    Rows of ``features`` are neurons; ``student[i]``/``neuron[i]`` say where row ``i`` comes from.
    ``scale[i]`` is the norm divided out (1 when the activation has no scaling symmetry) and
    ``sign[i]`` the sign that aligns row ``i`` with its cluster's reference.
    """

    layer: int
    features: np.ndarray
    student: np.ndarray
    neuron: np.ndarray
    scale: np.ndarray
    sign: np.ndarray
    distances: np.ndarray  # condensed, as scipy's pdist
    linkage: np.ndarray
    cut_index: int
    cut_height: float
    cluster_counts: np.ndarray  # clusters with >= min_students students after each merge
    labels: np.ndarray
    clusters: list[Cluster]
    min_students: int
    beta: float

    @property
    def kept(self) -> list[Cluster]:
        return [c for c in self.clusters if c.kept]

    @property
    def width(self) -> int:
        return len(self.kept)


def neuron_features(students: StudentBatch, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[w; b]`` of every student's neurons in hidden layer ``layer``, and their scales."""
    w = students.weights[layer].detach().cpu().numpy()
    b = students.biases[layer].detach().cpu().numpy()
    feats = np.concatenate([w, b[..., None]], axis=-1).reshape(-1, w.shape[-1] + 1)
    scale = np.ones(len(feats))
    if students.activation.has_scaling_symmetry:
        scale = np.linalg.norm(feats, axis=1)
        scale = np.where(scale > 0, scale, 1.0)
        feats = feats / scale[:, None]
    return feats, scale


def silent_neurons(students: StudentBatch, layer: int, tol: float = 1e-9) -> np.ndarray:
    """``(N, width)`` mask of neurons that contribute nothing to their student's output.

    A neuron is silent when its outgoing weights vanish (below ``tol`` times the student's
    largest), when it is constant (incoming weights, bias aside, below ``tol`` times the
    student's largest: only ``act(b)`` reaches the output, as an output bias would), or when it
    belongs to a group of coinciding neurons of one student (same incoming vector up to the
    activation's symmetry) whose outgoing weights cancel. The data do not determine such a
    neuron's incoming vector, so it must not vote in the clustering. Neurons pruned during
    training (exact zeros) are silent.
    """
    act = students.activation
    w = students.weights[layer].detach().cpu().numpy()
    b = students.biases[layer].detach().cpu().numpy()
    out = students.weights[layer + 1].detach().cpu().numpy()  # (N, fan_out, width)
    flips = act.symmetry in ("odd", "odd_constant")
    silent = np.zeros(w.shape[:2], dtype=bool)
    for s in range(w.shape[0]):
        v = np.concatenate([w[s], b[s][:, None]], axis=1)
        norms = np.linalg.norm(v, axis=1)
        a = out[s].T  # (width, fan_out)
        size = np.linalg.norm(a, axis=1)
        reference = size.max() if size.max() > 0 else 1.0
        silent[s] = size <= tol * reference
        fan_in = np.linalg.norm(w[s], axis=1)
        silent[s] |= fan_in <= tol * max(fan_in.max(), 1e-300)
        cos = (v @ v.T) / np.maximum(np.outer(norms, norms), 1e-300)
        same = (1 - (np.abs(cos) if act.has_sign_symmetry else cos)) < tol
        np.fill_diagonal(same, False)
        for j in np.flatnonzero(same.any(1) & ~silent[s]):
            group = np.append(j, np.flatnonzero(same[j]))
            factor = np.sign(cos[j, group]) if flips else np.ones(len(group))
            if act.has_scaling_symmetry:
                factor = factor * norms[group] / max(norms[j], 1e-300)
            if np.linalg.norm(factor @ a[group]) <= tol * reference:
                silent[s, group] = True
    return silent


def ablation_effects(students: StudentBatch, layer: int, X, target_scale: float,
                     max_rows: int = ABLATION_ROWS) -> np.ndarray:
    """``(N, width)``: how much each neuron of hidden layer ``layer`` matters to its student.

    The neuron's activity is replaced by its mean over the queries ``X`` (what an output bias,
    or the next layer's biases, can absorb) and the student's outputs are recomputed; the
    effect is their mean squared change, over ``target_scale`` (the targets' variance, so that
    it reads as a relative loss). For the last hidden layer this is ``var(h_j) |a_j|^2 / d_out``
    exactly; below it, the change is propagated through the layers above. At most
    ``max_rows`` queries, evenly spaced, are used.
    """
    X = torch.as_tensor(X)
    if X.ndim != 2 or X.shape[1] != students.d_in:
        raise ValueError(f"X must be (n, {students.d_in}), got {tuple(X.shape)}")
    if not target_scale > 0:
        raise ValueError(f"target_scale must be positive, got {target_scale!r}")
    step = max(1, math.ceil(len(X) / max_rows))
    X = X[::step].to(device=students.device, dtype=students.theta.dtype)
    act = students.activation
    weights, biases = students.weights, students.biases
    with torch.no_grad():
        a = X.expand(students.n_students, *X.shape)
        for w, b in zip(weights[:layer + 1], biases[:layer + 1]):
            a = act(a @ w.transpose(-1, -2) + b[:, None])
        centred = a - a.mean(dim=1, keepdim=True)  # (N, n, width)
        n_out = weights[-1].shape[1]
        if layer == len(weights) - 2:
            outgoing = weights[-1].square().sum(dim=1)  # (N, width)
            effects = centred.square().mean(dim=1) * outgoing / n_out
        else:  # per student and block of neurons j: (block, n, width) activities, j at its mean
            width = a.shape[-1]
            block = max(1, ABLATION_ELEMENTS // (X.shape[0] * max(students.widths)))
            eye = torch.eye(width, dtype=a.dtype, device=a.device)
            effects = torch.empty(a.shape[0], width, dtype=a.dtype, device=a.device)
            for s in range(a.shape[0]):
                above = a[s]
                for w, b in zip(weights[layer + 1:-1], biases[layer + 1:-1]):
                    above = act(above @ w[s].T + b[s])
                for j in range(0, width, block):
                    cut = a[s] - centred[s].T[j:j + block, :, None] * eye[j:j + block, None, :]
                    for w, b in zip(weights[layer + 1:-1], biases[layer + 1:-1]):
                        cut = act(cut @ w[s].T + b[s])
                    change = (cut - above) @ weights[-1][s].T  # the output bias cancels
                    effects[s, j:j + block] = change.square().mean(dim=(1, 2))
    return (effects / target_scale).cpu().numpy()


def undetermined_neurons(students: StudentBatch, layer: int, X, target_scale: float,
                         student_losses, max_loss: float = UNDETERMINED_MAX_LOSS) -> np.ndarray:
    """``(N, width)`` mask of the neurons that matter less to their student than its own
    error: :func:`ablation_effects` at most the student's relative loss. The queries cannot
    tell such a neuron's incoming vector from many others (the student fits them no better
    than it would without the neuron), so it must not vote in the clustering. A student at
    the loss floor keeps every neuron that does anything; a deep student far from it loses
    its nearly constant (saturated) or nearly disconnected neurons, whose rows would otherwise
    gather into clusters that match no teacher neuron. A student whose relative loss is above
    ``max_loss`` keeps all its neurons: far from any solution, each of its neurons can matter
    less than its error, and the test says nothing."""
    losses = np.asarray(student_losses, dtype=np.float64)
    if losses.shape != (students.n_students,):
        raise ValueError(f"student_losses needs one loss per student ({students.n_students}), "
                         f"got shape {losses.shape}")
    near = losses <= max_loss
    undetermined = np.zeros((students.n_students, students.widths[layer]), dtype=bool)
    if near.any():
        effects = ablation_effects(StudentBatch(students.theta[torch.as_tensor(near)],
                                                students.layout, students.activation),
                                   layer, X, target_scale)
        undetermined[near] = effects <= losses[near, None]
    return undetermined


def canonical_signs(features: np.ndarray, seed: int = 0, tries: int = 16) -> np.ndarray:
    """Signs (+1/-1) that put every row on the positive side of one generic direction.

    A neuron and a sign-flipped copy of it land on the same side, so after multiplying by these
    signs their plain L2 distance is their distance up to sign. The direction is the best of
    ``tries`` random ones: the one that no row is close to orthogonal to.
    """
    rng = np.random.default_rng(seed)
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-300)
    best, best_margin = None, -1.0
    for _ in range(tries):
        direction = rng.normal(size=features.shape[1])
        direction /= np.linalg.norm(direction)
        margin = float(np.abs(unit @ direction).min())
        if margin > best_margin:
            best, best_margin = direction, margin
    return np.where(features @ best < 0, -1.0, 1.0)


def preactivation_metric(inputs) -> np.ndarray:
    """``S`` (``(d + 1, d + 1)``) such that ``[w; b] S`` has the Euclidean norm of the RMS of the
    preactivation ``a . w + b`` over the rows ``a`` of ``inputs`` (``(n, d)``, a layer's inputs
    on the queries): ``S S^T`` is the second-moment matrix of ``[a; 1]``, from a QR factorisation
    (no squared condition number). Directions in which the inputs never vary get no weight."""
    inputs = np.asarray(inputs, dtype=np.float64)
    if inputs.ndim != 2 or len(inputs) == 0 or not np.isfinite(inputs).all():
        raise ValueError(f"inputs must be a finite (n, d) array with n >= 1, got shape {inputs.shape}")
    augmented = np.concatenate([inputs, np.ones((len(inputs), 1))], axis=1) / math.sqrt(len(inputs))
    return np.linalg.qr(augmented, mode="r").T


def pairwise_distances(features: np.ndarray, signed: bool) -> np.ndarray:
    """Condensed L2 distances between rows (scipy's ``pdist``); up to sign when ``signed``.

    Computed from exact differences: copies that agree to 1e-16 are 1e-16 apart, which the
    shortcut ``|u|^2 + |v|^2 - 2 u.v`` would blur to 1e-8.
    """
    if signed:
        features = features * canonical_signs(features)[:, None]
    return pdist(features)


def _cosines(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1)
    unit = features / np.where(norms > 0, norms, 1.0)[:, None]
    return np.clip(unit @ unit.T, -1.0, 1.0)


def _angles(features: np.ndarray, signed: bool) -> np.ndarray:
    cos = _cosines(features)
    return np.arccos(np.abs(cos) if signed else cos)


def median_angle(features: np.ndarray, signed: bool) -> float:
    """Median pairwise angle (radians) between rows, up to sign when ``signed``."""
    if len(features) < 2:
        return 0.0
    iu = np.triu_indices(len(features), k=1)
    return float(np.median(_angles(features, signed)[iu]))


ONE_NEURON_SAMPLE = 2000


def all_one_neuron(features: np.ndarray, signed: bool, beta: float, seed: int = 0) -> bool:
    """Whether the rows' median pairwise angle is within ``beta`` (all rows one neuron),
    estimated on at most ``ONE_NEURON_SAMPLE`` random rows: the full angle matrix of tens of
    thousands of rows would not fit in memory, and the test only tells one neuron from many."""
    if len(features) > ONE_NEURON_SAMPLE:
        rows = np.random.default_rng(seed).choice(len(features), ONE_NEURON_SAMPLE, replace=False)
        features = features[rows]
    return math.cos(median_angle(features, signed)) >= math.cos(beta) - 1e-12


def core_members(features: np.ndarray, signed: bool, beta: float) -> np.ndarray:
    """Indices of the rows within angle ``beta`` of the medoid (the row closest to all others)."""
    angles = _angles(features, signed)
    medoid = int(np.argmin(angles.sum(1)))
    return np.flatnonzero(angles[medoid] <= beta)


def dense_core(features: np.ndarray, student: np.ndarray, signed: bool,
               beta: float) -> np.ndarray:
    """Indices of the rows within ``beta`` of the row that has the most distinct students
    within ``beta`` (ties: the row closest to all others): the tight group of a cluster to which
    average linkage attached stray neurons."""
    angles = _angles(features, signed)
    within = angles <= beta
    voters = np.array([len(np.unique(student[row])) for row in within])
    best = max(range(len(features)), key=lambda i: (voters[i], -angles[i].sum()))
    return np.flatnonzero(within[best])


class _UnionFind:
    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, i):
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i, j):
        self.parent[self.find(i)] = self.find(j)


def _count_big_clusters(Z: np.ndarray, student: np.ndarray, needed: int) -> np.ndarray:
    """For each merge k of the linkage, the number of clusters with >= ``needed`` distinct students."""
    n = len(student)
    sets = [1 << int(s) for s in student] + [0] * (n - 1)
    big = [False] * (2 * n - 1)
    counts = np.zeros(n - 1, dtype=int)
    current = 0
    for k, (a, b) in enumerate(Z[:, :2].astype(int)):
        merged = sets[a] | sets[b]
        sets[n + k] = merged
        current -= big[a] + big[b]
        big[n + k] = merged.bit_count() >= needed
        current += big[n + k]
        counts[k] = current
    return counts


def _labels_after(Z: np.ndarray, n: int, last_merge: int) -> np.ndarray:
    uf = _UnionFind(2 * n - 1)
    for k in range(last_merge + 1):
        a, b = int(Z[k, 0]), int(Z[k, 1])
        uf.union(a, n + k)
        uf.union(b, n + k)
    roots = np.array([uf.find(i) for i in range(n)])
    _, labels = np.unique(roots, return_inverse=True)
    return labels


STABLE_FACTOR = 2.0
# A loose cluster's tight group is kept on its own only when its median angle is below this
# fraction of beta: copies of one neuron agree far more closely than beta, while a group drawn
# by chance from a diffuse bag of stray neurons (deep students' leftovers) has a median angle
# just below beta (8.4-9.7 deg at beta 10 deg in the deep MNIST students' third layer).
CORE_BETA_FRACTION = 0.5


def choose_cut(Z: np.ndarray, counts: np.ndarray, stable_factor: float = STABLE_FACTOR,
               keepable=None, open_top: bool = True, max_fragments: int | None = None) -> int:
    """Index of the merge after which to cut: the end of the first plateau of the largest count
    among the *stable* plateaus, those over which the cut height can at least double
    (``stable_factor``) without the count changing; heights below 1e-10 of the largest count
    as zero. Falls back to the largest count overall when no plateau is stable.

    The last plateau (after the last merge that changed the count) lasts for ever when
    ``open_top``; otherwise only up to the last merge's height. ``open_top=False`` is for trees
    whose rows are not all one neuron: there, the cut above everything is always "stable" and
    would win whenever students are too imprecise for any other plateau to last (deep students
    far from zero loss: one cluster kept instead of tens).

    ``max_fragments`` (with ``N`` students and clusters of at least ``needed``: ``N // needed``)
    bounds how many big clusters the copies of one neuron can fragment into, so the true count
    is at least the largest count divided by it: stable plateaus below that are not the answer
    either. They arise when a few stray rows (neurons of huge norm) merge far above the rest, so
    that the plateaus just below the top last long; the count is then maximised over all
    plateaus.

    ``keepable(k)``, when given, is the number of clusters after merge ``k`` that the angle test
    would keep too; plateaus are then ranked by it (the size count bounds it from above), so that
    a cut whose big clusters are all too wide does not win over one with fewer, tight clusters.
    """
    if len(counts) == 0:
        return 0
    floor = 1e-10 * max(float(Z[:, 2].max()), 1e-300)  # smaller heights are rounding noise
    top = np.inf if open_top else max(float(Z[-1, 2]), floor)
    heights = np.append(np.maximum(Z[:, 2], floor), top)
    plateaus, start = [], 0
    for k in range(1, len(counts) + 1):
        if k == len(counts) or counts[k] != counts[start]:
            lifetime = heights[k] / heights[start]
            plateaus.append((int(counts[start]), start, k - 1, lifetime))
            start = k
    stable = [p for p in plateaus if p[3] >= stable_factor and p[0] > 0]
    if max_fragments is not None:
        most = max(p[0] for p in plateaus)
        stable = [p for p in stable if p[0] * max_fragments >= most]
    stable = stable or plateaus
    if keepable is None:
        best = max(p[0] for p in stable)
        return next(p[2] for p in stable if p[0] == best)
    best, best_end = -1, stable[0][2]
    for count, _, end, _ in sorted(stable, key=lambda p: (-p[0], p[1])):
        if count <= best:
            break
        score = keepable(end)
        if score > best:
            best, best_end = score, end
    return best_end


def cluster_layer(students: StudentBatch, layer: int, gamma: float = 0.5,
                  beta: float = math.pi / 6, student_losses=None,
                  feature_mask: np.ndarray | None = None,
                  include: np.ndarray | None = None,
                  input_metric: np.ndarray | None = None,
                  exclude: np.ndarray | None = None) -> LayerClustering:
    """Cluster hidden layer ``layer`` of ``students`` (see the module doc for each step).

    ``student_losses`` ranks the students (lowest first) to pick each cluster's reference
    member. ``feature_mask`` (one bool per incoming coordinate) leaves coordinates out of the
    distances and angles, for inputs that never vary across the queries. ``include`` (one bool
    per student) leaves students out, for example those that did not converge; the threshold
    ``ceil(gamma N)`` still counts all N students. ``input_metric`` (:func:`preactivation_metric`
    of the layer's inputs): distances and angles between the neurons' preactivations instead of
    their rows (see the module doc); the clusters' rows stay the students' own. ``exclude``
    (``(N, width)`` bools, for example :func:`undetermined_neurons`): neurons left out, as the
    silent ones are.
    """
    activation: Activation = students.activation
    n_students = students.n_students
    needed = min_students(gamma, n_students)
    feats, scale = neuron_features(students, layer)
    width = students.widths[layer]
    student = np.repeat(np.arange(n_students), width)
    neuron = np.tile(np.arange(width), n_students)
    alive = ~silent_neurons(students, layer)
    if include is not None:
        alive &= np.asarray(include, dtype=bool)[:, None]
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != alive.shape:
            raise ValueError(f"exclude must be {alive.shape} (students x width), got {exclude.shape}")
        alive &= ~exclude
    alive = alive.reshape(-1)
    feats, scale, student, neuron = feats[alive], scale[alive], student[alive], neuron[alive]
    if len(feats) < 2:
        raise ValueError(f"layer {layer}: fewer than two neurons left to cluster")
    compared = feats
    if feature_mask is not None:
        mask = np.append(np.asarray(feature_mask, dtype=bool), True)  # the bias always counts
        if mask.shape[0] != feats.shape[1]:
            raise ValueError(f"feature_mask needs {feats.shape[1] - 1} entries, got {mask.shape[0] - 1}")
        compared = feats[:, mask]
    if input_metric is not None:
        if feature_mask is not None:
            raise ValueError("feature_mask and input_metric exclude each other: the preactivation "
                             "metric already gives no weight to inputs that never vary")
        input_metric = np.asarray(input_metric, dtype=np.float64)
        if input_metric.shape != (feats.shape[1], feats.shape[1]):
            raise ValueError(f"input_metric must be {feats.shape[1]} x {feats.shape[1]} for layer "
                             f"{layer}, got {input_metric.shape}")
        compared = feats @ input_metric
        if activation.has_scaling_symmetry:  # angles only: unit rows again
            norms = np.linalg.norm(compared, axis=1)
            compared = compared / np.where(norms > 0, norms, 1.0)[:, None]
    signed = activation.has_sign_symmetry
    dist = pairwise_distances(compared, signed)
    Z = linkage(dist, method="average")
    counts = _count_big_clusters(Z, student, needed)
    rank = np.argsort(np.argsort(student_losses)) if student_losses is not None else np.arange(n_students)

    def clusters_after(last):
        labels = _labels_after(Z, len(feats), last) if len(counts) else np.zeros(len(feats), dtype=int)
        sign = np.ones(len(feats))
        clusters = []
        for label in range(labels.max() + 1):
            members = np.flatnonzero(labels == label)
            n_in = len(np.unique(student[members]))
            angle = median_angle(compared[members], signed)
            core = members[core_members(compared[members], signed, beta)]
            if n_in < needed:
                kept, reason = False, f"{n_in} students < {needed}"
            elif math.cos(angle) < cos_limit - 1e-12:
                kept, reason = False, f"median angle {math.degrees(angle):.1f} deg > beta"
                # our addition: the cluster's tight group passes both tests on its own
                dense = members[dense_core(compared[members], student[members], signed, beta)]
                n_dense = len(np.unique(student[dense]))
                dense_angle = median_angle(compared[dense], signed)
                if n_dense >= needed and \
                        math.cos(dense_angle) >= math.cos(CORE_BETA_FRACTION * beta) - 1e-12:
                    kept, core = True, dense
                    reason = (f"kept: its core of {n_dense} students has median angle "
                              f"{math.degrees(dense_angle):.1f} deg (all: {reason})")
            else:
                kept, reason = True, "kept"
            if signed:
                reference = core[np.argmin(rank[student[core]])]
                sign[members] = np.where(compared[members] @ compared[reference] < 0, -1.0, 1.0)
            clusters.append(Cluster(members, n_in, angle, kept, reason, core))
        return labels, sign, clusters

    cos_limit = math.cos(beta)
    last = choose_cut(Z, counts, keepable=lambda k: sum(c.kept for c in clusters_after(k)[2]),
                      open_top=all_one_neuron(compared, signed, beta),
                      max_fragments=n_students // needed)
    labels, sign, clusters = clusters_after(last)
    result = LayerClustering(layer, feats, student, neuron, scale, sign, dist, Z, last,
                             float(Z[last, 2]) if len(Z) else 0.0, counts, labels, clusters,
                             needed, beta)
    log.info("layer %d: %d clusters with >= %d students at height %.3g; %d kept", layer,
             int(counts[last]) if len(counts) else 0,
             needed, result.cut_height, result.width)
    return result
