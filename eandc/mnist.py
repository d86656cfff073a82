"""The MNIST chapter as code: teachers trained on MNIST, their queries, recovery, tidy table.

* **Teachers**: MLPs ``784 -> widths -> 10`` trained by :func:`eandc.classifier.train_classifier`
  (its documented recipe; :func:`train_teacher`) on the first ``n_train`` images of the split,
  scored on the others. From then on a teacher is a black box: queries in, logits out. ReLU
  teachers start with zero hidden biases (``teacher_bias_std`` 0, ``RELU_TEACHER``): with the
  recipe's N(0, 1) biases, 3 of the standard ReLU teacher's 16 neurons were inactive on every
  image from the start, so silent on every query made from the images, and unrecoverable.
* **Queries** (``queries`` of the configuration, built by :func:`eandc.data.query_set`): the
  split's images, plus noise overlays (``noise``) and patchworks of tiles from several images
  (``tiles2x2``, ``tiles4x4``); a set's count may carry its options, ``{"n": n, **options}``
  (:func:`build_queries`). A black box can be queried anywhere; the augmented sets give more
  query outputs than there are images, which students with more parameters than images need.
* **Undetermined weights**: a pixel that never varies across the queries only ever multiplies
  the same value, so its weight is not determined by the data (it trades off against the bias).
  Such pixels are left out of the clustering distances and of the comparison with the teacher
  (``feature_mask`` of :func:`eandc.expand_and_cluster` and :func:`eandc.compare`): the mask is
  computed from the queries themselves (:func:`eandc.data.varying_pixels`), where the paper used a
  Boruta mask from a random forest (452 of 784 pixels). With noise overlays every pixel varies and
  the mask keeps all of them. With ``input_subspace`` (a configuration key, default off;
  :mod:`eandc.subspace`) the students take the queries' coordinates in the teacher's input
  subspace, found by finite differences of the black box that vary every pixel on its own:
  every pixel's weight is then determined, and compared, with no mask. With
  ``input_whitening`` as well, those coordinates are whitened (centred, unit variance along
  the queries' principal axes: :meth:`eandc.subspace.InputSubspace.whitened`).
* **Scores**, on the split's last ``len - n_train`` images (never used to train the teacher):
  logit RMSE (absolute, and relative to the logits' spread) and argmax agreement between the
  teacher and the recovered network; per-neuron cosine distances per layer (``eandc.compare``).

Status (measured on the 2-core CPU, 2 threads; the runs stored in results/mnist): the smoke
teacher (tanh 784-2-10, 46% accuracy on the held-out images) is recovered exactly from 1,000
images and 2,000 noise overlays by 4 students 784-4-10 in 88 s. Every shallow teacher of the
standard profile (784-16-10; 93.4-94.0% held-out accuracy) is recovered exactly by 4 students
16-64-10 in the whitened coordinates of its input subspace: width 16, every neuron within
cosine distance 6e-16 of the teacher's, argmax agreement 100%. The tanh and sigmoid teachers
take the 10,000 images and 2,000 noise overlays. The g, softplus and ReLU teachers are nearly
linear on those queries (an affine map of the queries explains 97.8-98.9% of their logits'
variance, 91% for tanh and sigmoid: ``benchmarks/mnist_linearity.py``), and their students
crawled; they take the images and 10,000 contrast queries, stages of 30 iterations. With the
dense finisher (its matrices by :mod:`eandc.gram`), g, tanh, sigmoid, softplus and ReLU take
67 s, 20 s, 19 s, 142 s and 118 s (with 5 Levenberg-Marquardt iterations on the pixels that
take the subspace's finite-difference error out: held-out relative logit RMSE 1e-15 to 3e-15);
with the matrix-free finisher 272 s, 18 s, 51 s, not robust and 210 s, in raw subspace
coordinates 252 s, 43 s, 55 s, stalled and 333 s, in pixel space 1,208 s, 286 s, 364 s,
1,382 s and 4,712 s (all stored too; README).
The deep teacher (784-30-30-30-10, g, ``DEEP_OPTIONS``) is recovered layer by layer in its
whitened subspace with widths 30-30-32 (overhead 2.2%), median cosine distances per layer
8e-8, 9e-8 and 3e-5, held-out relative logit RMSE 6.7e-5 and argmax agreement 100%, in 1,022 s
(README; ``benchmarks/mnist_deep.py`` and ``benchmarks/mnist_deep_clusters.py`` measure its
stages and its third layer's clusters). From
images alone, in pixel space, a teacher is not recovered to precision: 5,000 image queries
(605 varying pixels) are fitted to a relative loss of 2e-29, yet the smoke teacher's neurons
are only within cosine distance 0.02-0.03 of the teacher's, since weights along directions in
which the images hardly vary are barely determined; noise overlays, or the input subspace,
make every direction count.

``python -m eandc.mnist --profile standard`` runs a profile's teachers through
:func:`eandc.sweep.run_sweep` into ``results/mnist/<hash>/`` (``network.npz``, ``teacher.npz``,
``result.json``) and writes the tidy table ``results/mnist/summary.csv``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .classifier import accuracy, predict, train_classifier
from .compare import compare, silent_neurons
from .data import QUERY_SETS, mnist, query_set, varying_pixels
from .recover import NoClusterError, expand_and_cluster
from .storage import write_csv
from .subspace import expand_and_cluster_in_subspace
from .sweep import run_sweep, stored_rows

__all__ = ["PAPER_WIDTHS", "PAPER_RECOVERED", "PROFILES", "configs", "train_teacher",
           "recover_mnist_teacher", "select_teachers", "build_queries", "summary_rows",
           "write_summary", "stored_table", "run"]

KIND = "mnist"
TASK = "eandc.mnist:recover_mnist_teacher"
SHALLOW_ACTIVATIONS = ("g", "tanh", "sigmoid", "softplus", "relu")
# The paper's MNIST shallow teachers and the widths Expand-and-Cluster recovered (method notes 5.3).
PAPER_WIDTHS = {"g": 256, "tanh": 128, "sigmoid": 256, "softplus": 64, "relu": 64}
PAPER_RECOVERED = {"g": 258, "tanh": 133, "sigmoid": 276, "softplus": 69, "relu": 72}
DEEP_WIDTHS = [30, 30, 30]

DEFAULTS = {
    "activation": "g", "widths": [16], "rho": 4, "n_students": 6, "gamma": 0.5,
    "beta": math.pi / 6, "seed": 0, "teacher_seed": 1, "split": "test", "n_train": 8_000,
    "teacher_epochs": 30, "teacher_lr": 1e-3, "queries": {"images": True, "noise": 10_000},
    "train_options": {"finisher": "matfree"}, "consensus_rounds": 0,
}

# Keys added after runs were stored: a configuration holds one only where it differs from its
# default here, so the configurations (and hashes) of the runs stored before stay as they were.
LATER_DEFAULTS = {"teacher_bias_std": 1.0, "input_subspace": False, "input_polish_iter": 0,
                  "input_whitening": False, "retrain_options": None, "refit_shared": False,
                  "freeze_shared": True, "cluster_metric": "weights", "prune_network": True,
                  "finetune_iter": 300, "drop_undetermined": True}

# The shallow students in their teacher's whitened input subspace (16-64-10, 1,738 parameters;
# 1,898 with softplus's linear term) take the dense Levenberg-Marquardt finisher: eandc.gram
# builds their Gauss-Newton matrices with 77 times fewer multiply-adds than the Jacobian would
# (30 times faster: benchmarks/gram_speed.py). With it the g teacher's expansion took 47 s
# instead of 203 s with the matrix-free finisher (stages of 30 iterations), three of its four
# students at 1e-30 where the matrix-free finisher left none below 3e-13.
STANDARD_TRAINING = {"finisher": "dense", "max_iter": 12, "polish_iter": 10}
# Options that configs(overrides=) merges into a teacher's own instead of replacing them.
MERGED_OPTIONS = ("train_options", "retrain_options")
# Merged into the standard shallow teachers' training options, these give the configurations of
# their runs with the matrix-free finisher (float32 products), stored before the dense finisher.
MATRIX_FREE = {"train_options": {"finisher": "matfree", "cg_dtype": "float32"}}
CONTRAST_QUERIES = {"images": True, "contrast": 10_000}
# The options of the teachers whose logits are nearly linear on the images (see "standard").
CONTRAST_OPTIONS = {"queries": CONTRAST_QUERIES, "train_options": {**STANDARD_TRAINING, "max_iter": 30}}
# ReLU teachers start with zero hidden biases: with the recipe's N(0, 1) biases, 3 of the 16
# neurons of the standard teacher (seed 1) start below the range of their w . x over the images,
# are never active, never learn, and no query set built from the images reaches them; at 0 every
# neuron is active on at least 53% of the images and noise overlays (benchmarks/mnist_linearity.py).
RELU_TEACHER = {"teacher_bias_std": 0.0}
# Levenberg-Marquardt iterations of a network recovered in the input subspace, on the pixels
# (eandc.subspace.expand_and_cluster_in_subspace): they take the subspace's finite-difference
# error out of the held-out logits (relative RMSE 1e-12, 1e-9 for ReLU, without them).
SUBSPACE_POLISH = 5
# The deep teacher (its 4 students 30-90-90-90-10 in whitened subspace coordinates;
# benchmarks/mnist_deep.py measures the expansion and the second layer's retraining and
# clustering under each choice below): second-order steps crawl on these students, so they train by
# minibatch Adam only, as the published recipe does: 1,400 epochs (lr 1e-3, batches of 500) bring
# each teacher neuron of the first layer to a median of 1.3 degrees from its closest neuron in
# each student (benchmarks/results/mnist_deep-subspace-whitened-2026-12-07-054032.json); after
# each layer is shared (next layer refitted, nothing frozen, as the published code retrains),
# 4,800 epochs with the rate decaying from 1e-3 to 1e-4; neurons are clustered by their
# preactivations (the rows of the layers above the first scatter along directions in which the
# activities below hardly vary; the first layer's, in whitened coordinates, are the same), 3 of
# the 4 students agreeing within 10 degrees. The reconstructed network (about 3,200 parameters,
# 200,000 residuals) takes 50 matrix-free Levenberg-Marquardt iterations of fine-tune (about 4 s
# each on 2 cores; a dense iteration took 42 s) and no pruning (each pruning trial is a
# fine-tune): its loss falls linearly, from 1e-4 to 1e-8 in about 50 iterations.
DEEP_EPOCH_STEPS = 40  # minibatches of 500 per epoch of the 20,000 queries
DEEP_OPTIONS = {
    "queries": CONTRAST_QUERIES, "gamma": 0.75, "beta": math.radians(10),
    "cluster_metric": "preactivations", "refit_shared": True, "freeze_shared": False,
    "finetune_iter": 50, "prune_network": False,
    "train_options": {"finisher": "matfree", "adam_steps": 1_400 * DEEP_EPOCH_STEPS,
                      "adam_batch": 500, "adam_lr": 1e-3, "max_iter": 0, "polish_iter": 0,
                      "cg_dtype": "float32"},
    "retrain_options": {"adam_steps": 4_800 * DEEP_EPOCH_STEPS, "adam_lr": 1e-3,
                        "adam_lr_end": 1e-4}}
# Per profile: (activation, teacher widths, rho[, its own options]) of every teacher, and the
# options they share.
PROFILES = {
    "smoke": {"teachers": [("tanh", [2], 2)],
              "options": {"n_students": 4, "queries": {"images": 1_000, "noise": 2_000},
                          "train_options": {"finisher": "matfree", "max_iter": 60,
                                            "polish_iter": 20}}},
    # 4 students (2 must agree), the 10,000 images and 2,000 noise overlays (120,000 logits),
    # stages of 12 iterations. In pixel space (784-64-10 students, 50,890 parameters, the
    # matrix-free finisher with float32 products), g, softplus and ReLU: on the images and noise
    # overlays, a linear map explains 97.8-98.9% of their logits' variance (tanh, sigmoid:
    # 91%), and their students crawled (relative losses
    # 1e-4 to 1e-3 after 12 iterations, 6e-7 to 2e-4 and 8 bogus clusters of 16 for g after 40):
    # they take 10,000 contrast queries instead of noise overlays (their neurons' preactivations
    # swept through the bend: one g neuron's preactivation is in [-2, 2] on 5% of the images
    # and noise overlays, on 24% of the images and 10,000 contrast queries) and stages of 30;
    # the deep g teacher takes them too. Every teacher is recovered in the whitened coordinates
    # of its input subspace (eandc.subspace), the shallow ones by the dense finisher (see
    # STANDARD_TRAINING: 67 s for g, 1,208 s in pixel space; 118 s for ReLU, 4,712 s). With the
    # matrix-free finisher the softplus students stalled in raw subspace coordinates (none below
    # 1e-8 after the expansion, their first-layer neurons cut into 13 to 32 clusters of 16) and
    # were not robust in whitened ones (README): that teacher took 1,382 s in pixel space.
    "standard": {"teachers": [(a, [16], 4) if a in ("tanh", "sigmoid") else
                              (a, [16], 4, {**CONTRAST_OPTIONS, **(RELU_TEACHER if a == "relu" else {})})
                              for a in SHALLOW_ACTIVATIONS]
                 + [("g", DEEP_WIDTHS, 3, DEEP_OPTIONS)],
                 "options": {"n_students": 4, "queries": {"images": True, "noise": 2_000},
                             "train_options": STANDARD_TRAINING, "input_subspace": True,
                             "input_whitening": True, "input_polish_iter": SUBSPACE_POLISH}},
    "paper": {"teachers": [(a, [PAPER_WIDTHS[a]], 4, RELU_TEACHER if a == "relu" else {})
                           for a in SHALLOW_ACTIVATIONS]
              + [("g", DEEP_WIDTHS, 3)],
              "options": {"n_students": 20, "split": "train", "n_train": 50_000,
                          "queries": {"images": True, "noise": 50_000, "contrast": 50_000,
                                      "tiles2x2": 50_000}}},
}

SUMMARY_COLUMNS = ("profile", "activation", "teacher_widths", "student_widths", "recovered_widths",
                   "clustered_widths", "overhead_percent", "paper_teacher_width",
                   "paper_recovered_width", "median_cosine_distance", "max_cosine_distance",
                   "logit_rmse", "relative_logit_rmse", "argmax_agreement", "teacher_accuracy",
                   "recovered_accuracy", "query_set", "n_queries", "varying_pixels",
                   "subspace_dimension",
                   "silent_teacher_neurons", "wall_seconds", "device", "finished", "hash")


def normalize(config: dict) -> dict:
    """The configuration completed with :data:`DEFAULTS` (unknown keys are refused; a key of
    :data:`LATER_DEFAULTS` is kept only where it differs from its default)."""
    if not isinstance(config, dict):
        raise TypeError(f"a configuration is a dict, got {type(config).__name__}")
    known = {**DEFAULTS, **LATER_DEFAULTS}
    unknown = set(config) - set(known)
    if unknown:
        raise ValueError(f"unknown configuration key(s) {sorted(unknown)}; known: {sorted(known)}")
    config = {**DEFAULTS, **{k: v for k, v in config.items() if LATER_DEFAULTS.get(k, object()) != v}}
    polish = config.get("input_polish_iter", 0)
    if isinstance(polish, bool) or not isinstance(polish, int) or polish < 0:
        raise ValueError(f"input_polish_iter must be a non-negative integer, got {polish!r}")
    whitening = config.get("input_whitening", False)
    if not isinstance(whitening, bool):
        raise ValueError(f"input_whitening must be true or false, got {whitening!r}")
    for key, value in (("input_polish_iter", polish), ("input_whitening", whitening)):
        if value and not config.get("input_subspace", False):
            raise ValueError(f"{key} applies to a recovery in the input subspace "
                             "(input_subspace: true)")
    bad = set(config["queries"]) - set(QUERY_SETS)
    if bad:
        raise ValueError(f"unknown query set(s) {sorted(bad)}; known: {', '.join(QUERY_SETS)}")
    return config


def configs(profile: str = "standard", overrides: dict | None = None) -> list[dict]:
    """The configurations of :func:`recover_mnist_teacher` for the teachers of ``profile``,
    with ``overrides`` (for example ``{"seed": 1}``) applied to every one. The training options
    (``MERGED_OPTIONS``) are merged into each teacher's own rather than replacing them:
    ``{"train_options": {"finisher": "matfree", "cg_dtype": "float32"}}`` keeps each teacher's
    iterations (the configurations of the standard shallow runs stored before the dense
    finisher)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    spec = PROFILES[profile]
    result = []
    for a, w, rho, *own in spec["teachers"]:
        config = {**spec["options"], "activation": a, "widths": list(w), "rho": rho,
                  **(own[0] if own else {})}
        for key, value in (overrides or {}).items():
            merge = key in MERGED_OPTIONS and isinstance(value, dict) and isinstance(config.get(key), dict)
            config[key] = {**config[key], **value} if merge else value
        result.append(normalize(config))
    return result


