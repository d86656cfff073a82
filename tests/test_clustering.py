"""Clustering against hand-built students whose answer is known."""

import math

import numpy as np
import pytest
import torch

from eandc import clustering as clustering_module
from eandc import random_teacher
from eandc.activations import get_activation
from eandc.clustering import (
    ablation_effects,
    all_one_neuron,
    choose_cut,
    cluster_layer,
    dense_core,
    min_students,
    pairwise_distances,
    preactivation_metric,
    silent_neurons,
    undetermined_neurons,
)
from eandc.mlp import Layout, StudentBatch


def planted_students(teacher, n_students, width, seed=0, noise=1e-7):
    """Students computing the teacher's function (up to ``noise`` on the incoming weights),
    each holding every teacher neuron in a random slot, some split into duplicates, some
    sign-flipped or rescaled where the activation allows it, plus zero-output neurons and
    cancelling pairs. Returns the batch and, per row, the planted teacher neuron (-1: junk)."""
    rng = np.random.default_rng(seed)
    act = teacher.activation
    W, b, A, c = (teacher.weights[0].numpy(), teacher.biases[0].numpy(),
                  teacher.weights[1].numpy(), teacher.biases[1].numpy())
    k, d = W.shape
    thetas, origin = [], []
    layout = Layout(teacher.d_in, (width,), teacher.d_out, act.leaves_linear_term)
    for _ in range(n_students):
        w = np.zeros((width, d))
        bb = np.zeros(width)
        a = np.zeros((teacher.d_out, width))
        out_bias = c.copy()
        skip = np.zeros((teacher.d_out, d))
        slots = rng.permutation(width)
        tag = np.full(width, -1)
        pos = 0
        for j in range(k):
            parts = 2 if rng.random() < 0.5 else 1  # planted duplicates
            shares = rng.dirichlet(np.ones(parts)) if parts > 1 else [1.0]
            for share in shares:
                slot = slots[pos]
                pos += 1
                sign = -1.0 if (act.has_sign_symmetry and rng.random() < 0.5) else 1.0
                scale = rng.uniform(0.5, 2.0) if act.has_scaling_symmetry else 1.0
                w[slot] = sign * scale * W[j] + noise * rng.normal(size=d)
                bb[slot] = sign * scale * b[j]
                out = share * A[:, j] / scale
                if sign < 0 and act.symmetry in ("odd", "odd_constant"):
                    a[:, slot] = -out
                    out_bias += act.flip_constant * out
                elif sign < 0:  # even + linear: s(z) = s(-z) + c z
                    a[:, slot] = out
                    skip += act.flip_slope * scale * np.outer(out, W[j])
                    out_bias += act.flip_slope * scale * out * b[j]
                else:
                    a[:, slot] = out
                tag[slot] = j
        while pos < width:  # junk: zero-output neurons and cancelling pairs
            slot = slots[pos]
            w[slot], bb[slot] = rng.normal(size=d), rng.normal()
            if pos + 1 < width and rng.random() < 0.5:
                twin = slots[pos + 1]
                w[twin], bb[twin] = w[slot], bb[slot]
                a[:, slot] = rng.normal(size=teacher.d_out)
                a[:, twin] = -a[:, slot]
                pos += 1
            pos += 1
        origin.append(tag)
        parts = [torch.tensor(w), torch.tensor(a)]
        theta = layout.flatten([parts[0], parts[1]], [torch.tensor(bb), torch.tensor(out_bias)],
                               torch.tensor(skip) if layout.skip else None)
        thetas.append(theta)
    return StudentBatch(torch.stack(thetas), layout, act), np.concatenate(origin)


ACTS = ["g", "tanh", "sigmoid", "softplus", "relu"]


