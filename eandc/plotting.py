"""Figures of a recovery, for the book and for notebooks: one style, four plots.

:func:`set_style` is the one place the look of every figure is set (seaborn theme, palette,
size, resolution); notebooks call it once. The plots read what the package already returns:

* :func:`plot_distance_matrix`: pairwise distances between the clustered neurons (a
  :class:`~eandc.clustering.LayerClustering`), rows and columns in dendrogram order, with the
  clusters at the cut outlined;
* :func:`plot_dendrogram`: the average-linkage tree, the cut height, and the range of heights
  over which the cut would give the same clusters;
* :func:`plot_cluster_angles`: each cluster's median angle against the threshold ``beta``;
* :func:`plot_neuron_distances`: each teacher neuron's cosine distance to its recovered match
  (a :class:`~eandc.compare.Comparison`), on a log axis.

Each returns the matplotlib ``Axes`` it drew on; pass ``ax`` to draw into an existing figure.
Values of exactly zero cannot sit on a log axis: they are drawn at ``FLOOR`` and said so in
the axis label.
"""

from __future__ import annotations

import logging
import math

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.patches import Rectangle
from scipy.cluster.hierarchy import dendrogram, leaves_list
from scipy.spatial.distance import squareform

from .clustering import LayerClustering
from .compare import Comparison

__all__ = ["set_style", "plot_distance_matrix", "plot_dendrogram", "plot_cluster_angles",
           "plot_neuron_distances", "FLOOR"]

log = logging.getLogger(__name__)

FLOOR = 1e-17  # where exact zeros are drawn on log axes (float64 rounding is ~1e-16)
KEPT, DROPPED = "kept", "dropped"


def set_style(context: str = "notebook") -> None:
    """Apply the eandc figure style (seaborn ``whitegrid``, colour-blind palette, 6.4 x 4 inch
    figures at 100 dpi, compact titles). ``context`` is seaborn's scale: ``paper``,
    ``notebook``, ``talk`` or ``poster``."""
    sns.set_theme(context=context, style="whitegrid", palette="colorblind",
                  rc={"figure.figsize": (6.4, 4.0), "figure.dpi": 100, "savefig.dpi": 100,
                      "axes.titlesize": "medium", "axes.titleweight": "bold",
                      "figure.constrained_layout.use": True})


def _axes(ax):
    return ax if ax is not None else plt.figure().add_subplot()


def _kept_colours():
    palette = sns.color_palette()
    return {KEPT: palette[0], DROPPED: palette[3]}


def plot_distance_matrix(clustering: LayerClustering, ax=None):
    """Heat map of the pairwise distances used for clustering (log colour scale: copies of one
    neuron are ~1e-16 apart, distinct neurons ~1), in dendrogram order; the clusters at the cut
    are outlined (kept ones in the first palette colour, dropped ones in red)."""
    ax = _axes(ax)
    order = leaves_list(clustering.linkage) if len(clustering.linkage) else np.arange(1)
    D = squareform(clustering.distances)[np.ix_(order, order)]
    sns.heatmap(np.log10(np.maximum(D, FLOOR)), ax=ax, cmap="mako_r", square=True,
                xticklabels=False, yticklabels=False, vmin=math.log10(FLOOR),
                cbar_kws={"label": f"log10 distance (0 drawn at {FLOOR:.0e})", "shrink": 0.8})
    colours = _kept_colours()
    labels = clustering.labels[order]
    start = 0
    for end in range(1, len(labels) + 1):
        if end == len(labels) or labels[end] != labels[start]:
            kept = clustering.clusters[labels[start]].kept
            ax.add_patch(Rectangle((start, start), end - start, end - start, fill=False, lw=1.5,
                                   edgecolor=colours[KEPT if kept else DROPPED]))
            start = end
    ax.set_xlabel(f"{len(labels)} neurons of all students, dendrogram order")
    ax.set_ylabel("neurons")
    ax.set_title(f"Layer {clustering.layer + 1}: distances between incoming vectors")
    return ax


def cut_range(clustering: LayerClustering) -> tuple[float, float]:
    """(height of the last merge kept, height of the next merge): any cut height between the
    two gives the same clusters."""
    Z = clustering.linkage
    nxt = float(Z[clustering.cut_index + 1, 2]) if clustering.cut_index + 1 < len(Z) else math.inf
    return clustering.cut_height, nxt


