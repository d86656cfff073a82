"""How well a recovered network matches its teacher: widths, per-neuron alignment, function error.

For each hidden layer and each teacher neuron, :func:`compare` finds the recovered neuron whose
incoming vector ``[w; b]`` is closest in cosine distance, up to the activation's symmetry
(``1 - cos`` for ``g``, ``1 - |cos|`` for the classes with a sign flip; scale does not enter
a cosine). In deeper layers the incoming coordinates refer to the layer below, whose neurons are
permuted, sign-flipped or rescaled in the recovered network; the teacher's vector is first moved
into the recovered network's coordinates through the matches found for the layer below.

The outgoing-weight error is ``|a_rec - a_teacher| / |a_teacher|`` for the matched neuron of the
last hidden layer, after undoing sign and scale. Excess neurons are recovered neurons that are
no teacher neuron's best match. :func:`silent_neurons` names the neurons whose output is the same
on every input given: on the queries, no recovery can see their incoming weights. RMSE and
relative RMSE (RMSE over the standard deviation of the teacher's outputs) are measured on the
inputs given, which should be held out from the queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .mlp import MLP
from .teachers import check_inputs

__all__ = ["compare", "Comparison", "LayerComparison", "silent_neurons"]


@dataclass
class LayerComparison:
    """Alignment of one hidden layer: one entry per teacher neuron, plus the excess neurons."""

    layer: int
    teacher_width: int
    recovered_width: int
    distances: np.ndarray
    matches: np.ndarray
    signs: np.ndarray
    excess: list[int]
    outgoing_errors: np.ndarray | None = None

    @property
    def max_distance(self) -> float:
        return float(self.distances.max())

    @property
    def median_distance(self) -> float:
        return float(np.median(self.distances))


@dataclass
class Comparison:
    """The result of :func:`compare`."""

    teacher_widths: list[int]
    recovered_widths: list[int]
    layers: list[LayerComparison]
    rmse: float
    relative_rmse: float
    extra: dict = field(default_factory=dict)

    @property
    def widths_match(self) -> bool:
        return self.teacher_widths == self.recovered_widths

    @property
    def max_distance(self) -> float:
        return max(layer.max_distance for layer in self.layers)

    def exact(self, distance_tol: float = 1e-6, rmse_tol: float = 1e-6) -> bool:
        """Widths equal, every teacher neuron matched within ``distance_tol``, function within
        ``rmse_tol`` relative RMSE."""
        return self.widths_match and self.max_distance <= distance_tol and \
            self.relative_rmse <= rmse_tol

    def to_dict(self) -> dict:
        return {
            "teacher_widths": self.teacher_widths,
            "recovered_widths": self.recovered_widths,
            "widths_match": self.widths_match,
            "max_cosine_distance": [layer.max_distance for layer in self.layers],
            "median_cosine_distance": [layer.median_distance for layer in self.layers],
            "excess_neurons": [len(layer.excess) for layer in self.layers],
            "max_outgoing_error": (float(self.layers[-1].outgoing_errors.max())
                                   if self.layers[-1].outgoing_errors is not None else None),
            "rmse": self.rmse,
            "relative_rmse": self.relative_rmse,
        }

    def summary(self) -> str:
        lines = [f"teacher widths     {self.teacher_widths}",
                 f"recovered widths   {self.recovered_widths}"
                 f"{'  (exact)' if self.widths_match else '  (differ)'}"]
        for layer in self.layers:
            lines.append(f"layer {layer.layer + 1}: cosine distance max {layer.max_distance:.2e}, "
                         f"median {layer.median_distance:.2e}; excess neurons {len(layer.excess)}")
        last = self.layers[-1]
        if last.outgoing_errors is not None:
            lines.append(f"outgoing weights: max relative error {last.outgoing_errors.max():.2e}")
        lines.append(f"held-out RMSE {self.rmse:.2e}, relative RMSE {self.relative_rmse:.2e}")
        return "\n".join(lines)


def _incoming(net: MLP, layer: int) -> np.ndarray:
    w = net.weights[layer].detach().cpu().numpy()
    b = net.biases[layer].detach().cpu().numpy()
    return np.concatenate([w, b[:, None]], axis=1)


def _to_recovered_coordinates(teacher_rows: np.ndarray, below: LayerComparison, width: int,
                              act, scales: np.ndarray) -> np.ndarray:
    """Teacher incoming vectors expressed on the recovered layer below (see the module doc)."""
    moved = np.zeros((len(teacher_rows), width + 1))
    moved[:, -1] = teacher_rows[:, -1]
    for i, (k, s) in enumerate(zip(below.matches, below.signs)):
        w = teacher_rows[:, i]
        if act.symmetry == "odd":
            moved[:, k] += s * w
        elif act.symmetry == "odd_constant":
            moved[:, k] += s * w
            if s < 0:
                moved[:, -1] += act.flip_constant * w
        elif act.has_scaling_symmetry:
            moved[:, k] += w / scales[i]
        else:
            moved[:, k] += w
    return moved


def compare(teacher: MLP, recovered: MLP, X, feature_mask=None) -> Comparison:
    """Compare ``recovered`` with ``teacher`` (both :class:`~eandc.MLP`) on held-out inputs ``X``.

    ``feature_mask``: boolean ``(d_in,)``, the inputs whose first-layer weights enter the cosine
    distances (the bias always does); the others, for example pixels that never varied in the
    queries, are weights the queries could not determine. ``None``: every input.
    """
    if not isinstance(teacher, MLP) or not isinstance(recovered, MLP):
        raise TypeError("compare needs two eandc.MLP networks (use MLP.load for saved ones)")
    if teacher.activation.name != recovered.activation.name:
        raise ValueError(f"activations differ: teacher {teacher.activation.name}, recovered "
                         f"{recovered.activation.name}")
    if teacher.n_hidden_layers != recovered.n_hidden_layers:
        raise ValueError(f"depths differ: teacher has {teacher.n_hidden_layers} hidden layers, "
                         f"recovered {recovered.n_hidden_layers}")
    if (teacher.d_in, teacher.d_out) != (recovered.d_in, recovered.d_out):
        raise ValueError("input or output widths differ between teacher and recovered network")
    act = teacher.activation
    X = check_inputs(X, name="held-out inputs")
    keep = None
    if feature_mask is not None:
        keep = np.asarray(feature_mask)
        if keep.dtype != bool or keep.shape != (teacher.d_in,):
            raise ValueError(f"feature_mask must be a boolean array of shape ({teacher.d_in},)")
        keep = np.append(keep, True)  # the bias
    layers, below, scales = [], None, None
    for layer in range(teacher.n_hidden_layers):
        t_rows = _incoming(teacher, layer)
        r_rows = _incoming(recovered, layer)
        if below is not None:
            t_rows = _to_recovered_coordinates(t_rows, below, recovered.widths[layer - 1], act, scales)
        elif keep is not None:
            t_rows, r_rows = t_rows[:, keep], r_rows[:, keep]
        t_norm = np.linalg.norm(t_rows, axis=1)
        r_norm = np.linalg.norm(r_rows, axis=1)
        cos = (t_rows @ r_rows.T) / np.maximum(t_norm[:, None] * r_norm[None, :], 1e-300)
        dist = 1 - (np.abs(cos) if act.has_sign_symmetry else cos)
        matches = dist.argmin(axis=1)
        rows = np.arange(len(matches))
        distances = np.clip(dist[rows, matches], 0.0, 2.0)
        signs = np.where(cos[rows, matches] < 0, -1.0, 1.0) if act.has_sign_symmetry else np.ones(len(rows))
        scales = r_norm[matches] / np.maximum(t_norm, 1e-300)
        excess = sorted(set(range(recovered.widths[layer])) - set(matches.tolist()))
        below = LayerComparison(layer, teacher.widths[layer], recovered.widths[layer], distances,
                                matches, signs, excess)
        layers.append(below)

    last = layers[-1]
    a_t = teacher.weights[-1].detach().cpu().numpy()
    a_r = recovered.weights[-1].detach().cpu().numpy()[:, last.matches]
    if act.symmetry in ("odd", "odd_constant"):
        a_r = a_r * last.signs
    if act.has_scaling_symmetry:
        a_r = a_r * scales
    last.outgoing_errors = np.linalg.norm(a_r - a_t, axis=0) / np.maximum(np.linalg.norm(a_t, axis=0), 1e-300)

    with torch.no_grad():
        f_t = teacher(X.to(teacher.device)).cpu()
        f_r = recovered(X.to(recovered.device)).cpu()
    rmse = float((f_t - f_r).square().mean().sqrt())
    spread = float(f_t.var(dim=0, unbiased=False).mean().sqrt()) or 1.0
    return Comparison(teacher.widths, recovered.widths, layers, rmse, rmse / spread)


def silent_neurons(network: MLP, X) -> list[list[int]]:
    """Per hidden layer, the neurons of ``network`` whose output is the same on every row of ``X``
    (a ReLU neuron inactive on all of them, for example). On queries ``X`` such a neuron adds a
    constant: the queries say nothing of its incoming weights, so no recovery from them can find
    it (the next layer's biases absorb it)."""
    if not isinstance(network, MLP):
        raise TypeError("silent_neurons needs an eandc.MLP network (use MLP.load for a saved one)")
    X = check_inputs(X)
    if X.shape[1] != network.d_in:
        raise ValueError(f"X has {X.shape[1]} columns, the network {network.d_in} inputs")
    with torch.no_grad():
        hidden = network.hidden(X.to(network.device))
    return [torch.nonzero(h.amax(0) == h.amin(0)).flatten().tolist() for h in hidden]