def build_queries(images: np.ndarray, queries: dict, seed: int = 0) -> np.ndarray:
    """The query set of a configuration: ``{"images": True, "noise": n, ...}``, concatenated in
    that order (``"images": True`` is every image, an integer that many of them drawn at
    random); every random set draws from ``images`` with its own seed. A set's count may be
    ``{"n": n, **options}`` instead, the options going to :func:`eandc.data.query_set` (for
    example ``{"contrast": {"n": 10_000, "max_factor": 3.0}}``)."""
    parts = []
    for k, (name, n) in enumerate(_images_first(queries)):
        n, options = _count_and_options(name, n)
        if name == "images" and n is True:
            parts.append(query_set("images", images))
        elif n:
            parts.append(query_set(name, images, int(n), seed=seed + 100 + k, **options))
    if not parts:
        raise ValueError("the configuration asks for no queries")
    return np.concatenate(parts)


def _count_and_options(name: str, spec) -> tuple:
    """(count, options) of one query set's entry: ``n`` or ``{"n": n, **options}``."""
    if not isinstance(spec, dict):
        return spec, {}
    if "n" not in spec:
        raise ValueError(f"query set {name!r}: an entry with options needs its count 'n', got {spec}")
    options = dict(spec)
    return options.pop("n"), options


def _images_first(queries: dict) -> list[tuple]:
    return sorted(queries.items(), key=lambda kv: kv[0] != "images")