def plot_dendrogram(clustering: LayerClustering, ax=None):
    """The average-linkage dendrogram with merge heights on a log axis (copies of one neuron
    merge at ~1e-16, distinct neurons at ~1), the cut height (solid line) and the band of
    heights that would give the same clusters (shaded). Heights of zero sit at ``FLOOR``."""
    ax = _axes(ax)
    Z = np.array(clustering.linkage, dtype=float)
    low, high = cut_range(clustering)
    decades = lambda h: np.log10(np.maximum(h, FLOOR) / FLOOR)  # noqa: E731 (height -> y)
    Z[:, 2] = decades(Z[:, 2])
    top = float(Z[:, 2].max()) if len(Z) else 1.0
    with plt.rc_context({"lines.linewidth": 1.0}):
        dendrogram(Z, ax=ax, no_labels=True, color_threshold=decades(low) + 1e-9,
                   above_threshold_color="grey")
    ax.axhspan(decades(low), min(decades(high), top + 1), color=sns.color_palette()[2], alpha=0.15,
               label="same clusters")
    ax.axhline(decades(low), color="black", lw=1.2, label=f"cut height {low:.1e}")
    ax.set_ylim(0, top + 1)
    ticks = np.arange(0, top + 1, 2 if top < 12 else 4)
    ax.set_yticks(ticks, [f"1e{int(t + math.log10(FLOOR))}" for t in ticks])
    ax.set_ylabel(f"merge height (log; 0 drawn at {FLOOR:.0e})")
    ax.set_xlabel(f"{len(clustering.labels)} neurons")
    ax.set_title(f"Layer {clustering.layer + 1}: average-linkage dendrogram")
    ax.legend(loc="upper left", frameon=True)
    return ax


def cluster_table(clustering: LayerClustering):
    """One row per cluster at the cut: students, members, median angle (radians and degrees),
    kept or dropped and why; largest clusters first. A :class:`pandas.DataFrame`."""
    import pandas as pd

    rows = [{"cluster": i, "students": c.n_students, "members": len(c.members),
             "median angle (rad)": c.median_angle,
             "median angle (deg)": math.degrees(c.median_angle),
             "status": KEPT if c.kept else DROPPED, "reason": c.reason}
            for i, c in enumerate(clustering.clusters)]
    table = pd.DataFrame(rows).sort_values(["students", "members"], ascending=False, kind="stable")
    return table.reset_index(drop=True)


def plot_cluster_angles(clustering: LayerClustering, ax=None):
    """Each cluster's median pairwise angle (degrees, log axis) against ``beta``; bars coloured by
    kept or dropped, labelled with the number of students the cluster holds."""
    ax = _axes(ax)
    table = cluster_table(clustering)
    table["angle"] = np.maximum(table["median angle (deg)"], math.degrees(FLOOR))
    table["label"] = [f"{s}" for s in table["students"]]
    x = np.arange(len(table))
    colours = _kept_colours()
    ax.bar(x, table["angle"], color=[colours[s] for s in table["status"]], width=0.7)
    ax.set_yscale("log")
    ax.axhline(math.degrees(clustering.beta), color="black", ls="--", lw=1.2,
               label=f"beta = {math.degrees(clustering.beta):.0f} deg")
    ax.set_xticks(x, table["label"], fontsize="small")
    ax.set_xlabel(f"clusters, labelled by their number of students (keep: >= {clustering.min_students})")
    ax.set_ylabel(f"median angle (deg; 0 drawn at {math.degrees(FLOOR):.0e})")
    ax.set_ylim(math.degrees(FLOOR) / 3, 1e3)
    handles = [Rectangle((0, 0), 1, 1, color=colours[k]) for k in (KEPT, DROPPED)]
    handles.append(ax.get_lines()[-1])
    ax.legend(handles, [KEPT, DROPPED, handles[-1].get_label()], loc="upper left")
    ax.set_title(f"Layer {clustering.layer + 1}: median angle of each cluster")
    return ax


def plot_neuron_distances(comparison: Comparison, ax=None, tolerance: float = 1e-10):
    """Cosine distance between each teacher neuron and its recovered match, per layer, on a log
    axis, with the tolerance that counts as exact."""
    ax = _axes(ax)
    distances, names, layers = [], [], []
    for layer in comparison.layers:
        for i, d in enumerate(layer.distances):
            distances.append(max(float(d), FLOOR))
            names.append(f"{i + 1}")
            layers.append(f"layer {layer.layer + 1}")
    sns.barplot(x=np.arange(len(distances)), y=distances, hue=layers, ax=ax, dodge=False,
                legend=len(comparison.layers) > 1)
    ax.set_yscale("log")
    ax.set_ylim(FLOOR / 3, 10)
    ax.axhline(tolerance, color="black", ls="--", lw=1.2, label=f"exact below {tolerance:.0e}")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_xlabel("teacher neuron")
    ax.set_ylabel(f"cosine distance (0 drawn at {FLOOR:.0e})")
    ax.legend(loc="upper left")
    ax.set_title("Each teacher neuron against its recovered match")
    return ax
