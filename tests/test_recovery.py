"""End to end on CPU: random teachers are recovered exactly (the core issue's acceptance test).

Teachers come from ``eandc.random_teacher`` (documented recipe) with seed 1; 10,000 Gaussian
queries; 10 students 16 wide (16-12 for the deep 2-4-3-1 teacher). ``benchmarks/recovery_sweep.py``
measures the same protocol over many seeds, where some teachers hold neurons the queries barely
determine.
"""

import numpy as np
import pytest
import torch

import eandc

SEED = 1


def recover(activation, widths, student_widths):
    teacher = eandc.random_teacher(2, widths, activation=activation, seed=SEED)
    X = eandc.gaussian_inputs(10_000, 2, seed=SEED + 1)
    result = eandc.expand_and_cluster(teacher, X, activation, n_hidden_layers=len(widths),
                                      student_widths=student_widths, seed=SEED, progress=False)
    return result, eandc.compare(teacher, result.network, eandc.gaussian_inputs(5_000, 2, seed=SEED + 2))


@pytest.mark.parametrize("activation", ["g", "tanh", "sigmoid", "softplus", "relu"])
def test_shallow_teacher_is_recovered_exactly(activation):
    result, comparison = recover(activation, [4], [16])
    assert result.widths == [4], result.summary()
    assert comparison.max_distance <= 1e-10, comparison.summary()
    assert comparison.relative_rmse <= 1e-9, comparison.summary()
    assert result.final_loss < 1e-20
    assert len(result.student_losses[0]) == 10
    assert {"expansion", "clustering", "reconstruction"} <= set(result.timings)


def test_deep_teacher_is_recovered_layer_by_layer():
    result, comparison = recover("g", [4, 3], [16, 12])
    assert result.widths == [4, 3], result.summary()
    assert comparison.max_distance <= 1e-8, comparison.summary()
    assert comparison.relative_rmse <= 1e-9, comparison.summary()
    assert result.final_loss < 1e-20
    assert "retraining layer 2" in result.timings  # layer 2 was clustered from retrained students


def test_student_width_is_found_by_doubling_when_not_given():
    teacher = eandc.random_teacher(2, [2], activation="tanh", seed=SEED)
    X = eandc.gaussian_inputs(3_000, 2, seed=SEED + 1)
    result = eandc.expand_and_cluster(teacher, X, "tanh", student_widths=None, progress=False)
    searched = [step["width"] for step in result.width_search]
    assert searched[0] == 2 and all(b == 2 * a for a, b in zip(searched, searched[1:]))
    assert result.width_search[-1]["share_at_zero_loss"] >= 0.8
    assert result.student_widths == [searched[-1]]
    assert result.widths == [2]


def test_a_recovery_the_clusters_miss_is_completed():
    """Toy family g-d4-w2-s4 at rho 4: four of ten students fit the teacher exactly, the others
    stall near 1e-7, so no second cluster holds five students; the clusters' network (one
    neuron), widened by fresh neurons and trained (completion), is the teacher. (Before the
    completion, the exact-student fallback rescued it.) The completion comes before any
    consensus round, and being exact, leaves none to run."""
    from eandc import family
    teacher = eandc.random_teacher(4, [2], activation="g", seed=4)
    X = eandc.gaussian_inputs(family.n_queries(4, 2), 4, seed=5)
    result = eandc.expand_and_cluster(teacher, X, "g", student_widths=[8], n_students=10, seed=4,
                                progress=False, train_options={"max_iter": 150})
    assert result.clustered_widths == [1] and result.source == "completion", result.summary()
    assert "consensus layer 1" not in result.timings, result.timings
    assert eandc.compare(teacher, result.network, eandc.gaussian_inputs(5000, 4, seed=6)).exact(1e-10, 1e-10)




def _padded_student(teacher, gen, noise):
    """The teacher 2-4-1 with its first neuron split in two copies (outgoing 0.3 and 0.7 of the
    original) and two unused random neurons, perturbed by ``noise``: a (1, 35) theta."""
    W, b, A, c = teacher.weights[0], teacher.biases[0], teacher.weights[1], teacher.biases[1]
    w = torch.cat([W, W[:1], torch.randn(2, 2, dtype=torch.float64, generator=gen)])
    bias = torch.cat([b, b[:1], torch.randn(2, dtype=torch.float64, generator=gen)])
    a = torch.cat([A[:, :1] * 0.3, A[:, 1:], A[:, :1] * 0.7, torch.zeros(1, 2, dtype=torch.float64)], 1)
    layout = eandc.mlp.Layout(2, (7,), 1)
    theta = layout.flatten([w[None], a[None]], [bias[None], c[None]])
    return theta + noise * torch.randn(theta.shape, dtype=torch.float64, generator=gen), layout


