"""The MNIST chapter's code: profiles, queries, masked comparison, tidy table, a small recovery."""

import csv
from pathlib import Path

import numpy as np
import pytest

import eandc
from eandc import mnist
from eandc.data import MNIST_FILES
from eandc.runs import load_run

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def test_profiles_hold_the_issue_teachers():
    standard = mnist.configs("standard")
    assert [(c["activation"], c["widths"], c["rho"]) for c in standard] == \
        [(a, [16], 4) for a in ("g", "tanh", "sigmoid", "softplus", "relu")] + [("g", [30, 30, 30], 3)]
    paper = {(c["activation"], tuple(c["widths"])): c["rho"] for c in mnist.configs("paper")}
    assert paper[("g", (256,))] == 4 and paper[("tanh", (128,))] == 4
    assert paper[("relu", (64,))] == 4 and paper[("g", (30, 30, 30))] == 3
    for profile in mnist.PROFILES:  # every configuration is valid for the task
        for c in mnist.configs(profile):
            mnist.normalize(c)
    with pytest.raises(ValueError, match="unknown profile"):
        mnist.configs("huge")
    in_subspace = [c for c in standard if c.get("input_subspace")]
    assert {c["activation"] for c in in_subspace if len(c["widths"]) == 1} == \
        {"g", "tanh", "sigmoid", "softplus", "relu"}
    assert all(c["train_options"]["finisher"] == "dense" for c in in_subspace
               if len(c["widths"]) == 1)
    assert all(c.get("input_whitening") and c.get("input_polish_iter") == mnist.SUBSPACE_POLISH
               for c in in_subspace)
    assert mnist.configs("standard", {"seed": 0}) == standard  # the default seed: same runs
    # training options are merged into each teacher's own: its iterations stay
    matrix_free = mnist.select_teachers(mnist.configs("standard", mnist.MATRIX_FREE), "shallow")
    assert [c["train_options"] for c in matrix_free] == [
        {"finisher": "matfree", "max_iter": 30 if c["activation"] in ("g", "softplus", "relu")
         else 12, "polish_iter": 10, "cg_dtype": "float32"} for c in matrix_free]
    assert mnist.configs("standard", {"queries": {"images": True}})[0]["queries"] == {"images": True}
    assert {c["seed"] for c in mnist.configs("standard", {"seed": 3})} == {3}
    with pytest.raises(ValueError, match="unknown configuration key"):
        mnist.configs("smoke", {"sed": 3})


def test_teachers_are_selected_by_depth():
    standard = mnist.configs("standard")
    assert [c["widths"] for c in mnist.select_teachers(standard, "deep")] == [[30, 30, 30]]
    shallow = mnist.select_teachers(standard, "shallow")
    assert [c["activation"] for c in shallow] == list(mnist.SHALLOW_ACTIVATIONS)
    assert mnist.select_teachers(standard) == standard
    with pytest.raises(ValueError, match="unknown teacher selection"):
        mnist.select_teachers(standard, "wide")
    with pytest.raises(SystemExit):  # the command line refuses it before any work
        mnist.main(["--teachers", "wide"])


def test_later_keys_stay_out_of_a_configuration_at_their_default():
    """A key added after runs were stored (``LATER_DEFAULTS``) appears only where it differs
    from its default, so the stored configurations keep their hashes."""
    base = mnist.normalize({"activation": "tanh"})
    assert "teacher_bias_std" not in base
    assert mnist.normalize({"activation": "tanh", "teacher_bias_std": 1.0}) == base
    assert mnist.normalize({"activation": "tanh", "teacher_bias_std": 0.0})["teacher_bias_std"] == 0.0
    relu = [c for c in mnist.configs("standard") if c["activation"] == "relu"]
    assert relu[0]["teacher_bias_std"] == 0.0
    assert all("teacher_bias_std" not in c for c in mnist.configs("standard") if c["activation"] != "relu")


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="unknown configuration key"):
        mnist.normalize({"width": 3})
    with pytest.raises(ValueError, match="applies to a recovery in the input subspace"):
        mnist.normalize({"input_polish_iter": 3})
    with pytest.raises(ValueError, match="non-negative integer"):
        mnist.normalize({"input_polish_iter": -1, "input_subspace": True})
    with pytest.raises(ValueError, match="input_whitening applies to a recovery in the input"):
        mnist.normalize({"input_whitening": True})
    with pytest.raises(ValueError, match="true or false"):
        mnist.normalize({"input_whitening": 1, "input_subspace": True})
    with pytest.raises(ValueError, match="unknown query set"):
        mnist.normalize({"queries": {"images": True, "blur": 10}})
    with pytest.raises(ValueError, match="no queries"):
        mnist.build_queries(np.zeros((5, 16)), {"images": False})


