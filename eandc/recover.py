"""Expand-and-Cluster end to end: :func:`expand_and_cluster` and its result.

1. **Expand.** Train N students of the teacher's depth and activation, wider than the teacher
   (given widths, or found by doubling until the students consistently reach ~zero loss).
2. **Cluster**, layer by layer: cluster layer l across students, write the clustered layer into
   every student, retrain the students, cluster layer l + 1 from the retrained students.
   The shared layers stay fixed while the students retrain (our choice; the authors' code
   trains everything): a student that cannot reach zero loss would otherwise move its shared
   neurons away, and its next layer's incoming weights would no longer be comparable with the
   other students'. The final fine-tuning frees every weight.
   Consensus rounds (our addition): before moving on, the clustered neurons are shared with
   every student while each keeps its other neurons free; after retraining, the layer is
   clustered again, and the round is kept if it finds more clusters. Neurons that too few
   students had found precisely (deep networks, weakly determined neurons) are found this way.
   A complete layer needs no round: below the last, when once shared it lets ``ceil(gamma N)``
   students reach ~zero loss; the last, when the network reconstructed from its clusters is
   exact (fine-tuned relative loss below ``EXACT_LOSS``), checked again after each round.
   Deep students start small and take a longer first-order phase (``DEEP_INIT_SCALE``,
   ``DEEP_ADAM_STEPS``).
3. **Reconstruct** at the last hidden layer, align the output bias, fit the linear term where the
   activation's symmetry leaves one, and fine-tune to machine precision.
4. **Prune** (our addition, on by default): clustering can keep a cluster the function does not
   need (for example neurons with vanishing outgoing weights, tight in angle). After
   fine-tuning, such neurons are silent, constant or duplicates; each is removed only if the
   fine-tuned network without it still sits at the loss floor. ``clustered_widths`` reports the
   widths before this step, the paper's count; ``widths`` those after it.
5. **Completion** (our addition, with pruning): when the network of the clusters, pruned, is
   not exact, some teacher neurons were found by too few students. ``n_students`` copies of it,
   each with fresh random neurons added to its last hidden layer (a quarter of its width, at
   least ``COMPLETION_MIN_EXTRA``; their outgoing weights fitted to the residual by least
   squares), are trained; the best is pruned and kept if it fits better, and the round is
   repeated from it (at most ``COMPLETION_ROUNDS``) while it fits better. Few free neurons
   leave the queries far more numerous than the free parameters, so the fresh neurons must take
   the missing teacher neurons' places (on MNIST, a wide student's 40-odd spare neurons can
   instead interpolate the 12,000 queries; see step 6). At the last hidden layer, pruning and
   completion come before the consensus rounds (step 2), which run only when they leave the
   network inexact: a round retrains every wide student, a completion only small networks.
6. **Exact-student fallback** (our addition, with pruning): when the network is still not
   exact but a student sits at the loss floor (``EXACT_LOSS``), that student computes the
   teacher's function on the queries; pruned to the neurons the function needs, it is the
   teacher up to the activation's symmetries (the identifiability result) when the queries
   pin the function down, and it is returned instead. That needs more queries than the pruned
   student has parameters: a student with more can interpolate them without being the teacher
   (MNIST, g teacher 784-16-10, 12,000 queries: a student at 1e-14, merged, fine-tuned and
   pruned to 56 neurons, fitted them to 2e-21, 41 of its neurons matching no teacher neuron, and
   missed the teacher by 8e-5 on fresh queries), so such a student is refused.
   ``source`` says which: ``"clusters"``, ``"completion"`` or ``"student k"``. This rescues
   teachers that fewer than ``ceil(gamma N)`` students found exactly, the others stalling in
   near-solutions.
7. **Retries** (our addition, off by default: ``retry_with``): when the network is still not
   exact, everything is done again from the same initial students with a larger training
   budget. Wide students often stall in near-solutions (relative loss 1e-9..1e-14, a teacher
   neuron held by a loose group of neurons); longer Levenberg-Marquardt stages before the
   compaction rounds bring more of them to the loss floor. (Continuing the stalled students
   instead, from where they stopped, rescued 1 of 4 such teachers of the toy family where a
   restart with 400 iterations per stage rescued 3.)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .activations import get_activation
from .checkpoint import active as active_checkpoint
from .clustering import (
    LayerClustering,
    cluster_layer,
    min_students,
    preactivation_metric,
    undetermined_neurons,
)
from .mlp import MLP, Layout, StudentBatch
from .reconstruction import (
    align_output_bias,
    assemble_network,
    drop_pruned_neurons,
    finetune,
    fit_linear_term,
    prune,
    refit_next_layer,
    widen_last_layer,
    write_shared_layer,
)
from .teachers import check_inputs
from .teachers import query as query_teacher
from .training import TrainingReport, _target_scale, format_losses, init_students, train_students

__all__ = ["expand_and_cluster", "ExpandAndClusterResult", "find_student_widths",
           "NoClusterError"]

log = logging.getLogger(__name__)

ZERO_LOSS = 1e-8  # relative loss that counts as "~zero" when choosing the student width
# Deep students start small and take a long first-order phase: gradient descent from near the
# origin first aligns the first layer's neurons with the teacher's (they "condense"), where
# second-order training from a standard start lands deep students in distributed near-solutions
# (relative loss 1e-8, no teacher neuron found by enough students). The paper's students also
# start small (PyTorch's fan-in of its 3-D tensors makes its init std sqrt(2 / (width N))).
DEEP_INIT_SCALE = 0.3
DEEP_ADAM_STEPS = 1500
CLUSTER_METRICS = ("weights", "preactivations")  # expand_and_cluster(cluster_metric=)
CONSENSUS_MIN_LOSS = 1e-20  # consensus rounds run only while some student is above this loss
# A network reconstructed from the last layer's clusters is exact when its fine-tuned relative loss
# is below this: the last layer then needs no consensus round.
EXACT_LOSS = 1e-20
# The completion (module doc, step 5) adds this share of the last hidden layer's width in fresh
# neurons, at least COMPLETION_MIN_EXTRA of them.
COMPLETION_EXTRA = 0.25
COMPLETION_MIN_EXTRA = 2
# Completion rounds at most; each widens the network the round before left, while it fits better.
COMPLETION_ROUNDS = 4


class NoClusterError(RuntimeError):
    """No cluster of a layer passed the gamma and beta tests: nothing to reconstruct.
    ``student_losses``: the students' relative losses after each training round so far."""

    def __init__(self, message: str, student_losses):
        super().__init__(message)
        self.student_losses = student_losses