@pytest.mark.parametrize("activation", ACTS)
def test_planted_students_compute_the_teacher(activation):
    teacher = random_teacher(2, [4], activation=activation, seed=5)
    students, _ = planted_students(teacher, 6, 12, noise=0.0)
    X = torch.randn(500, 2, dtype=torch.float64)
    for s in range(students.n_students):
        torch.testing.assert_close(students.student(s)(X), teacher(X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ACTS)
def test_clustering_returns_the_planted_neurons(activation):
    teacher = random_teacher(2, [4], activation=activation, seed=5)
    students, origin = planted_students(teacher, 8, 12)
    result = cluster_layer(students, 0, gamma=0.5, beta=math.pi / 6)
    assert result.width == 4
    rows = result.student * 12 + result.neuron  # feature-table row -> planted slot
    assert set(rows) == set(np.flatnonzero(origin >= 0))  # junk is silent: left out
    found = [set(origin[rows[c.members]].tolist()) for c in result.kept]
    assert sorted(found, key=min) == [{0}, {1}, {2}, {3}]  # each kept cluster: one planted neuron
    for cluster in result.kept:
        planted = origin[rows[cluster.core]][0]
        assert set(np.flatnonzero(origin == planted)) == set(rows[cluster.core])
        assert cluster.n_students == 8 and cluster.median_angle < 1e-5


def test_too_few_students_share_a_neuron_then_it_is_dropped():
    teacher = random_teacher(2, [3], activation="tanh", seed=1)
    students, origin = planted_students(teacher, 6, 8)
    theta = students.theta.clone()
    w, b, _ = students.layout.unflatten(theta)
    gen = torch.Generator().manual_seed(0)
    for row in np.flatnonzero(origin == 2):  # four of six students lose neuron 2: only 2 keep it
        s, j = divmod(int(row), 8)
        if s < 4:
            w[0][s, j] = torch.randn(2, dtype=torch.float64, generator=gen)
            b[0][s, j] = 3.0 + s
    result = cluster_layer(StudentBatch(theta, students.layout, students.activation), 0)
    rows = result.student * 8 + result.neuron
    found = [set(origin[rows[c.core]].tolist()) for c in result.kept]
    assert sorted(found, key=min) == [{0}, {1}]


def test_min_students_and_signed_distances():
    assert min_students(0.5, 10) == 5 and min_students(0.75, 10) == 8 and min_students(0.1, 10) == 2
    f = np.array([[1.0, 2.0], [-1.0, -2.0], [1.0, 2.5]])
    signed = pairwise_distances(f, signed=True)
    plain = pairwise_distances(f, signed=False)
    np.testing.assert_allclose(signed, [0.0, 0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(plain[0], 2 * np.sqrt(5))
    # exact differences: copies 1e-14 apart stay 1e-14 apart (the Gram shortcut gives ~1e-8)
    g = np.array([[0.3, -1.2, 0.7], [0.3, -1.2, 0.7 + 1e-14], [-0.3, 1.2, -0.7 - 2e-14]])
    np.testing.assert_allclose(pairwise_distances(g, signed=True), [1e-14, 2e-14, 1e-14], rtol=0.2)


def test_dense_core_finds_the_tight_group_among_strays():
    rng = np.random.default_rng(0)
    tight = np.array([1.0, 0.5, -0.2]) + 1e-9 * rng.normal(size=(6, 3))
    strays = rng.normal(size=(7, 3))
    features = np.concatenate([strays[:3], tight, strays[3:]])
    student = np.array([0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5, 6])
    core = dense_core(features, student, signed=False, beta=math.pi / 6)
    assert set(core) >= set(range(3, 9))
    # the cosine of a tight row can round to 1 + 2e-16 (numpy's dot on AVX-512): clipped
    assert all(np.degrees(np.arccos(np.clip(features[i] @ tight[0] / np.linalg.norm(features[i])
                                            / np.linalg.norm(tight[0]), -1, 1))) <= 30 for i in core)


def test_constant_neurons_do_not_vote():
    teacher = random_teacher(2, [3], activation="g", seed=1)
    students, origin = planted_students(teacher, 4, 6)
    theta = students.theta.clone()
    w, b, _ = students.layout.unflatten(theta)
    junk = int(np.flatnonzero(origin[:6] < 0)[0])
    w[0][0, junk] = 0.0  # a constant neuron g(b): its direction is not determined by the data
    w[1][0, :, junk] = 1.0
    silent = silent_neurons(StudentBatch(theta, students.layout, students.activation), 0)
    assert silent[0, junk]
    assert not silent[0, origin[:6] >= 0].any()


def test_a_tight_group_inside_a_loose_cluster_is_kept():
    """Regression (toy family g-d2-w2-s1, rho 4): six students hold the teacher's neuron
    exactly, but average linkage joined them with stray neurons of students at another
    near-solution, and the whole cluster failed the angle test."""
    from eandc import expand_and_cluster, gaussian_inputs
    from eandc.compare import compare
    teacher = random_teacher(2, [2], activation="g", seed=1)
    X = gaussian_inputs(2000, 2, seed=2)
    result = expand_and_cluster(teacher, X, "g", student_widths=[8], n_students=10, seed=1,
                                progress=False, consensus_rounds=0,
                                train_options={"max_iter": 150})
    assert any(c.reason.startswith("kept: its core") for c in result.clusterings[0].kept)
    assert compare(teacher, result.network, gaussian_inputs(2000, 2, seed=3)).exact()


def imprecise_students(d, k, n_students, strays, seed):
    """g students (no symmetry) far from zero loss: each holds the ``k`` planted neurons with
    relative noise 5-30% on ``[w; b]``, and ``strays`` more neurons that are noisier copies of
    random planted ones (5-90%), all with outgoing weights. No silent neurons."""
    rng = np.random.default_rng(seed)
    planted = rng.normal(size=(k, d + 1))
    layout = Layout(d, (k + strays,), 1, False)
    thetas = []
    for _ in range(n_students):
        own = planted + rng.uniform(0.05, 0.3, size=(k, 1)) * rng.normal(size=planted.shape)
        near = (planted[rng.integers(k, size=strays)]
                + rng.uniform(0.05, 0.9, size=(strays, 1)) * rng.normal(size=(strays, d + 1)))
        rows = np.concatenate([own, near])[rng.permutation(k + strays)]
        thetas.append(layout.flatten(
            [torch.tensor(rows[:, :-1]), torch.tensor(rng.normal(size=(1, k + strays)))],
            [torch.tensor(rows[:, -1]), torch.zeros(1, dtype=torch.float64)], None))
    return StudentBatch(torch.stack(thetas), layout, get_activation("g"))


def test_imprecise_students_are_not_cut_above_everything():
    """Regression (deep MNIST students at relative loss 2e-3): no plateau of the cluster count
    lasted while the height doubled except the one above the last merge, so the cut put every
    neuron in one cluster (kept through its dense core). That plateau no longer counts as stable
    when the rows are not all one neuron; the count is then maximised as the paper does."""
    students = imprecise_students(30, 30, 4, 60, seed=9)
    result = cluster_layer(students, 0, gamma=0.5, beta=math.pi / 6)
    assert 30 <= result.width <= 33
    assert result.cut_index < len(result.linkage) - 1


def test_choose_cut_keeps_the_top_open_only_when_asked():
    heights = 1.1 ** np.arange(8)  # no plateau lasts while the height doubles
    Z = np.column_stack([np.zeros(8), np.zeros(8), heights, np.zeros(8)])
    counts = np.array([1, 2, 3, 4, 3, 2, 2, 1])
    assert choose_cut(Z, counts) == 7  # the last plateau lasts for ever: the only stable one
    assert choose_cut(Z, counts, open_top=False) == 3  # none stable: the largest count


def test_a_plateau_stable_only_through_stray_rows_does_not_win():
    """Regression (layer 3 of the deep MNIST students): two rows of huge norm merge far above
    the rest, so the one-cluster plateau below them lasts while the height doubles and was the
    only stable one: one cluster instead of tens. No neuron's copies fragment into more than
    ``max_fragments`` big clusters, so a stable count below the largest over that is no answer."""
    heights = np.append(1.1 ** np.arange(8), [50.0, 100.0])
    Z = np.column_stack([np.zeros(10), np.zeros(10), heights, np.zeros(10)])
    counts = np.array([1, 2, 3, 4, 3, 2, 1, 1, 1, 1])
    assert choose_cut(Z, counts, open_top=False) == 9
    assert choose_cut(Z, counts, open_top=False, max_fragments=1) == 3  # the largest count
    assert choose_cut(Z, counts, open_top=False, max_fragments=4) == 9  # 4 fragments of 1 each


def test_all_one_neuron_on_few_and_on_many_rows():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=6)
    for n in (50, 3000):  # 3000 rows: estimated on a sample of them
        copies = direction + 0.01 * rng.normal(size=(n, 6))
        flipped = copies * np.where(rng.random(n) < 0.5, -1.0, 1.0)[:, None]
        assert all_one_neuron(copies, signed=False, beta=math.pi / 6)
        assert all_one_neuron(flipped, signed=True, beta=math.pi / 6)
        assert not all_one_neuron(flipped, signed=False, beta=math.pi / 6)
        assert not all_one_neuron(rng.normal(size=(n, 6)), signed=True, beta=math.pi / 6)


def test_preactivation_metric_gives_the_rms_of_preactivations():
    rng = np.random.default_rng(3)
    inputs = rng.normal(size=(400, 3)) * [1.0, 1e-3, 0.0] + [0.5, 2.0, 7.0]  # one constant input
    S = preactivation_metric(inputs)
    for _ in range(5):
        w, b = rng.normal(size=3), rng.normal()
        rms = math.sqrt(np.mean((inputs @ w + b) ** 2))
        assert np.linalg.norm(np.append(w, b) @ S) == pytest.approx(rms, rel=1e-12)
    for bad in (np.zeros((0, 3)), np.ones(3), np.full((4, 2), np.nan)):
        with pytest.raises(ValueError, match="inputs"):
            preactivation_metric(bad)


@pytest.mark.parametrize("activation", ["tanh", "relu", "g"])
def test_preactivation_metric_clusters_neurons_scattered_where_the_inputs_hardly_vary(activation):
    """Students hold the planted neurons with large random errors on an input that hardly varies
    across the queries: their rows scatter, their preactivations on the queries agree. The
    clustering in the preactivation metric keeps every neuron; the paper's, on the rows, cannot."""
    teacher = random_teacher(3, [4], activation=activation, seed=5)
    students, origin = planted_students(teacher, 6, 10, noise=0.0)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(2000, 3)) * [1.0, 1.0, 1e-9]
    weights, biases, skip = students.layout.unflatten(students.theta)
    w0 = weights[0].clone()
    planted = torch.as_tensor(origin.reshape(w0.shape[:2]) >= 0)  # junk pairs stay cancelling
    w0[..., 2] += planted * torch.as_tensor(10 * rng.normal(size=w0.shape[:2]))  # on input 2
    theta = students.layout.flatten([w0, weights[1]], biases, skip)
    scattered = StudentBatch(theta, students.layout, students.activation)
    beta = math.radians(5)
    metric = preactivation_metric(X)
    result = cluster_layer(scattered, 0, 1.0, beta, input_metric=metric)
    assert result.width == 4
    rows = result.student * 10 + result.neuron
    assert sorted((set(origin[rows[c.core]].tolist()) for c in result.kept), key=min) == \
        [{0}, {1}, {2}, {3}]
    assert all(len(set(result.student[c.core].tolist())) == 6 for c in result.kept)
    assert cluster_layer(scattered, 0, 1.0, beta).width < 4
    with pytest.raises(ValueError, match="input_metric"):
        cluster_layer(scattered, 0, 0.5, beta, input_metric=metric[:3, :3])
    with pytest.raises(ValueError, match="exclude each other"):
        cluster_layer(scattered, 0, 0.5, beta, feature_mask=np.ones(3, bool), input_metric=metric)


def _outputs_with_mean_neuron(student, X, layer, j):
    """Oracle: the student's outputs with hidden neuron ``j`` of ``layer`` replaced by its mean
    over ``X``, layer by layer in numpy."""
    act = student.activation
    a = X.numpy()
    for k, (w, b) in enumerate(zip(student.weights[:-1], student.biases[:-1])):
        a = act(torch.as_tensor(a @ w.numpy().T + b.numpy())).numpy()
        if k == layer:
            a = a.copy()
            a[:, j] = a[:, j].mean()
    return a @ student.weights[-1].numpy().T + student.biases[-1].numpy()


@pytest.mark.parametrize("activation", ["g", "tanh"])
def test_ablation_effects_match_networks_with_the_neuron_at_its_mean(activation, monkeypatch):
    act = get_activation(activation)
    layout = Layout(3, (5, 4, 6), 2)
    gen = torch.Generator().manual_seed(0)
    students = StudentBatch(torch.randn(3, layout.size, generator=gen, dtype=torch.float64),
                            layout, act)
    X = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    scale = 0.7
    whole = []
    for layer in range(3):
        effects = ablation_effects(students, layer, X, scale)
        whole.append(effects)
        assert effects.shape == (3, layout.widths[layer])
        for s in range(3):
            student = students.student(s)
            full = student(X).numpy()
            for j in range(layout.widths[layer]):
                change = _outputs_with_mean_neuron(student, X, layer, j) - full
                assert effects[s, j] == pytest.approx(np.mean(change ** 2) / scale, rel=1e-10)
    monkeypatch.setattr(clustering_module, "ABLATION_ELEMENTS", 300 * 6 * 2)  # blocks of 2
    np.testing.assert_allclose(ablation_effects(students, 0, X, scale), whole[0], rtol=1e-12)
    fewer = ablation_effects(students, 1, X, scale, max_rows=100)  # every third query
    np.testing.assert_allclose(fewer, ablation_effects(students, 1, X[::3], scale), rtol=1e-12)
    with pytest.raises(ValueError, match="X must be"):
        ablation_effects(students, 0, X[:, :2], scale)
    with pytest.raises(ValueError, match="target_scale"):
        ablation_effects(students, 0, X, 0.0)


def test_neurons_that_matter_less_than_the_error_do_not_vote():
    """Every student holds, besides the planted neurons, one neuron on the same incoming vector
    whose outgoing weights are tiny: a cluster of every student that matches no teacher neuron.
    Students whose error exceeds what that neuron adds leave it out."""
    teacher = random_teacher(2, [4], activation="tanh", seed=5)
    students, origin = planted_students(teacher, 6, 12, noise=0.0)
    weights, biases, skip = students.layout.unflatten(students.theta)
    w0, w1 = weights[0].clone(), weights[1].clone()
    faint_slots = [int(np.flatnonzero(origin.reshape(6, 12)[s] < 0)[0]) for s in range(6)]
    for s, slot in enumerate(faint_slots):
        w0[s, slot] = torch.tensor([0.3, -1.1])
        w1[s, :, slot] = 1e-5
    theta = students.layout.flatten([w0, w1], biases, skip)
    faint = StudentBatch(theta, students.layout, students.activation)
    X = torch.randn(1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scale = float(teacher(X).var(dim=0, unbiased=False).mean())
    assert cluster_layer(faint, 0, 0.5, math.pi / 6).width == 5
    exclude = undetermined_neurons(faint, 0, X, scale, np.full(6, 1e-8))
    assert exclude[np.arange(6), faint_slots].all()
    assert (origin.reshape(6, 12)[exclude] < 0).all()  # the planted neurons all vote
    assert cluster_layer(faint, 0, 0.5, math.pi / 6, exclude=exclude).width == 4
    precise = undetermined_neurons(faint, 0, X, scale, np.full(6, 1e-14))
    assert not precise[np.arange(6), faint_slots].any()  # they matter more than that error
    far = undetermined_neurons(faint, 0, X, scale, np.array([1e-8] * 3 + [1e-2] * 3))
    np.testing.assert_array_equal(far[:3], exclude[:3])
    assert not far[3:].any()  # students far from a solution keep every neuron
    with pytest.raises(ValueError, match="one loss per student"):
        undetermined_neurons(faint, 0, X, scale, np.ones(5))
    with pytest.raises(ValueError, match="exclude must be"):
        cluster_layer(faint, 0, 0.5, math.pi / 6, exclude=exclude[:, :3])