def test_queries_are_the_images_then_the_augmented_sets():
    images = np.random.default_rng(0).uniform(size=(30, 16))
    X = mnist.build_queries(images, {"noise": 7, "images": True, "tiles2x2": 5}, seed=3)
    assert X.shape == (42, 16)
    assert np.array_equal(X[:30], images)  # the images first, whatever the order in the dict
    again = mnist.build_queries(images, {"noise": 7, "images": True, "tiles2x2": 5}, seed=3)
    assert np.array_equal(X, again)
    assert mnist.query_description({"images": True, "noise": 10}) == "images + noise 10"


def test_a_query_set_entry_may_carry_options():
    """``{"n": n, **options}``: the options reach the query set (same rows as calling it with
    them), the description names them, and an entry without its count is refused."""
    images = np.random.default_rng(0).uniform(size=(30, 16))
    queries = {"images": True, "contrast": {"n": 6, "max_factor": 3.0, "noise_std": 0.0}}
    X = mnist.build_queries(images, queries, seed=3)
    wide = eandc.data.contrast_queries(images, 6, max_factor=3.0, noise_std=0.0, seed=3 + 101)
    assert np.array_equal(X[30:], wide)
    assert np.abs(X[30:]).max() > 1.0  # beyond the [-1, 1] of the default factors
    assert mnist.query_description(queries) == "images + contrast 6 (max_factor 3.0, noise_std 0.0)"
    with pytest.raises(ValueError, match="'n'"):
        mnist.build_queries(images, {"contrast": {"max_factor": 3.0}})
    with pytest.raises(TypeError):
        mnist.build_queries(images, {"contrast": {"n": 6, "blur": 1.0}})


def test_comparison_leaves_masked_inputs_out():
    teacher = eandc.random_teacher(4, [3], activation="tanh", seed=0)
    weights = [w.clone() for w in teacher.weights]
    weights[0][:, 3] += 5.0  # an input the queries never varied: its weights are arbitrary
    recovered = eandc.MLP(weights, [b.clone() for b in teacher.biases], "tanh")
    X = eandc.gaussian_inputs(200, 4, seed=1)
    X[:, 3] = 0.0
    unmasked = eandc.compare(teacher, recovered, X)
    masked = eandc.compare(teacher, recovered, X, feature_mask=np.array([True, True, True, False]))
    assert unmasked.max_distance > 1e-2
    assert masked.max_distance < 1e-14
    with pytest.raises(ValueError, match="feature_mask"):
        eandc.compare(teacher, recovered, X, feature_mask=np.ones(3, dtype=bool))


def test_silent_neurons_are_those_constant_on_every_query():
    """A ReLU neuron inactive on every query computes a constant there: named per layer, and
    found again by a narrower query set that leaves another neuron inactive too."""
    from eandc.compare import silent_neurons
    teacher = eandc.random_teacher(3, [4, 2], activation="relu", seed=0)
    teacher.biases[0][1] = -100.0  # inactive on any query of norm below ~100
    X = eandc.gaussian_inputs(500, 3, seed=1)
    assert silent_neurons(teacher, X)[0] == [1]
    w = teacher.weights[0][2]
    narrow = X[(X @ w.numpy() + teacher.biases[0][2].item()) < 0]  # neuron 2 inactive on these
    assert silent_neurons(teacher, narrow)[0] == [1, 2]
    with pytest.raises(ValueError, match="columns"):
        silent_neurons(teacher, X[:, :2])
    with pytest.raises(TypeError, match="MLP"):
        silent_neurons(teacher.to_torch(), X)


def _row(activation, widths, metrics):
    config = mnist.normalize({"activation": activation, "widths": widths})
    return {"hash": "h" + activation, "config": config, "metrics": metrics, "wall_seconds": 12.5,
            "finished": "2026-11-21T10:00:00+00:00"}


def test_the_tidy_table(tmp_path):
    rows = [_row("tanh", [16], {"widths": [17], "clustered_widths": [18], "overhead_percent": 6.25,
                                "median_cosine_distance": [1e-4], "max_cosine_distance": [0.01],
                                "rmse": 0.02, "relative_rmse": 0.003, "argmax_agreement": 0.9995,
                                "n_queries": 20000, "device": "cpu"}),
            _row("g", [30, 30, 30], {"widths": [30, 31, 30], "median_cosine_distance": [1e-3, 2e-3, 3e-3],
                                     "max_cosine_distance": [0.1, 0.2, 0.3]})]
    table = mnist.summary_rows(rows, "standard")
    assert table[0]["paper_teacher_width"] == 128 and table[0]["paper_recovered_width"] == 133
    assert table[0]["recovered_widths"] == "17" and table[0]["student_widths"] == "64"
    assert table[1]["paper_teacher_width"] is None and table[1]["recovered_widths"] == "30-31-30"
    assert table[1]["median_cosine_distance"] == "0.001 / 0.002 / 0.003"
    assert table[0]["query_set"] == "images + noise 10000"
    path = mnist.write_summary(table, tmp_path / "summary.csv")
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert tuple(read[0]) == mnist.SUMMARY_COLUMNS
    assert read[0]["overhead_percent"] == "6.25" and read[1]["overhead_percent"] == ""