@dataclass
class ExpandAndClusterResult:
    """What :func:`expand_and_cluster` recovered, and how.

    ``student_losses`` holds the students' relative losses after each training round (the
    expansion, then one retraining per deeper layer); ``timings`` the wall seconds per phase.
    """

    network: MLP
    widths: list[int]
    clustered_widths: list[int]
    student_widths: list[int]
    student_losses: list[np.ndarray]
    clusterings: list[LayerClustering]
    final_loss: float
    timings: dict[str, float] = field(default_factory=dict)
    pruning: list[str] = field(default_factory=list)
    students: StudentBatch | None = None
    width_search: list[dict] = field(default_factory=list)
    source: str = "clusters"  # or "completion", "student k" (module doc, steps 5 and 6)
    attempts: int = 1  # 1 + the retries it took (``retry_with``)

    def summary(self) -> str:
        lines = [f"recovered widths   {self.widths} (clusters kept: {self.clustered_widths}; "
                 f"students {self.student_widths})",
                 f"final rel. loss    {self.final_loss:.2e}",
                 "student rel. loss  " + format_losses(self.student_losses[0]),
                 "wall seconds       " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items())]
        return "\n".join(lines)


def _check_parameters(activation, n_hidden_layers, n_students, gamma, beta, student_widths):
    act = get_activation(activation)
    if not isinstance(n_hidden_layers, (int, np.integer)) or n_hidden_layers < 1:
        raise ValueError(f"n_hidden_layers must be a positive integer, got {n_hidden_layers!r}")
    if not isinstance(n_students, (int, np.integer)) or n_students < 2:
        raise ValueError(f"n_students must be an integer >= 2, got {n_students!r}")
    if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    betas = list(beta) if isinstance(beta, (list, tuple, np.ndarray)) else [beta] * n_hidden_layers
    if len(betas) != n_hidden_layers or not all(
            isinstance(b, (int, float, np.floating)) and not isinstance(b, bool)
            and 0 < b <= math.pi / 2 for b in betas):
        raise ValueError(f"beta must be an angle in (0, pi/2] radians, or one per hidden layer "
                         f"({n_hidden_layers}), got {beta!r}")
    if gamma * n_students < 2:
        raise ValueError(f"gamma * n_students = {gamma * n_students:g} < 2: a cluster must hold "
                         "at least two students; raise gamma or n_students")
    if student_widths is not None:
        if isinstance(student_widths, (int, np.integer)):
            student_widths = [int(student_widths)] * n_hidden_layers
        student_widths = list(student_widths)
        if len(student_widths) != n_hidden_layers:
            raise ValueError(f"student_widths has {len(student_widths)} entries for "
                             f"{n_hidden_layers} hidden layer(s)")
        if any(not isinstance(w, (int, np.integer)) or w < 1 for w in student_widths):
            raise ValueError(f"student widths must be positive integers, got {student_widths}")
    return act, student_widths, [float(b) for b in betas]