def query_description(queries: dict) -> str:
    """``"images + noise 10000"``: the query sets of a configuration, for tables (options in
    parentheses: ``"contrast 10000 (max_factor 3.0)"``)."""
    parts = []
    for name, spec in _images_first(queries):
        n, options = _count_and_options(name, spec)
        if n:
            text = name if n is True else f"{name} {n}"
            if options:
                text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(options.items())) + ")"
            parts.append(text)
    return " + ".join(parts)


def train_teacher(config: dict, images: np.ndarray, labels: np.ndarray):
    """The configuration's teacher, trained on the first ``n_train`` of ``images`` (its recipe:
    :func:`eandc.classifier.train_classifier` with the configuration's ``teacher_*`` keys)."""
    c = normalize(config)
    return train_classifier(images[:c["n_train"]], labels[:c["n_train"]], c["widths"], c["activation"],
                            n_classes=10, epochs=c["teacher_epochs"], lr=c["teacher_lr"],
                            bias_std=c.get("teacher_bias_std", LATER_DEFAULTS["teacher_bias_std"]),
                            seed=c["teacher_seed"], progress=False)


def recover_mnist_teacher(config: dict, checkpoint=None):
    """Train the configuration's teacher on MNIST, recover it from the configured queries and
    score the recovery on the held-out images. Returns (metrics, {"network", "teacher"})."""
    c = normalize(config)
    split = mnist(c["split"], progress=False)
    images, labels = split.images, split.labels
    if not 0 < c["n_train"] < len(images):
        raise ValueError(f"n_train must leave held-out images: 0 < n_train < {len(images)}")
    held_out, held_labels = images[c["n_train"]:], labels[c["n_train"]:]
    start = time.perf_counter()
    teacher = train_teacher(c, images, labels)
    teacher_seconds = time.perf_counter() - start
    X = build_queries(images, c["queries"], seed=c["seed"])
    mask = varying_pixels(X)
    student_widths = [c["rho"] * w for w in c["widths"]]
    metrics = {"teacher_accuracy": accuracy(teacher, held_out, held_labels),
               "teacher_seconds": teacher_seconds, "n_queries": len(X),
               "varying_pixels": int(mask.sum()),
               "silent_teacher_neurons": silent_neurons(teacher, X),
               "constant_pixels": np.flatnonzero(~mask).tolist(), "student_widths": student_widths,
               "device": "cpu"}  # expand_and_cluster's default device
    options = dict(student_widths=student_widths, n_students=c["n_students"], gamma=c["gamma"],
                   beta=c["beta"], seed=c["seed"], progress=False, train_options=c["train_options"],
                   consensus_rounds=c["consensus_rounds"], checkpoint=checkpoint,
                   **{key: c.get(key, LATER_DEFAULTS[key])
                      for key in ("retrain_options", "refit_shared", "freeze_shared",
                                  "cluster_metric", "prune_network", "finetune_iter",
                                  "drop_undetermined")})
    subspace = c.get("input_subspace", LATER_DEFAULTS["input_subspace"])
    try:
        if subspace:  # every pixel's weight is determined: no mask (eandc.subspace)
            result, found = expand_and_cluster_in_subspace(
                teacher, X, c["activation"], len(c["widths"]),
                input_polish_iter=c.get("input_polish_iter", LATER_DEFAULTS["input_polish_iter"]),
                whiten=c.get("input_whitening", LATER_DEFAULTS["input_whitening"]), **options)
            metrics.update(subspace_dimension=found.dimension, probe_queries=found.n_queries,
                           compared_pixels=X.shape[1])
            mask = None
        else:
            result = expand_and_cluster(teacher, X, c["activation"], len(c["widths"]),
                                        feature_mask=mask, **options)
            metrics["compared_pixels"] = int(mask.sum())
    except NoClusterError as error:
        metrics.update(success=False, error=str(error), widths=[0] * len(c["widths"]),
                       student_losses=[float(v) for v in error.student_losses[0]])
        return metrics, {"teacher": teacher}
    comparison = compare(teacher, result.network, held_out, feature_mask=mask)
    recovered = result.network
    metrics.update(
        comparison.to_dict(), widths=result.widths, clustered_widths=result.clustered_widths,
        source=result.source, final_loss=result.final_loss, timings=result.timings,
        student_losses=[float(v) for v in result.student_losses[0]],
        overhead_percent=100.0 * (sum(result.widths) - sum(c["widths"])) / sum(c["widths"]),
        argmax_agreement=float((predict(teacher, held_out) == predict(recovered, held_out)).mean()),
        recovered_accuracy=accuracy(recovered, held_out, held_labels),
        success=comparison.widths_match)
    return metrics, {"network": recovered, "teacher": teacher}