@pytest.mark.skipif(not all((SHARED / n).is_file() for n in MNIST_FILES["test"]),
                    reason=f"the offline MNIST test split is not at {SHARED}")
def test_a_run_stores_teacher_network_and_table_and_is_not_redone(tmp_path, monkeypatch):
    """The plumbing, on a run too small to recover anything well: teacher trained and scored,
    result and both networks stored, the table written, a second call computes nothing."""
    monkeypatch.setenv("EANDC_DATA", str(SHARED))
    tiny = {"teachers": [("tanh", [2], 1)],
            "options": {"n_students": 4, "n_train": 1_000, "teacher_epochs": 2,
                        "queries": {"images": 400},
                        "train_options": {"finisher": "matfree", "adam_steps": 20, "max_iter": 3,
                                          "polish_iter": 1}}}
    monkeypatch.setitem(mnist.PROFILES, "smoke", tiny)
    [row] = mnist.run("smoke", tmp_path, progress=False)
    assert row["profile"] == "smoke" and row["teacher_widths"] == "2"
    assert row["n_queries"] == 400 and 0 < row["varying_pixels"] < 784
    assert 0.0 < row["teacher_accuracy"] <= 1.0
    run = load_run(tmp_path / "mnist" / row["hash"])
    teacher = eandc.MLP.load(run.folder / "teacher.npz")
    assert teacher.widths == [2] and teacher.d_in == 784 and teacher.d_out == 10
    assert len(run.metrics["constant_pixels"]) == 784 - row["varying_pixels"]
    assert run.metrics["silent_teacher_neurons"] == [[]] and row["silent_teacher_neurons"] == "0"
    with open(tmp_path / "mnist" / "summary.csv") as f:
        assert [r["hash"] for r in csv.DictReader(f)] == [row["hash"]]
    again = mnist.run("smoke", tmp_path, progress=False)  # stored: nothing is recomputed
    assert again[0]["finished"] == row["finished"]


@pytest.mark.skipif(not all((SHARED / n).is_file() for n in MNIST_FILES["test"]),
                    reason=f"the offline MNIST test split is not at {SHARED}")
def test_smoke_profile_recovers_a_narrow_mnist_teacher_exactly(tmp_path, monkeypatch):
    """The smoke profile: tanh 784-2-10 trained on 8,000 images, 1,000 images and 2,000 noise
    overlays as queries, 4 students twice as wide (~1.5 minutes on 2 cores)."""
    monkeypatch.setenv("EANDC_DATA", str(SHARED))
    [row] = mnist.run("smoke", tmp_path, progress=False)
    assert row["recovered_widths"] == "2" and row["overhead_percent"] == 0
    assert row["varying_pixels"] == 784  # noise overlays vary every pixel
    assert row["median_cosine_distance"] <= 1e-9 and row["max_cosine_distance"] <= 1e-9
    assert row["relative_logit_rmse"] <= 1e-9
    assert row["argmax_agreement"] == 1.0


@pytest.mark.skipif(not all((SHARED / n).is_file() for n in MNIST_FILES["test"]),
                    reason=f"the offline MNIST test split is not at {SHARED}")
def test_in_its_input_subspace_images_alone_recover_the_smoke_teacher_on_every_pixel(monkeypatch):
    """With ``input_subspace`` (eandc.subspace), 1,000 images and no noise overlays recover the
    smoke teacher exactly, the weights of the pixels no image varies included (~10 s)."""
    monkeypatch.setenv("EANDC_DATA", str(SHARED))
    [config] = mnist.configs("smoke", {"queries": {"images": 1_000}, "input_subspace": True})
    metrics, networks = mnist.recover_mnist_teacher(config)
    assert metrics["widths"] == [2] and metrics["subspace_dimension"] == 2
    assert metrics["varying_pixels"] < 784 and metrics["compared_pixels"] == 784
    assert metrics["probe_queries"] > 0
    assert metrics["max_cosine_distance"][0] <= 1e-9 and metrics["relative_rmse"] <= 1e-9
    assert metrics["argmax_agreement"] == 1.0
    teacher, recovered = networks["teacher"], networks["network"]
    assert recovered.d_in == 784
    constant = np.array(metrics["constant_pixels"])
    W_t, W_r = teacher.weights[0].numpy(), recovered.weights[0].numpy()
    # matched by sign-free cosine over every pixel: the constant pixels' weights match too
    cos = np.abs(W_t @ W_r.T) / np.outer(np.linalg.norm(W_t, axis=1), np.linalg.norm(W_r, axis=1))
    match = cos.argmax(1)
    ratio = W_r[match] / W_t  # each recovered neuron a multiple (the sign) of the teacher's
    np.testing.assert_allclose(np.abs(ratio[:, constant]), 1.0, rtol=1e-6)
