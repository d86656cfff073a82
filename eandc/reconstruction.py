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

from .clustering import LayerClustering
from .mlp import MLP, Layout, StudentBatch
from .training import levenberg_marquardt

__all__ = ["write_shared_layer", "assemble_network", "fit_linear_term", "align_output_bias",
           "finetune", "prune", "relative_loss"]

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


def write_shared_layer(students: StudentBatch, clustering: LayerClustering, losses) -> StudentBatch:
    """Every student with hidden layer ``clustering.layer`` replaced by the clustered neurons.

    The layer becomes identical in all students; each student's next layer takes its own
    summed, sign-corrected outgoing weights (zero for clusters it has no member in).
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
    layout, theta = _replace_layer(students.layout, weights, biases, skip, layer, w_in, b_in,
                                   w_next, b_next)
    return StudentBatch(theta, layout, students.activation)


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


def relative_loss(net: MLP, X: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error over the variance of the targets."""
    var = float(y.var(dim=0, unbiased=False).mean()) or 1.0
    return float((net(X) - y).square().mean()) / var


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
    """Levenberg-Marquardt on the one network until its loss floor; returns (network, rel. loss)."""
    theta, rel, _ = levenberg_marquardt(net.theta[None], net.layout, net.activation, X, y,
                                        max_iter=max_iter, patience=patience, progress=progress,
                                        desc="fine-tune")
    return MLP.from_flat(theta[0], net.layout, net.activation), float(rel[0])


# ---------------------------------------------------------------------------------------------
# Pruning: neurons the function does not need, found after fine-tuning.

def _remove(net: MLP, layer: int, j: int, into: int | None = None, factor: float = 1.0,
            bias_shift=None) -> MLP:
    """``net`` without neuron ``j`` of hidden ``layer``; its outgoing weights times ``factor``
    are added to neuron ``into`` (if given) and ``bias_shift`` to the next layer's bias."""
    weights = [w.clone() for w in net.weights]
    biases = [b.clone() for b in net.biases]
    w_next = weights[layer + 1]
    if into is not None:
        w_next[:, into] += factor * w_next[:, j]
    if bias_shift is not None:
        biases[layer + 1] += bias_shift
    keep = [k for k in range(w_next.shape[1]) if k != j]
    weights[layer] = weights[layer][keep]
    biases[layer] = biases[layer][keep]
    weights[layer + 1] = w_next[:, keep]
    return MLP(weights, biases, net.activation, skip=net.skip, device=net.device)


def _candidates(net: MLP, X: torch.Tensor, tol: float):
    """Removals worth trying, most promising first: (score, layer, j, into, factor, bias_shift)."""
    act = net.activation
    out = []
    posts = net.hidden(X)
    for layer, h in enumerate(posts):
        w_next = net.weights[layer + 1]
        mean = h.mean(0)
        contribution = w_next.norm(dim=0) * h.std(0)
        contribution = contribution / contribution.max().clamp_min(1e-300)
        v = torch.cat([net.weights[layer], net.biases[layer][:, None]], dim=1)
        norms = v.norm(dim=1).clamp_min(1e-300)
        cos = (v @ v.T) / (norms[:, None] * norms[None, :])
        for j in range(h.shape[1]):
            if contribution[j] < tol:  # (nearly) constant or silent: fold into the next bias
                out.append((float(contribution[j]), layer, j, None, 1.0, w_next[:, j] * mean[j]))
            for k in range(h.shape[1]):
                if k == j:
                    continue
                c = float(cos[j, k])
                same = 1 - (abs(c) if act.has_sign_symmetry else c)
                if same >= tol:
                    continue
                sign = 1.0 if c > 0 else -1.0
                factor = sign if act.symmetry in ("odd", "odd_constant") else 1.0
                if act.has_scaling_symmetry:
                    factor = float(norms[j] / norms[k])
                shift = None
                if act.symmetry == "odd_constant" and sign < 0:
                    shift = act.flip_constant * w_next[:, j]
                out.append((same, layer, j, k, factor, shift))
    out.sort(key=lambda item: item[0])
    return out


def prune(net: MLP, X: torch.Tensor, y: torch.Tensor, *, tol: float = 1e-4, max_trials: int | None = None,
          progress: bool = False) -> tuple[MLP, float, list[str]]:
    """Remove neurons that the function does not need; return (network, rel. loss, log lines).

    Candidates are silent or constant neurons (relative contribution below ``tol``) and
    duplicates (cosine distance below ``tol``, up to the activation's symmetry). A candidate is
    removed, its effect folded into the next layer (and the linear term refitted where the
    activation has one), the network fine-tuned, and the removal kept only if the relative
    loss stays at the floor: below ``max(1e-20, 10 * loss before)``. Removing a neuron that
    the function needs raises the loss by many orders of magnitude, so the test is sharp.
    """
    net, loss = finetune(net, X, y)
    notes = []
    trials = 0
    max_trials = max_trials if max_trials is not None else 3 * sum(net.widths)
    changed = True
    while changed and trials < max_trials:
        changed = False
        tried = set()
        for score, layer, j, into, factor, shift in _candidates(net, X, tol):
            if (layer, j) in tried or trials >= max_trials:
                continue
            tried.add((layer, j))
            trials += 1
            trial = _remove(net, layer, j, into, factor, shift)
            if trial.layout.skip and layer == len(net.widths) - 1:
                trial = fit_linear_term(trial, X, y)
            trial, trial_loss = finetune(trial, X, y)
            what = f"layer {layer} neuron {j}" + (f" merged into {into}" if into is not None else "")
            if trial_loss <= max(1e-20, 10 * loss):
                notes.append(f"removed {what} (score {score:.1e}): loss {loss:.1e} -> {trial_loss:.1e}")
                net, loss, changed = trial, trial_loss, True
                break
            notes.append(f"kept {what} (score {score:.1e}): removal gives loss {trial_loss:.1e}")
    for line in notes:
        log.info("prune: %s", line)
    return net, loss, notes