def test_the_fallback_takes_only_a_student_at_the_floor_with_fewer_parameters_than_queries():
    """A student at the loss floor holding the teacher (split and padded) is pruned into it; the
    same student perturbed to ~1e-12 is not taken, nor is the exact one from fewer queries than
    the pruned network has parameters (it could interpolate them without being the teacher:
    what a wide MNIST g student did)."""
    from eandc.mlp import StudentBatch
    from eandc.recover import _exact_student
    from eandc.training import student_losses
    teacher = eandc.random_teacher(2, [4], activation="g", seed=0)
    X = torch.from_numpy(eandc.gaussian_inputs(2000, 2, seed=1))
    y = teacher(X)
    gen = torch.Generator().manual_seed(2)
    exact, layout = _padded_student(teacher, gen, 0.0)
    near, _ = _padded_student(teacher, torch.Generator().manual_seed(2), 1e-7)
    batch = StudentBatch(torch.cat([exact, near]), layout, teacher.activation)
    losses = (student_losses(batch.theta, layout, batch.activation, X, y) / y.var(0).mean()).numpy()
    assert losses[0] < 1e-28 and 1e-20 < losses[1] < 1e-8
    network, loss, notes, source = _exact_student([(batch, losses)], X, y, progress=False)
    assert source == "student 0" and loss < 1e-20 and network.widths == [4]
    assert eandc.compare(teacher, network, X).exact(1e-10, 1e-10)
    assert _exact_student([(batch, np.array([losses[1], losses[1]]))], X, y, False) is None
    few = X[:teacher.n_parameters]  # 17 queries for 17 parameters
    few_losses = (student_losses(batch.theta, layout, batch.activation, few, teacher(few))
                  / teacher(few).var(0).mean()).numpy()
    assert few_losses[0] < 1e-28
    assert _exact_student([(batch, few_losses)], few, teacher(few), False) is None


def _partial_teacher(width, keep, seed):
    """A g 2-``width``-1 teacher, its queries, and the network of its neurons ``keep`` only,
    the output layer refitted: a clusters' network that missed the other neurons."""
    from eandc.reconstruction import finetune
    teacher = eandc.random_teacher(2, [width], activation="g", seed=seed)
    X = torch.from_numpy(eandc.gaussian_inputs(4000, 2, seed=1))
    y = teacher(X)
    partial = eandc.MLP([teacher.weights[0][keep], teacher.weights[1][:, keep]],
                        [teacher.biases[0][keep], teacher.biases[1]], "g")
    partial, partial_loss = finetune(partial, X, y)
    return teacher, X, y, partial, partial_loss


def _is_teacher(network, teacher):
    held_out = torch.from_numpy(eandc.gaussian_inputs(2000, 2, seed=3))
    return eandc.compare(teacher, network, held_out).exact(1e-10, 1e-10)


def test_completion_finds_the_neuron_the_clusters_missed():
    """The clusters' network short of one teacher neuron (g 2-4-1 less its third neuron):
    widened by fresh neurons and trained, the best copy, pruned, is the teacher."""
    from eandc.recover import _complete
    teacher, X, y, partial, partial_loss = _partial_teacher(4, [0, 1, 3], seed=0)
    assert partial_loss > 1e-6
    network, loss, notes = _complete(partial, partial_loss, X, y, 4, 0,
                                     {"progress": False, "adam_steps": 0})
    assert network.widths == [4] and loss < 1e-20, notes
    assert _is_teacher(network, teacher)