recover_mnist_teacher.normalize = normalize


def summary_rows(rows: list[dict], profile: str) -> list[dict]:
    """The tidy table (``SUMMARY_COLUMNS``) of :func:`eandc.sweep.run_sweep`'s rows."""
    table = []
    for r in rows:
        c, m = r["config"], r.get("metrics") or {}
        shallow = len(c["widths"]) == 1
        table.append({
            "profile": profile, "activation": c["activation"],
            "teacher_widths": "-".join(map(str, c["widths"])),
            "student_widths": "-".join(str(c["rho"] * w) for w in c["widths"]),
            "recovered_widths": "-".join(map(str, m["widths"])) if m.get("widths") else None,
            "clustered_widths": ("-".join(map(str, m["clustered_widths"]))
                                 if m.get("clustered_widths") else None),
            "overhead_percent": m.get("overhead_percent"),
            "paper_teacher_width": PAPER_WIDTHS.get(c["activation"]) if shallow else None,
            "paper_recovered_width": PAPER_RECOVERED.get(c["activation"]) if shallow else None,
            "median_cosine_distance": _per_layer(m.get("median_cosine_distance")),
            "max_cosine_distance": _per_layer(m.get("max_cosine_distance")),
            "logit_rmse": m.get("rmse"), "relative_logit_rmse": m.get("relative_rmse"),
            "argmax_agreement": m.get("argmax_agreement"),
            "teacher_accuracy": m.get("teacher_accuracy"),
            "recovered_accuracy": m.get("recovered_accuracy"),
            "query_set": query_description(c["queries"]), "n_queries": m.get("n_queries"),
            "varying_pixels": m.get("varying_pixels"),
            "subspace_dimension": m.get("subspace_dimension"),
            "silent_teacher_neurons": ("-".join(str(len(v)) for v in m["silent_teacher_neurons"])
                                       if "silent_teacher_neurons" in m else None),
            "wall_seconds": r.get("wall_seconds"),
            "device": m.get("device"), "finished": r.get("finished"), "hash": r["hash"]})
    return table


