"""eandc.plotting draws what the clustering and the comparison computed (headless: Agg)."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.patches import Rectangle

import eandc
from eandc import plotting
from eandc.clustering import cluster_layer
from eandc.symmetries import flip_neuron, permute_neurons


@pytest.fixture(scope="module")
def recovered():
    """Five permuted, partly flipped copies of a tanh teacher and one unrelated network (a
    student that failed): clustered as students, they give the teacher's 3 neurons."""
    teacher = eandc.random_teacher(2, [3], activation="tanh", seed=0)
    rng = np.random.default_rng(0)
    copies = []
    for _ in range(5):
        copy = permute_neurons(teacher, 0, rng.permutation(3))
        copies.append(flip_neuron(copy, 0, int(rng.integers(3))))
    copies.append(eandc.random_teacher(2, [3], activation="tanh", seed=7))  # a student that failed
    clustering = cluster_layer(eandc.StudentBatch.from_networks(copies), 0)
    comparison = eandc.compare(teacher, copies[0], eandc.gaussian_inputs(200, 2, seed=1))
    return clustering, comparison


def test_set_style_sets_the_figure_defaults():
    plotting.set_style()
    assert tuple(plt.rcParams["figure.figsize"]) == (6.4, 4.0)
    assert plt.rcParams["axes.grid"]


def test_distance_matrix_outlines_each_cluster(recovered):
    clustering, _ = recovered
    ax = plotting.plot_distance_matrix(clustering)
    outlines = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert len(outlines) == len(clustering.clusters)
    assert sum(p.get_width() for p in outlines) == len(clustering.labels)
    plt.close("all")


def test_dendrogram_draws_the_cut_and_the_stable_band(recovered):
    clustering, _ = recovered
    low, high = plotting.cut_range(clustering)
    assert low == clustering.cut_height < high
    ax = plotting.plot_dendrogram(clustering)
    cut = [line for line in ax.get_lines() if line.get_label().startswith("cut height")]
    y = math.log10(max(low, plotting.FLOOR) / plotting.FLOOR)
    assert len(cut) == 1 and cut[0].get_ydata()[0] == pytest.approx(y)
    plt.close("all")


def test_cluster_angles_one_bar_per_cluster_and_beta(recovered):
    clustering, _ = recovered
    assert clustering.width == 3
    table = plotting.cluster_table(clustering)
    assert list(table["status"]).count("kept") == 3
    ax = plotting.plot_cluster_angles(clustering)
    assert len(ax.patches) == len(clustering.clusters)
    assert ax.get_yscale() == "log"
    assert any(line.get_ydata()[0] == pytest.approx(30.0) for line in ax.get_lines())
    plt.close("all")


def test_neuron_distances_one_bar_per_teacher_neuron_on_a_log_axis(recovered):
    _, comparison = recovered
    ax = plotting.plot_neuron_distances(comparison, tolerance=1e-10)
    bars = [p for p in ax.patches if p.get_height() > 0]
    assert len(bars) == 3 and ax.get_yscale() == "log"
    assert all(b.get_height() >= plotting.FLOOR for b in bars)  # zeros are drawn at the floor
    plt.close("all")