def _targets(query, X):
    if callable(query):
        return query_teacher(query, X)
    if not isinstance(query, (np.ndarray, torch.Tensor, list, tuple)) or np.ndim(query) not in (1, 2):
        raise TypeError("the teacher must be callable, or an array of its outputs on X with shape "
                        f"(n,) or (n, d_out); got {type(query).__name__}")
    y = check_inputs(query, name="teacher outputs") if np.ndim(query) == 2 else \
        check_inputs(np.asarray(query)[:, None], name="teacher outputs")
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"{y.shape[0]} teacher outputs for {X.shape[0]} queries")
    return y


def _check_size(layout: Layout, n: int):
    """Each query gives ``d_out`` equations; fewer equations than a student's parameters leave
    the students underdetermined (any of a continuum of networks fits)."""
    if n * layout.d_out < layout.size:
        raise ValueError(f"too few queries: {n} queries x {layout.d_out} output(s) for students with "
                         f"{layout.size} parameters each ({'-'.join(map(str, layout.sizes))}); give "
                         "at least as many query outputs as parameters, or narrower students")


def layer_inputs(students, losses, layer: int, X: torch.Tensor) -> np.ndarray:
    """What hidden layer ``layer`` of the lowest-loss student receives on ``X``: ``X`` itself
    for the first, else the activities of the layer below."""
    inputs = X if layer == 0 else students.student(int(np.argmin(losses))).hidden(X)[layer - 1]
    return inputs.detach().cpu().numpy()


def converged(losses: np.ndarray, needed: int) -> np.ndarray:
    """Students whose relative loss is ~zero (at most ``ZERO_LOSS``); all of them when fewer than
    ``needed`` are. Clustering reads only these: a student far from a solution contributes
    neurons that match no teacher neuron and blur the tree."""
    good = losses <= ZERO_LOSS
    return good if good.sum() >= needed else np.ones_like(good)


