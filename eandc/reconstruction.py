"""From clusters back to a network: shared layers, output layer, linear term, fine-tuning, pruning.

For each kept cluster, the neuron's incoming vector comes from the lowest-loss student with a
member in the cluster's core (the mean of that student's sign-aligned core members, if it holds
duplicates). The outgoing weights of a student's core members are summed, corrected per
symmetry class:

* ``odd``: a member with the opposite sign contributes ``-a`` (s(-z) = -s(z));
* ``odd_constant``: ``-a``, and ``a K`` moves into the next layer's bias (s(-z) = K - s(z));
* ``even_linear``: ``a`` unflipped; the linear remainder ``-a c z`` is left to the fitted
  linear term and to fine-tuning;
* ``even_linear_scaling``: as ``even_linear``, times the norm divided out before clustering.

:func:`write_shared_layer` puts a clustered layer into every student (deep networks, layer by
layer); :func:`assemble_network` builds the recovered network at the last hidden layer;
:func:`finetune` runs Levenberg-Marquardt on it; :func:`prune` removes neurons that the
function does not need (see its doc), each removal checked by fine-tuning.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from . import matfree
from .clustering import LayerClustering
from .mlp import MLP, Layout, StudentBatch
from .training import choose_finisher, levenberg_marquardt, merge_neurons, pruned_neurons, zero_neuron

__all__ = ["write_shared_layer", "assemble_network", "fit_linear_term", "align_output_bias",
           "finetune", "prune", "drop_pruned_neurons", "widen_last_layer", "refit_next_layer"]

log = logging.getLogger(__name__)


def _cluster_parts(students: StudentBatch, clustering: LayerClustering, losses):
    """Representative incoming vectors ``(K, fan_in + 1)``, chosen students ``(K,)``, and
    per-student summed outgoing columns ``(N, fan_out, K)`` with bias shifts ``(N, fan_out)``."""
    act = students.activation
    layer = clustering.layer
    w_next = students.weights[layer + 1].detach().cpu().numpy()  # (N, fan_out, width)
    n_students, fan_out = w_next.shape[0], w_next.shape[1]
    kept = clustering.kept
    order = np.argsort(losses) if losses is not None else np.arange(n_students)
    rank = np.empty(n_students, dtype=int)
    rank[order] = np.arange(n_students)
    flips_outgoing = act.symmetry in ("odd", "odd_constant")
    reps = np.zeros((len(kept), clustering.features.shape[1]))
    chosen = np.zeros(len(kept), dtype=int)
    columns = np.zeros((n_students, fan_out, len(kept)))
    bias_shift = np.zeros((n_students, fan_out))
    for c, cluster in enumerate(kept):
        members = cluster.core
        owners = clustering.student[members]
        best = owners[np.argmin(rank[owners])]
        mine = members[owners == best]
        reps[c] = (clustering.sign[mine, None] * clustering.features[mine]).mean(0)
        chosen[c] = best
        for m in members:
            s, j = clustering.student[m], clustering.neuron[m]
            factor = clustering.scale[m] * (clustering.sign[m] if flips_outgoing else 1.0)
            columns[s, :, c] += factor * w_next[s, :, j]
            if act.symmetry == "odd_constant" and clustering.sign[m] < 0:
                bias_shift[s] += act.flip_constant * w_next[s, :, j]
    return reps, chosen, columns, bias_shift


def _replace_layer(layout: Layout, weights, biases, skip, layer, w_in, b_in, w_next, b_next):
    weights = list(weights)
    biases = list(biases)
    weights[layer], biases[layer] = w_in, b_in
    weights[layer + 1], biases[layer + 1] = w_next, b_next
    widths = list(layout.widths)
    widths[layer] = w_in.shape[-2]
    new = Layout(layout.d_in, tuple(widths), layout.d_out, layout.skip)
    return new, new.flatten(weights, biases, skip)


def write_shared_layer(students: StudentBatch, clustering: LayerClustering, losses,
                       keep_free: bool = False) -> StudentBatch:
    """Every student with hidden layer ``clustering.layer`` replaced by the clustered neurons.

    The clustered neurons become identical in all students; each student's next layer takes its
    own summed, sign-corrected outgoing weights (zero for clusters it has no member in). With
    ``keep_free``, each student also keeps its other (unclustered, unpruned) neurons after the
    shared ones, padded with pruned (all-zero) neurons to a common width: a consensus round,
    after which retraining can find the neurons that too few students agreed on.
    """
    reps, _, columns, bias_shift = _cluster_parts(students, clustering, losses)
    layer = clustering.layer
    weights, biases, skip = students.layout.unflatten(students.theta)
    like = dict(dtype=torch.float64, device=students.device)
    n = students.n_students
    w_in = torch.as_tensor(reps[:, :-1], **like).expand(n, -1, -1)
    b_in = torch.as_tensor(reps[:, -1], **like).expand(n, -1)
    w_next = torch.as_tensor(columns, **like)
    b_next = biases[layer + 1] + torch.as_tensor(bias_shift, **like)
    if keep_free:
        used = np.zeros((n, students.widths[layer]), dtype=bool)
        for cluster in clustering.kept:
            used[clustering.student[cluster.core], clustering.neuron[cluster.core]] = True
        used |= pruned_neurons(students.theta, students.layout)[layer].cpu().numpy()
        free = [np.flatnonzero(~used[s]) for s in range(n)]
        extra = max(len(f) for f in free)
        pad_in = torch.zeros(n, extra, w_in.shape[-1], **like)
        pad_b = torch.zeros(n, extra, **like)
        pad_out = torch.zeros(n, w_next.shape[1], extra, **like)
        for s, f in enumerate(free):
            pad_in[s, :len(f)] = weights[layer][s, f]
            pad_b[s, :len(f)] = biases[layer][s, f]
            pad_out[s, :, :len(f)] = weights[layer + 1][s][:, f]
        w_in = torch.cat([w_in, pad_in], 1)
        b_in = torch.cat([b_in, pad_b], 1)
        w_next = torch.cat([w_next, pad_out], 2)
    layout, theta = _replace_layer(students.layout, weights, biases, skip, layer, w_in, b_in,
                                   w_next, b_next)
    return StudentBatch(theta, layout, students.activation)


def refit_next_layer(shared: StudentBatch, original: StudentBatch, layer: int, X) -> StudentBatch:
    """``shared`` (:func:`write_shared_layer` of ``original`` at hidden layer ``layer``) with
    each student's next layer refitted by least squares: its incoming weights and biases on the
    shared neurons' activities over ``X`` are those that best reproduce what that layer received
    in the ``original`` student (its preactivations; for the output layer, its outputs less the
    linear term).

    Why (our addition): sharing a layer keeps, of each student's neurons, only its clusters'
    members; the others and their share of the next layer's input are dropped, and the students
    start their retraining far from the function they had. The refit gives that input back as
    well as the shared neurons can: on the standard MNIST deep teacher (whitened subspace,
    first layer shared after 1,400 epochs; ``benchmarks/mnist_deep.py``) the students'
    relative losses after sharing were 0.13-0.55 without it and 5e-4 to 8e-4 with it.
    """
    X = torch.as_tensor(X, dtype=torch.float64, device=shared.device)
    weights, biases, skip = shared.layout.unflatten(shared.theta)
    weights, biases = list(weights), list(biases)
    w_next, b_next = weights[layer + 1].clone(), biases[layer + 1].clone()
    ones = torch.ones(X.shape[0], 1, dtype=torch.float64, device=X.device)
    for s in range(shared.n_students):
        before, after = original.student(s), shared.student(s)
        target = before.hidden(X)[layer] @ before.weights[layer + 1].T + before.biases[layer + 1]
        design = torch.cat([after.hidden(X)[layer], ones], 1)
        solution = torch.linalg.lstsq(design, target, driver="gelsd").solution
        w_next[s], b_next[s] = solution[:-1].T, solution[-1]
    weights[layer + 1], biases[layer + 1] = w_next, b_next
    return StudentBatch(shared.layout.flatten(weights, biases, skip), shared.layout,
                        shared.activation)


def assemble_network(students: StudentBatch, clustering: LayerClustering, losses) -> MLP:
    """The recovered network, once the last hidden layer is clustered.

    Hidden layers below it must already be shared (identical in every student). The output
    weights of each neuron come from its chosen (lowest-loss) student.
    """
    reps, chosen, columns, bias_shift = _cluster_parts(students, clustering, losses)
    layer = clustering.layer
    weights, biases, skip = students.layout.unflatten(students.theta)
    first = int(np.argmin(losses)) if losses is not None else 0
    weights = [w[first] for w in weights]
    biases = [b[first] for b in biases]
    like = dict(dtype=torch.float64, device=students.device)
    w_out = torch.as_tensor(columns[chosen, :, np.arange(len(chosen))].T, **like)
    b_out = torch.as_tensor(bias_shift[first], **like) + biases[layer + 1]
    weights[layer] = torch.as_tensor(reps[:, :-1], **like)
    biases[layer] = torch.as_tensor(reps[:, -1], **like)
    weights[layer + 1] = w_out
    biases[layer + 1] = b_out
    skip_first = None if skip is None else torch.zeros_like(skip[first])
    return MLP(weights, biases, students.activation, skip=skip_first, device=students.device)


def align_output_bias(net: MLP, X: torch.Tensor, y: torch.Tensor) -> MLP:
    """Shift the output bias so that the mean output matches the mean target."""
    net = net.copy()
    net.biases[-1].add_((y - net(X)).mean(0))
    return net


def fit_linear_term(net: MLP, X: torch.Tensor, y: torch.Tensor) -> MLP:
    """Fit the input-to-output linear term and output bias to the residual, by least squares."""
    net = net.with_skip()
    residual = y - net(X)
    design = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype, device=X.device)], dim=1)
    coef = torch.linalg.lstsq(design.cpu(), residual.cpu()).solution.to(X.device)
    net.skip.add_(coef[:-1].T)
    net.biases[-1].add_(coef[-1])
    return net


def finetune(net: MLP, X: torch.Tensor, y: torch.Tensor, max_iter: int = 300, patience: int = 20,
             progress: bool = False) -> tuple[MLP, float]:
    """Levenberg-Marquardt on the one network until its loss floor; returns (network, rel. loss).

    The dense variant for small networks, the matrix-free one where ``choose_finisher`` says so
    (a 784-16-10 MNIST network has 12,730 parameters: its dense Gauss-Newton matrix alone would
    take minutes per iteration to build)."""
    finisher = choose_finisher(net.layout, 1, X.shape[0], X.shape[0], X.device)
    finish = matfree.matfree_levenberg_marquardt if finisher == "matfree" else levenberg_marquardt
    theta, rel, _ = finish(net.theta[None], net.layout, net.activation, X, y, max_iter=max_iter,
                           patience=patience, progress=progress, desc="fine-tune")
    return MLP.from_flat(theta[0], net.layout, net.activation), float(rel[0])


def widen_last_layer(net: MLP, X: torch.Tensor, y: torch.Tensor, extra: int, seed: int = 0) -> MLP:
    """``net`` with ``extra`` fresh neurons in its last hidden layer: incoming weights
    ``N(0, 1/fan_in)`` and biases ``N(0, 1)`` (as :func:`eandc.training.init_students` draws
    them), outgoing weights fitted by least squares to what ``net`` leaves of ``y`` (so the
    widened network fits the queries at least as well as ``net``)."""
    if not (isinstance(extra, int) and extra >= 1):
        raise ValueError(f"extra must be a positive integer, got {extra!r}")
    layer = net.n_hidden_layers - 1
    weights, biases = list(net.weights), list(net.biases)
    fan_in = weights[layer].shape[1]
    gen = torch.Generator().manual_seed(int(seed))
    like = dict(dtype=torch.float64, device=net.device)
    w_new = (torch.randn(extra, fan_in, generator=gen, dtype=torch.float64) / fan_in ** 0.5).to(net.device)
    b_new = torch.randn(extra, generator=gen, dtype=torch.float64).to(net.device)
    below = X.to(**like) if layer == 0 else net.hidden(X)[layer - 1]
    h_new = net.activation(below @ w_new.T + b_new)
    h_centred = h_new - h_new.mean(0)
    residual = y.to(**like) - net(X)
    # normal equations: torch.linalg.lstsq's result depends on the buffers' memory alignment in
    # its last bits on CPU, which would break bitwise reproducible runs
    gram = h_centred.T @ h_centred
    gram += 1e-12 * gram.diagonal().mean().clamp_min(1e-300) * torch.eye(extra, **like)
    a_new = torch.linalg.solve(gram, h_centred.T @ (residual - residual.mean(0)))
    weights[layer] = torch.cat([weights[layer], w_new])
    biases[layer] = torch.cat([biases[layer], b_new])
    weights[layer + 1] = torch.cat([weights[layer + 1], a_new.T], dim=1)
    biases[layer + 1] = biases[layer + 1] + residual.mean(0) - h_new.mean(0) @ a_new
    return MLP(weights, biases, net.activation, skip=net.skip, device=net.device)


# ---------------------------------------------------------------------------------------------
# Pruning: neurons the function does not need, found after fine-tuning.

def drop_pruned_neurons(net: MLP) -> MLP:
    """The network without its pruned neurons (exact zeros in, bias and out)."""
    masks = pruned_neurons(net.theta[None], net.layout)
    weights, biases = list(net.weights), list(net.biases)
    for layer, mask in enumerate(masks):
        keep = ~mask[0]
        weights[layer], biases[layer] = weights[layer][keep], biases[layer][keep]
        weights[layer + 1] = weights[layer + 1][:, keep]
    return MLP(weights, biases, net.activation, skip=net.skip, device=net.device)


def _without(net: MLP, X: torch.Tensor, layer: int, j: int, into: int | None) -> MLP:
    """``net`` with neuron ``j`` of hidden ``layer`` silenced (its mean output moved into the next
    bias) or, when ``into`` is given, merged into that neuron (see ``merge_neurons``)."""
    theta = net.theta.clone()[None]
    weights, biases, skip = net.layout.unflatten(theta)
    w, b = weights[layer][0], biases[layer][0]
    w_next, b_next = weights[layer + 1][0], biases[layer + 1][0]
    if into is None:
        b_next += w_next[:, j] * net.hidden(X)[layer][:, j].mean()
        zero_neuron(w, b, w_next, j)
    else:
        sign = 1.0 if float(torch.dot(torch.cat([w[j], b[j:j + 1]]),
                                      torch.cat([w[into], b[into:into + 1]]))) > 0 else -1.0
        shallow_skip = skip[0] if skip is not None and net.n_hidden_layers == 1 else None
        merge_neurons(net.activation, w, b, w_next, b_next, j, into, sign, shallow_skip)
    return drop_pruned_neurons(MLP.from_flat(theta[0], net.layout, net.activation))


def _candidates(net: MLP, X: torch.Tensor, tol: float):
    """Removals worth trying, most promising first: (score, layer, j, into)."""
    act = net.activation
    out = []
    posts = net.hidden(X)
    for layer, h in enumerate(posts):
        contribution = net.weights[layer + 1].norm(dim=0) * h.std(0)
        contribution = contribution / contribution.max().clamp_min(1e-300)
        if net.layout.skip and layer == len(posts) - 1:  # linear on the data: the linear term's job
            design = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype, device=X.device)], 1)
            fit = design @ torch.linalg.lstsq(design, h).solution
            nonlinear = (h - fit).norm(dim=0) / (h - h.mean(0)).norm(dim=0).clamp_min(1e-300)
            for j in range(h.shape[1]):
                if nonlinear[j] < tol and contribution[j] >= tol:
                    out.append((float(nonlinear[j]), layer, j, None))
        v = torch.cat([net.weights[layer], net.biases[layer][:, None]], dim=1)
        unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        cos = unit @ unit.T
        dist = 1 - (cos.abs() if act.has_sign_symmetry else cos)
        dist.fill_diagonal_(float("inf"))
        for j in range(h.shape[1]):
            if contribution[j] < tol:  # (nearly) constant or silent
                out.append((float(contribution[j]), layer, j, None))
            k = int(dist[j].argmin()) if h.shape[1] > 1 else None
            if k is not None and dist[j, k] < tol:  # (nearly) a duplicate of neuron k
                out.append((float(dist[j, k]), layer, j, k))
    out.sort(key=lambda item: item[0])
    return out


def prune(net: MLP, X: torch.Tensor, y: torch.Tensor, *, tol: float = 1e-2,
          max_trials: int | None = None, loss: float | None = None,
          progress: bool = False) -> tuple[MLP, float, list[str]]:
    """Remove neurons that the function does not need; return (network, rel. loss, log lines).

    Candidates are silent or constant neurons (relative contribution below ``tol``),
    near-duplicates (cosine distance below ``tol``, up to the activation's symmetry) and, where
    the network has a linear term, neurons whose output is linear on the queries (relative
    residual of a linear fit below ``tol``: a ReLU active on every query, say). A
    candidate is removed, its effect folded into the next layer (and the linear term refitted
    where the activation has one), the network fine-tuned, and the removal kept only if the
    relative loss stays at the floor: below ``max(1e-20, 10 * loss before)``. Removing a neuron
    that the function needs raises the loss by orders of magnitude, so the test is sharp, and
    ``tol`` only decides which removals are worth trying. ``loss``: the relative loss of ``net``
    when it is already fine-tuned (otherwise it is fine-tuned first).
    """
    if loss is None:
        net, loss = finetune(net, X, y, progress=progress)
    notes = []
    trials = 0
    max_trials = max_trials if max_trials is not None else 2 * sum(net.widths)
    changed = True
    while changed and trials < max_trials:
        changed = False
        tried = set()
        for score, layer, j, into in _candidates(net, X, tol):
            if (layer, j) in tried or trials >= max_trials or net.widths[layer] == 1:
                continue  # a layer keeps at least one neuron
            tried.add((layer, j))
            trials += 1
            trial = _without(net, X, layer, j, into)
            if trial.layout.skip and layer == len(net.widths) - 1:
                trial = fit_linear_term(trial, X, y)
            trial, trial_loss = finetune(trial, X, y, progress=progress)
            what = f"layer {layer + 1} neuron {j}" + (f" merged into {into}" if into is not None else "")
            if trial_loss <= max(1e-20, 10 * loss):
                notes.append(f"removed {what} (score {score:.1e}): loss {loss:.1e} -> {trial_loss:.1e}")
                net, loss, changed = trial, trial_loss, True
                break
            notes.append(f"kept {what} (score {score:.1e}): removal gives loss {trial_loss:.1e}")
    for line in notes:
        log.info("prune: %s", line)
    return net, loss, notes