def test_completion_rounds_go_on_while_they_fit_better():
    """Half of a g 2-6-1 teacher (neurons 0, 2, 4): a round adds two fresh neurons, so one round
    cannot reach the teacher; the rounds go on from the better network and the second is
    exact, the teacher."""
    from eandc.recover import _complete
    teacher, X, y, partial, partial_loss = _partial_teacher(6, [0, 2, 4], seed=1)
    options = {"progress": False, "adam_steps": 0}
    one, one_loss, _ = _complete(partial, partial_loss, X, y, 4, 0, options, rounds=1)
    assert one.widths == [5] and 1e-20 < one_loss < partial_loss
    network, loss, notes = _complete(partial, partial_loss, X, y, 4, 0, options)
    assert network.widths == [6] and loss < 1e-20, notes
    assert _is_teacher(network, teacher)


def test_a_recovery_that_is_not_exact_is_retried_with_a_larger_budget():
    """g-d2-w6-s0 at the teacher's own width (rho 1) is not recovered exactly: with
    ``retry_with`` the recovery is done again from the same initial students with the larger
    budget, and the better of the two (the lower loss) is returned, the same network as a run
    with that budget from the start when it wins. An exact recovery takes one attempt; a
    malformed ``retry_with`` is named."""
    teacher = eandc.random_teacher(2, [6], activation="g", seed=0)
    X = eandc.gaussian_inputs(2000, 2, seed=1)
    kwargs = dict(student_widths=[6], seed=0, progress=False, consensus_rounds=0)
    short = eandc.expand_and_cluster(teacher, X, "g", train_options={"max_iter": 30}, **kwargs)
    long = eandc.expand_and_cluster(teacher, X, "g", train_options={"max_iter": 150}, **kwargs)
    assert short.final_loss > 1e-20 and short.attempts == 1
    retried = eandc.expand_and_cluster(teacher, X, "g", train_options={"max_iter": 30},
                                       retry_with=[{"max_iter": 150}], **kwargs)
    assert retried.attempts == 2 and "other attempts" in retried.timings
    assert retried.final_loss == min(short.final_loss, long.final_loss)
    best = short if short.final_loss <= long.final_loss else long
    assert np.array_equal(retried.network.theta.numpy(), best.network.theta.numpy())
    easy = eandc.random_teacher(2, [2], activation="g", seed=SEED)
    Xe = eandc.gaussian_inputs(2000, 2, seed=SEED + 1)
    result = eandc.expand_and_cluster(easy, Xe, "g", student_widths=[8], seed=SEED,
                                      progress=False, retry_with=[{"max_iter": 400}])
    assert result.final_loss <= 1e-20 and result.attempts == 1
    assert "other attempts" not in result.timings
    with pytest.raises(TypeError, match="retry_with"):
        eandc.expand_and_cluster(teacher, X, "g", retry_with={"max_iter": 400}, **kwargs)


def test_retraining_between_layers_takes_the_retrain_options(monkeypatch):
    """``retrain_options`` update ``train_options`` for the retraining of deeper layers (by
    default second-order only: ``adam_steps`` 0); a bad value is refused before any training."""
    from eandc import recover as recover_module
    calls = []
    original = recover_module.train_students

    def recording(students, X, y, **options):
        calls.append(options)
        return original(students, X, y, **options)

    monkeypatch.setattr(recover_module, "train_students", recording)
    teacher = eandc.random_teacher(2, [2, 2], activation="g", seed=SEED)
    X = eandc.gaussian_inputs(500, 2, seed=SEED + 1)
    train = {"adam_steps": 20, "max_iter": 3, "polish_iter": 2}
    for retrain, adam_steps in ((None, 0), ({"adam_steps": 7, "adam_batch": 100}, 7)):
        calls.clear()
        try:
            eandc.expand_and_cluster(teacher, X, "g", 2, student_widths=[6, 6], n_students=4,
                                     consensus_rounds=0, train_options=train,
                                     retrain_options=retrain, progress=False)
        except recover_module.NoClusterError:
            pass  # whether this tiny budget recovers the teacher does not matter here
        deeper = [c for c in calls if c.get("fixed_layers", 0) >= 1]
        assert calls[0]["adam_steps"] == 20 and deeper, calls
        assert all(c["adam_steps"] == adam_steps and c["max_iter"] == 3 for c in deeper), deeper
    calls.clear()
    with pytest.raises(TypeError, match="retrain_options"):
        eandc.expand_and_cluster(teacher, X, "g", 2, retrain_options=[("adam_steps", 7)])
    assert not calls