def find_student_widths(X, y, activation, n_hidden_layers=1, *, n_students=10, start=2,
                        max_width=256, consistency=0.8, zero_loss=ZERO_LOSS, seed=0, device=None,
                        progress=False, init_scale=1.0, **train_options):
    """Double the student width from ``start`` until a fraction ``consistency`` of the students
    reach a relative loss below ``zero_loss``; return (widths, trained students, report, log)."""
    act = get_activation(activation)
    width, history = start, []
    while True:
        layout = Layout(X.shape[1], (width,) * n_hidden_layers, y.shape[1], act.leaves_linear_term)
        _check_size(layout, X.shape[0])
        students = init_students(layout, act, n_students, y, seed=seed, device=device,
                                 scale=init_scale)
        students, report = train_students(students, X, y, seed=seed, progress=progress, **train_options)
        share = float((report.relative_losses <= zero_loss).mean())
        history.append({"width": width, "share_at_zero_loss": share,
                        "median_loss": float(np.median(report.relative_losses))})
        log.info("width %d: %.0f%% of students below %.0e", width, 100 * share, zero_loss)
        if share >= consistency or 2 * width > max_width:
            return [width] * n_hidden_layers, students, report, history
        width *= 2


def _reconstruct(students, clustering, losses, X, y, act, progress, finetune_iter=300):
    """The network of the clustered last layer: assembled, output bias aligned, linear term fitted
    where the activation leaves one, fine-tuned (at most ``finetune_iter`` Levenberg-Marquardt
    iterations). Returns (network, relative loss)."""
    network = assemble_network(students, clustering, losses)
    network = align_output_bias(network, X, y)
    if act.leaves_linear_term:
        network = fit_linear_term(network, X, y)
    return finetune(network, X, y, max_iter=finetune_iter, progress=progress)