def _per_layer(values):
    if not values:
        return None
    return values[0] if len(values) == 1 else " / ".join(f"{v:.3g}" for v in values)


def write_summary(rows: list[dict], path: str | Path) -> Path:
    """Write the tidy table ``rows`` (:func:`summary_rows`) as CSV, atomically."""
    return write_csv(rows, SUMMARY_COLUMNS, path)


def stored_table(root: str | Path = "results", profiles=tuple(PROFILES),
                 overrides: dict | None = None) -> list[dict]:
    """The tidy table of every profile's runs stored under ``root/mnist`` (computes nothing;
    runs not stored yet are left out); ``overrides`` as in :func:`configs`."""
    table = []
    for profile in profiles:
        rows = stored_rows(configs(profile, overrides), TASK, kind=KIND, root=root)
        table += summary_rows([r for r in rows if r["status"] == "cached"], profile)
    return table


TEACHER_SELECTIONS = ("all", "shallow", "deep")


def select_teachers(configurations: list[dict], teachers: str = "all") -> list[dict]:
    """The configurations of one hidden layer (``"shallow"``), of several (``"deep"``), or all."""
    if teachers not in TEACHER_SELECTIONS:
        raise ValueError(f"unknown teacher selection {teachers!r}; choose one of: "
                         f"{', '.join(TEACHER_SELECTIONS)}")
    if teachers == "all":
        return list(configurations)
    return [c for c in configurations if (len(c["widths"]) == 1) == (teachers == "shallow")]