def test_a_shared_layer_is_refitted_only_when_asked(monkeypatch):
    from eandc import recover as recover_module
    calls = []
    original = recover_module.refit_next_layer

    def recording(shared, students, layer, X):
        calls.append(layer)
        return original(shared, students, layer, X)

    monkeypatch.setattr(recover_module, "refit_next_layer", recording)
    teacher = eandc.random_teacher(2, [2, 2], activation="g", seed=SEED)
    X = eandc.gaussian_inputs(500, 2, seed=SEED + 1)
    options = dict(student_widths=[6, 6], n_students=4, consensus_rounds=0, progress=False,
                   train_options={"adam_steps": 20, "max_iter": 3, "polish_iter": 2})
    for refit, expected in ((False, []), (True, [0])):
        calls.clear()
        try:
            eandc.expand_and_cluster(teacher, X, "g", 2, refit_shared=refit, **options)
        except recover_module.NoClusterError:
            pass  # whether this tiny budget recovers the teacher does not matter here
        assert calls == expected
    with pytest.raises(TypeError, match="refit_shared"):
        eandc.expand_and_cluster(teacher, X, "g", 2, refit_shared="yes")


def test_shared_layers_stay_fixed_in_retraining_unless_freed(monkeypatch):
    """``freeze_shared`` (default): the retraining between layers leaves the shared first layer
    as written; ``freeze_shared=False`` (the published code) trains it too."""
    from eandc import recover as recover_module
    moved = []
    original = recover_module.train_students

    def recording(students, X, y, **options):
        trained, report = original(students, X, y, **options)
        if options["seed"] == 1:  # the retraining after the first layer (seed + layer + 1)
            before = students.layout.unflatten(students.theta)[0][0]
            after = trained.layout.unflatten(trained.theta)[0][0]
            moved.append(float((after - before).abs().max()))
        return trained, report

    monkeypatch.setattr(recover_module, "train_students", recording)
    teacher = eandc.random_teacher(2, [2, 2], activation="g", seed=SEED)
    X = eandc.gaussian_inputs(500, 2, seed=SEED + 1)
    options = dict(student_widths=[6, 6], n_students=4, consensus_rounds=0, progress=False,
                   seed=0, train_options={"adam_steps": 20, "max_iter": 3, "polish_iter": 2},
                   retrain_options={"adam_steps": 20})
    for freeze in (True, False):
        moved.clear()
        try:
            eandc.expand_and_cluster(teacher, X, "g", 2, freeze_shared=freeze, **options)
        except recover_module.NoClusterError:
            pass  # whether this tiny budget recovers the teacher does not matter here
        assert len(moved) == 1, moved
        assert (moved[0] == 0.0) == freeze, (freeze, moved)
    with pytest.raises(TypeError, match="freeze_shared"):
        eandc.expand_and_cluster(teacher, X, "g", 2, freeze_shared=0)


def test_undetermined_neurons_are_left_out_of_the_clustering_unless_asked(monkeypatch):
    """``drop_undetermined`` (default): every clustering gets the mask of
    :func:`eandc.clustering.undetermined_neurons` for the students it clusters; ``False``
    gives none."""
    from eandc import recover as recover_module
    seen = []
    original = recover_module.cluster_layer

    def recording(students, layer, *args, exclude=None, **kwargs):
        seen.append(exclude)
        return original(students, layer, *args, exclude=exclude, **kwargs)

    monkeypatch.setattr(recover_module, "cluster_layer", recording)
    teacher = eandc.random_teacher(2, [3], activation="tanh", seed=SEED)
    X = eandc.gaussian_inputs(400, 2, seed=SEED + 1)
    options = dict(student_widths=[6], n_students=4, consensus_rounds=0, progress=False, seed=0,
                   prune_network=False, train_options={"adam_steps": 50, "max_iter": 5,
                                                       "polish_iter": 0})
    result = eandc.expand_and_cluster(teacher, X, "tanh", **options)
    assert len(seen) == 1 and seen[0].shape == (4, 6)
    students = result.students  # the expanded students
    y = np.asarray(teacher(X))
    expected = eandc.clustering.undetermined_neurons(students, 0, X, float(y.var(axis=0).mean()),
                                                     result.student_losses[0])
    np.testing.assert_array_equal(seen[0], expected)
    seen.clear()
    eandc.expand_and_cluster(teacher, X, "tanh", drop_undetermined=False, **options)
    assert seen == [None]
    with pytest.raises(TypeError, match="drop_undetermined"):
        eandc.expand_and_cluster(teacher, X, "tanh", drop_undetermined=1)