def expand_and_cluster(query, X, activation, n_hidden_layers=1, *, student_widths=None,
                       n_students=10, gamma=0.5, beta=math.pi / 6, seed=0, device=None,
                       progress=True, prune_network=True, feature_mask=None,
                       consensus_rounds=3, train_options=None, retrain_options=None,
                       refit_shared=False, freeze_shared=True, cluster_metric="weights",
                       finetune_iter=300, drop_undetermined=True, retry_with=None,
                       init_scale=None, checkpoint=None) -> ExpandAndClusterResult:
    """Recover a black-box MLP's layer widths and weights from queries (see the module doc).

    ``query``: the teacher, any callable (an :class:`~eandc.MLP`, a ``torch.nn.Module``, a
    function of numpy arrays or tensors), or an array of its recorded outputs on ``X``.
    ``X``: the queries, ``(n, d_in)``. ``activation``: the teacher's activation, by name.
    ``student_widths``: one width per hidden layer (or one int for all); ``None`` doubles the
    width until the students consistently reach ~zero loss. ``gamma``, ``beta``: the cluster
    size (fraction of students) and median-angle (radians) thresholds; ``beta`` may be a list,
    one angle per hidden layer (deep students agree less closely on the layers above the
    first). ``train_options``:
    keyword arguments for :func:`eandc.training.train_students`. ``consensus_rounds``: how many
    times at most to share the clustered neurons of a layer with every student, retrain (each
    time on another subset of the queries), and cluster again, keeping a round that finds more
    clusters (0: the paper's single pass). A layer below the last skips them when, once shared,
    it lets at least ``ceil(gamma N)`` students reach ~zero loss. ``retrain_options``: updates
    of ``train_options`` for the students' retraining between layers and in consensus rounds
    (default: none but ``adam_steps`` 0, second-order training only; deep students far from
    zero loss may take first-order steps there too). ``refit_shared``: after a layer is
    shared, refit each student's next layer by least squares to what it received before
    (:func:`eandc.reconstruction.refit_next_layer`), so that the retraining starts near the
    students' own functions. ``freeze_shared``: the shared layers stay fixed while the students
    retrain between layers (default); ``False`` retrains every layer, as the published code
    does: the shared neurons start identical in every student (so the next layer's incoming
    weights are comparable across students) and keep adapting, which lets first-order students
    that share an approximate layer go on improving it; the reconstruction then takes the lower
    layers from the lowest-loss student.
    ``cluster_metric``: ``"weights"`` (the paper) clusters the neurons' incoming rows
    ``[w; b]``; ``"preactivations"`` their preactivations on the queries
    (:func:`eandc.clustering.preactivation_metric` of what the layer receives in the
    lowest-loss student), which discounts weights along directions in which the layer's inputs
    hardly vary: the deep layers, whose inputs are correlated activities (no ``feature_mask``
    then: inputs that never vary get no weight anyway).
    ``drop_undetermined``: leave out of the clustering the neurons that matter less to their
    student's outputs than the student's own error
    (:func:`eandc.clustering.undetermined_neurons`; our addition): the queries do not determine
    them, and deep students far from zero loss hold nearly constant or nearly disconnected
    neurons whose rows gather into clusters that match no teacher neuron.
    ``finetune_iter``: the most Levenberg-Marquardt iterations of the reconstructed network's
    fine-tune (a deep network's on many queries can cost tens of seconds each).
    ``prune_network``: prune the reconstructed network, complete it where it is not exact and
    fall back on an exact student (steps 4-6 of the module doc); each pruning trial is a
    fine-tune.
    ``retry_with``: a list of ``train_options`` updates (for example ``[{"max_iter": 400}]``).
    When the recovered network is not exact (relative loss on the queries above ``EXACT_LOSS``,
    a test that needs no teacher), the recovery is done again from the same initial students
    with the next update applied, and the better of the two networks (lower loss) is returned;
    ``attempts`` says how many were made. A recovery exact at its first attempt costs nothing
    more: an adaptive training budget.
    ``init_scale``: the students' initial weight scale (:func:`eandc.training.init_students`);
    ``None``: 1 for one hidden layer, ``DEEP_INIT_SCALE`` for deeper students, which also take
    ``DEEP_ADAM_STEPS`` first-order steps unless ``train_options`` says otherwise.
    ``checkpoint``: an :class:`eandc.checkpoint.Checkpoint`; the run records its progress there
    and, started again with the same arguments, resumes from it (bitwise the same result on CPU).
    """
    if checkpoint is not None and active_checkpoint() is not checkpoint:
        with checkpoint:  # the same call, with the checkpoint active (see eandc.checkpoint)
            return expand_and_cluster(**locals())
    if retry_with:
        return _with_retries(dict(locals()))
    act, student_widths, betas = _check_parameters(activation, n_hidden_layers, n_students, gamma, beta,
                                            student_widths)
    if isinstance(finetune_iter, bool) or not isinstance(finetune_iter, (int, np.integer)) \
            or finetune_iter < 1:
        raise ValueError(f"finetune_iter must be a positive integer, got {finetune_iter!r}")
    if cluster_metric not in CLUSTER_METRICS:
        raise ValueError(f"cluster_metric must be one of {CLUSTER_METRICS}, got {cluster_metric!r}")
    if cluster_metric == "preactivations" and feature_mask is not None:
        raise ValueError("feature_mask applies to cluster_metric='weights' only: the "
                         "preactivation metric gives no weight to inputs that never vary")
    for name, flag in (("refit_shared", refit_shared), ("freeze_shared", freeze_shared),
                       ("drop_undetermined", drop_undetermined)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if retrain_options is not None and not isinstance(retrain_options, dict):
        raise TypeError(f"retrain_options is a dict of train_options updates, got {retrain_options!r}")
    X = check_inputs(X)
    y = _targets(query, X)
    if float(y.var(dim=0).max()) == 0.0:
        raise ValueError("the teacher's outputs are constant on these queries: nothing to recover")
    X, y = X.to(device), y.to(device)
    options = dict(train_options or {})
    options.setdefault("progress", progress)
    deep = n_hidden_layers > 1
    if init_scale is None:
        init_scale = DEEP_INIT_SCALE if deep else 1.0
    expansion_options = dict(options)
    if deep:
        expansion_options.setdefault("adam_steps", DEEP_ADAM_STEPS)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    search = []
    if student_widths is None:
        student_widths, students, report, search = find_student_widths(
            X, y, act, n_hidden_layers, n_students=n_students, seed=seed, device=device,
            init_scale=init_scale, **expansion_options)
    else:
        layout = Layout(X.shape[1], tuple(student_widths), y.shape[1], act.leaves_linear_term)
        _check_size(layout, X.shape[0])
        students = init_students(layout, act, n_students, y, seed=seed, device=device,
                                 scale=init_scale)
        students, report = train_students(students, X, y, seed=seed, **expansion_options)
    timings["expansion"] = time.perf_counter() - t0
    expanded = students
    reports: list[TrainingReport] = [report]
    losses = report.relative_losses
    needed = min_students(gamma, n_students)
    if (losses <= ZERO_LOSS).sum() < needed:
        log.warning("only %d of %d students reached a relative loss below %.0e; clusters need %d. "
                    "Wider students or more training may be needed.",
                    int((losses <= ZERO_LOSS).sum()), n_students, ZERO_LOSS, needed)

    clusterings = []
    timings["clustering"] = 0.0
    completion = None  # (reconstructed, its result): the latest reconstruction's

    def prune_and_complete(reconstructed):
        """Steps 4 and 5 of the module doc on a reconstructed (network, loss), done once per
        reconstruction: (network, loss, pruning and completion notes, source)."""
        nonlocal completion
        if completion is not None and completion[0] is reconstructed:
            return completion[1]
        network, loss = reconstructed
        t0 = time.perf_counter()
        network, loss, notes = prune(network, X, y, loss=loss, progress=options["progress"])
        timings["pruning"] = timings.get("pruning", 0.0) + time.perf_counter() - t0
        source = "clusters"
        if loss > EXACT_LOSS:
            t0 = time.perf_counter()
            completed, completed_loss, completed_notes = _complete(
                network, loss, X, y, n_students, seed + 7, dict(options, adam_steps=0))
            if completed_loss < loss:
                network, loss, source = completed, completed_loss, "completion"
                notes = notes + completed_notes
            timings["completion"] = timings.get("completion", 0.0) + time.perf_counter() - t0
        completion = (reconstructed, (network, loss, notes, source))
        return completion[1]
    retrain = {**options, "adam_steps": 0, **(retrain_options or {})}

    def metric(students, losses, layer):
        if cluster_metric == "weights":
            return None
        return preactivation_metric(layer_inputs(students, losses, layer, X))

    def undetermined(students, losses, layer):
        if not drop_undetermined:
            return None
        return undetermined_neurons(students, layer, X, _target_scale(y), losses)

    for layer in range(n_hidden_layers):
        mask = feature_mask if layer == 0 else None
        last = layer == n_hidden_layers - 1
        t0 = time.perf_counter()
        clustering = cluster_layer(students, layer, gamma, betas[layer], losses, mask,
                                   converged(losses, needed),
                                   input_metric=metric(students, losses, layer),
                                   exclude=undetermined(students, losses, layer))
        timings["clustering"] += time.perf_counter() - t0

        def write_and_retrain(students, clustering, losses, layer=layer):
            t0 = time.perf_counter()
            shared = write_shared_layer(students, clustering, losses)
            if refit_shared:
                shared = refit_next_layer(shared, students, layer, X)
            shared, report = train_students(shared, X, y, seed=seed + layer + 1,
                                            fixed_layers=layer + 1 if freeze_shared else 0,
                                            **retrain)
            key = f"retraining layer {layer + 2}"
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
            return shared, report

        def reconstruct(students, clustering, losses):
            t0 = time.perf_counter()
            network, loss = _reconstruct(students, clustering, losses, X, y, act,
                                         options["progress"], finetune_iter)
            timings["reconstruction"] = timings.get("reconstruction", 0.0) + \
                time.perf_counter() - t0
            return network, loss

        # A complete layer needs no consensus round: below the last, it lets the students reach
        # ~zero loss once it is shared; the last layer, the network reconstructed from it is
        # exact.
        retrained = reconstructed = None
        complete = False
        if clustering.width and not last:
            retrained = write_and_retrain(students, clustering, losses)
            complete = retrained[1].n_converged(ZERO_LOSS) >= needed
        elif clustering.width:
            reconstructed = reconstruct(students, clustering, losses)
            complete = reconstructed[1] <= EXACT_LOSS
            if not complete and prune_network:
                # completion first: on a shallow network it costs far less than a round
                completed = prune_and_complete(reconstructed)
                complete = completed[1] <= EXACT_LOSS
        # students at the loss floor hold every neuron exactly: nothing left to agree on
        rounds = consensus_rounds if clustering.width and losses.max() > CONSENSUS_MIN_LOSS \
            and not complete else 0
        improved = False
        for round_ in range(rounds):
            t0 = time.perf_counter()
            trial = write_shared_layer(students, clustering, losses, keep_free=True)
            trial, trial_report = train_students(trial, X, y, seed=seed + 101 + layer + 1009 * round_,
                                                 fixed_layers=layer, **retrain)
            trial_losses = trial_report.relative_losses
            trial_clustering = cluster_layer(trial, layer, gamma, betas[layer], trial_losses, mask,
                                             converged(trial_losses, needed),
                                             input_metric=metric(trial, trial_losses, layer),
                                             exclude=undetermined(trial, trial_losses, layer))
            key = f"consensus layer {layer + 1}"
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
            log.info("layer %d consensus round %d: %d -> %d clusters", layer + 1, round_ + 1,
                     clustering.width, trial_clustering.width)
            if trial_clustering.width > clustering.width:
                students, clustering, losses = trial, trial_clustering, trial_losses
                reports.append(trial_report)
                improved = True
                if last:
                    reconstructed = reconstruct(students, clustering, losses)
                    if reconstructed[1] <= EXACT_LOSS:
                        break
        clusterings.append(clustering)
        no_cluster = NoClusterError(
            f"layer {layer + 1}: no cluster holds neurons of {needed} students with median "
            f"angle below beta; the students did not agree (losses {format_losses(losses)}). "
            "Try wider students.", [r.relative_losses for r in reports])
        if clustering.width == 0 and not (last and prune_network):
            raise no_cluster
        if last and reconstructed is None and clustering.width:
            reconstructed = reconstruct(students, clustering, losses)
        if not last:
            if retrained is None or improved:
                retrained = write_and_retrain(students, clustering, losses)
            students, report = retrained
            reports.append(report)
            losses = report.relative_losses

    # the last layer's clustering, reconstructed (none: no cluster; the fallback may help)
    network, final_loss = reconstructed or (None, math.inf)
    notes, source = [], "clusters"
    clustered_widths = [c.width for c in clusterings]
    if prune_network and network is not None:
        network, final_loss, notes, source = prune_and_complete(reconstructed)
    if prune_network and final_loss > EXACT_LOSS:
        t0 = time.perf_counter()
        fallback = _exact_student([(expanded, reports[0].relative_losses), (students, losses)],
                                  X, y, options["progress"])
        timings["fallback"] = time.perf_counter() - t0
        if fallback is not None:
            network, final_loss, notes, source = fallback
            log.info("the recovered network is not exact; %s is, once pruned", source)
    if network is None:
        raise no_cluster
    log.info("recovered widths %s (clusters %s), relative loss %.2e", network.widths,
             clustered_widths, final_loss)
    return ExpandAndClusterResult(network, network.widths, clustered_widths, list(student_widths),
                                  [r.relative_losses for r in reports], clusterings, final_loss,
                                  timings, notes, expanded, search, source)


def _with_retries(arguments: dict) -> ExpandAndClusterResult:
    """:func:`expand_and_cluster` with its ``retry_with`` (see there), from its ``arguments``."""
    retries = arguments["retry_with"]
    if not isinstance(retries, (list, tuple)) or not all(isinstance(r, dict) for r in retries):
        raise TypeError("retry_with is a list of train_options updates (dicts), got "
                        f"{retries!r}")
    first = error = None
    try:
        first = expand_and_cluster(**{**arguments, "retry_with": None})
    except NoClusterError as no_cluster:
        error = no_cluster
    if first is not None and first.final_loss <= EXACT_LOSS:
        return first
    log.info("not exact (relative loss %.1e): trying again with %s",
             first.final_loss if first else math.inf, retries[0])
    retry_arguments = {**arguments, "retry_with": list(retries[1:]),
                       "train_options": {**(arguments["train_options"] or {}), **retries[0]}}
    if first is not None:
        retry_arguments["student_widths"] = first.student_widths
    try:
        second = expand_and_cluster(**retry_arguments)
    except NoClusterError:
        if first is None:
            raise error from None
        second = None
    best = first if second is None or (first is not None and first.final_loss < second.final_loss) \
        else second
    best.attempts = 1 + (second.attempts if second is not None else len(retries))
    spent = [r.timings for r in (first, second) if r is not None and r is not best]
    if spent:
        best.timings["other attempts"] = sum(sum(t.values()) for t in spent)
    return best


def _complete(network, loss, X, y, n_students, seed, options, rounds=COMPLETION_ROUNDS):
    """Step 5 of the module doc: rounds of :func:`_completion_round` while they fit better, at
    most ``rounds``, until one is exact. Returns (network, relative loss, notes) of
    the last better round (``network``, ``loss`` and no notes when none was)."""
    notes = []
    for round_ in range(rounds):
        completed, completed_loss, round_notes = _completion_round(
            network, X, y, n_students, seed + 1013 * round_, options)
        log.info("completion round %d: widths %s -> %s, relative loss %.1e -> %.1e", round_ + 1,
                 network.widths, completed.widths, loss, completed_loss)
        if completed_loss >= loss:
            break
        network, loss, notes = completed, completed_loss, notes + round_notes
        if loss <= EXACT_LOSS:
            break
    return network, loss, notes


def _completion_round(network, X, y, n_students, seed, options):
    """One completion round: ``n_students`` copies of ``network`` widened by fresh neurons
    in the last hidden layer, trained (``options``: :func:`train_students` keywords), the best
    one pruned. Returns (network, relative loss, pruning notes)."""
    extra = max(COMPLETION_MIN_EXTRA, math.ceil(COMPLETION_EXTRA * network.widths[-1]))
    wide = [widen_last_layer(network, X, y, extra, seed=seed + 1009 * k) for k in range(n_students)]
    students, report = train_students(StudentBatch.from_networks(wide), X, y, seed=seed, **options)
    best = int(np.argmin(report.relative_losses))
    completed = drop_pruned_neurons(students.student(best))
    return prune(completed, X, y, loss=float(report.relative_losses[best]),
                 progress=options["progress"])


def _exact_student(batches, X, y, progress):
    """Step 6 of the module doc: the lowest-loss student of ``batches`` ((StudentBatch, losses)
    pairs) when it sits at the loss floor, pruned and fine-tuned: (network, loss, notes,
    source) if it stays exact and has fewer parameters than there are queries, else None."""
    batch, losses = min(batches, key=lambda pair: float(np.min(pair[1])))
    best = int(np.argmin(losses))
    if float(losses[best]) > EXACT_LOSS:
        return None
    network = drop_pruned_neurons(batch.student(best))
    network, loss = finetune(network, X, y, progress=progress)
    network, loss, notes = prune(network, X, y, loss=loss, max_trials=4 * sum(network.widths),
                                 progress=progress)
    if loss > EXACT_LOSS:
        return None
    if network.n_parameters >= X.shape[0]:
        log.warning("%s fits the queries exactly but has %d parameters for %d queries: it may "
                    "interpolate them without being the teacher; refused", f"student {best}",
                    network.n_parameters, X.shape[0])
        return None
    return network, loss, notes, f"student {best}"