def run(profile: str, root: str | Path = "results", *, workers: int = 1, executor=None,
        progress: bool = True, overrides: dict | None = None, teachers: str = "all") -> list[dict]:
    """Run the teachers of ``profile`` (``overrides`` as in :func:`configs`; ``teachers``:
    ``"all"``, ``"shallow"`` or ``"deep"``, see :func:`select_teachers`) that are not stored
    yet, then rewrite ``root/mnist/summary.csv`` (every profile's stored runs with the default
    configurations); returns that table."""
    chosen = select_teachers(configs(profile, overrides), teachers)
    run_sweep(chosen, TASK, kind=KIND, root=root, executor=executor,
              workers=workers, progress=progress, summary=None,
              threads=max(1, (os.cpu_count() or 1) // max(1, workers)))
    table = stored_table(root)
    write_summary(table, Path(root) / KIND / "summary.csv")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eandc.mnist",
        description="Train and recover the MNIST teachers of a profile into RESULTS/mnist/ and "
                    "write RESULTS/mnist/summary.csv. Finished runs are not redone; a killed run "
                    "resumes. The MNIST files come from EANDC_DATA (see eandc.data.mnist).")
    parser.add_argument("--profile", choices=tuple(PROFILES), default="standard")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--workers", type=int, default=1, help="local processes")
    parser.add_argument("--teachers", choices=TEACHER_SELECTIONS, default="all",
                        help="the profile's shallow teachers, its deep one, or all")
    args = parser.parse_args(argv)
    table = run(args.profile, args.results, workers=args.workers, teachers=args.teachers)
    print(f"{len(table)} MNIST runs stored; table: {args.results / KIND / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