def test_beta_may_be_given_per_hidden_layer(monkeypatch):
    from eandc import recover as recover_module
    seen = []
    original = recover_module.cluster_layer

    def recording(students, layer, gamma, beta, *args, **kwargs):
        seen.append((layer, beta))
        return original(students, layer, gamma, beta, *args, **kwargs)

    monkeypatch.setattr(recover_module, "cluster_layer", recording)
    teacher = eandc.random_teacher(2, [2, 2], activation="g", seed=SEED)
    X = eandc.gaussian_inputs(500, 2, seed=SEED + 1)
    options = dict(student_widths=[6, 6], n_students=4, consensus_rounds=0, progress=False,
                   train_options={"adam_steps": 20, "max_iter": 3, "polish_iter": 2})
    try:
        eandc.expand_and_cluster(teacher, X, "g", 2, beta=[0.2, 0.4], **options)
    except recover_module.NoClusterError:
        pass  # whether this tiny budget recovers the teacher does not matter here
    assert seen[:2] == [(0, 0.2), (1, 0.4)]
    for bad in ([0.2], [0.2, 0.4, 0.4], [0.2, 2.0], [0.2, True], "0.2"):
        with pytest.raises(ValueError, match="beta"):
            eandc.expand_and_cluster(teacher, X, "g", 2, beta=bad, **options)


def test_the_preactivation_metric_is_used_only_when_asked(monkeypatch):
    from eandc import recover as recover_module
    seen = []
    original = recover_module.cluster_layer

    def recording(students, layer, *args, input_metric=None, **kwargs):
        seen.append((layer, None if input_metric is None else input_metric.shape))
        return original(students, layer, *args, input_metric=input_metric, **kwargs)

    monkeypatch.setattr(recover_module, "cluster_layer", recording)
    teacher = eandc.random_teacher(2, [2, 3], activation="g", seed=SEED)
    X = eandc.gaussian_inputs(500, 2, seed=SEED + 1)
    options = dict(student_widths=[6, 5], n_students=4, consensus_rounds=0, progress=False,
                   train_options={"adam_steps": 20, "max_iter": 3, "polish_iter": 2})
    for metric, expected in (("weights", [(0, None), (1, None)]),
                             ("preactivations", [(0, (3, 3))])):
        seen.clear()
        try:
            eandc.expand_and_cluster(teacher, X, "g", 2, cluster_metric=metric, **options)
        except recover_module.NoClusterError:
            pass  # whether this tiny budget recovers the teacher does not matter here
        assert seen[:len(expected)] == expected
    if len(seen) > 1:  # the second layer reads the activities of the shared first layer
        assert seen[1][0] == 1 and seen[1][1][0] == seen[1][1][1] >= 2
    with pytest.raises(ValueError, match="cluster_metric"):
        eandc.expand_and_cluster(teacher, X, "g", 2, cluster_metric="cosine", **options)
    with pytest.raises(ValueError, match="feature_mask"):
        eandc.expand_and_cluster(teacher, X, "g", 2, cluster_metric="preactivations",
                                 feature_mask=np.ones(2, bool), **options)


def test_finetune_iter_bounds_the_reconstructions_fine_tune(monkeypatch):
    from eandc import recover as recover_module
    seen = []
    original = recover_module.finetune

    def recording(network, X, y, max_iter=300, **kwargs):
        seen.append(max_iter)
        return original(network, X, y, max_iter=max_iter, **kwargs)

    monkeypatch.setattr(recover_module, "finetune", recording)
    teacher = eandc.random_teacher(2, [3], activation="tanh", seed=SEED)
    X = eandc.gaussian_inputs(400, 2, seed=SEED + 1)
    options = dict(student_widths=[6], n_students=4, consensus_rounds=0, progress=False,
                   prune_network=False)
    eandc.expand_and_cluster(teacher, X, "tanh", finetune_iter=7, **options)
    assert seen and set(seen) == {7}
    for bad in (0, 2.5, True, "20"):
        with pytest.raises(ValueError, match="finetune_iter"):
            eandc.expand_and_cluster(teacher, X, "tanh", finetune_iter=bad, **options)
