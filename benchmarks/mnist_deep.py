"""Where the deep MNIST teacher's expansion stands on a small CPU.

The standard profile's deep g teacher (784-30-30-30-10, its queries: the 10,000 images and
10,000 contrast queries) is to be recovered by students 784-90-90-90-10 (rho 3). This script
measures the first steps of that expansion, on the 4 students the profile trains, started as
``eandc.expand_and_cluster`` starts deep students (``DEEP_INIT_SCALE``):

1. full-batch Adam (the library's default first-order phase, lr 3e-3) for ``--full-steps`` steps;
2. minibatch Adam (``adam_batch``, lr 1e-3, as the published recipe) from the same start, for
   ``--epochs`` epochs;
3. how far the minibatch students' first layers are from the teacher's: for each teacher neuron,
   the best cosine similarity of ``[w; b]`` (varying pixels only) among each student's neurons,
   and the number of first-layer clusters ``eandc.clustering.cluster_layer`` keeps;
4. ``--lm-iterations`` matrix-free Levenberg-Marquardt iterations from the minibatch students
   (float32 products, as the profile trains), their relative losses and seconds;
5. with ``--second-layer-epochs N``: the first layer clustered (gamma 0.75, beta 10 degrees:
   ``SHARED_FIRST_LAYER``) and written into every student (``write_shared_layer``), the students
   retrained by minibatch Adam for N epochs with that layer fixed, as the layer-by-layer
   recovery retrains them, and their second layers clustered; the students' losses just after
   the sharing are recorded as written and with their second layers refitted by least squares
   (``refit_next_layer``), and ``--refit`` retrains the refitted ones. ``--free`` retrains
   with nothing fixed (the published code's retraining, ``expand_and_cluster(freeze_shared=False)``)
   and ``--lr-end`` decays the retraining's learning rate geometrically from 1e-3 to it.

The clusters of a layer are counted on a grid of (gamma, beta) (``GRID``): with 4 students,
gamma 0.5 keeps a cluster of 2 students, 0.75 of 3; for the second layer, both on the neurons'
rows (the paper) and on their preactivations (``cluster_metric="preactivations"``,
``eandc.clustering.preactivation_metric`` of the shared first layer's activities).

With ``--subspace`` the students take the 30 coordinates of the queries in the teacher's input
subspace (``eandc.subspace``, found by finite differences of the teacher) instead of the 784
pixels: students 30-90-90-90-10, queried at the projections of the queries; their first layers,
lifted to the pixels, are compared with the teacher's on every pixel. With ``--whiten`` as well,
they take the whitened coordinates (``InputSubspace.whitened``: centred, unit variance along the
queries' principal axes).

::

    EANDC_DATA=../shared/data/mnist python benchmarks/mnist_deep.py

Prints what it measures and writes ``benchmarks/results/mnist_deep-<date>-<time>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time

import numpy as np
import torch
from record import write_record

from eandc import mnist
from eandc.activations import get_activation
from eandc.clustering import cluster_layer, preactivation_metric
from eandc.compare import compare
from eandc.data import mnist as load_mnist
from eandc.data import varying_pixels
from eandc.matfree import matfree_levenberg_marquardt
from eandc.mlp import Layout, StudentBatch
from eandc.reconstruction import refit_next_layer, write_shared_layer
from eandc.recover import DEEP_INIT_SCALE, layer_inputs
from eandc.runs import machine
from eandc.subspace import input_subspace
from eandc.training import adam_phase, init_students, student_losses

GRID = [(0.5, 10), (0.5, 30), (0.75, 10), (0.75, 30), (1.0, 10), (1.0, 30)]  # gamma, beta (deg)
SHARED_FIRST_LAYER = (0.75, 10)


def clusters_on_grid(students, layer, losses, mask=None, metric=None) -> dict:
    """How many clusters of ``layer`` are kept at each (gamma, beta) of ``GRID``."""
    return {f"gamma {g} beta {b} deg": cluster_layer(students, layer, g, math.radians(b),
                                                     np.asarray(losses), mask,
                                                     input_metric=metric).width
            for g, b in GRID}


def relative_losses(theta, layout, act, X, y) -> list[float]:
    scale = float(y.var(dim=0, unbiased=False).mean())
    return (student_losses(theta, layout, act, X, y) / scale).tolist()


def first_layer_alignment(teacher, students: StudentBatch, X, mask, subspace=None) -> dict:
    """Per teacher neuron, the best cosine similarity of ``[w; b]`` (varying pixels and the bias)
    with a student's first-layer neuron (``eandc.compare``: g has no sign symmetry, so signed);
    per student, then summed up. Students in ``subspace`` coordinates are lifted to the pixels."""
    def student(k):
        net = students.student(k)
        return net if subspace is None else subspace.lift(net)

    best = np.array([1 - compare(teacher, student(k), X, feature_mask=mask).layers[0].distances
                     for k in range(students.n_students)])  # (students, teacher neurons)
    beta = mnist.DEFAULTS["beta"]
    return {"best_cosine_per_student_median": np.median(best, 1).tolist(),
            "best_cosine_per_student_min": best.min(1).tolist(),
            "teacher_neurons_within_beta_per_student": (best >= math.cos(beta)).sum(1).tolist(),
            "teacher_neurons_within_0.1_degree_per_student":
                (best >= math.cos(math.radians(0.1))).sum(1).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full-steps", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--lm-iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--subspace", action="store_true",
                        help="train the students on the queries' coordinates in the teacher's "
                             "input subspace (eandc.subspace)")
    parser.add_argument("--second-layer-epochs", type=int, default=0,
                        help="retrain with the clustered first layer shared, then cluster the "
                             "second (item 5 of the doc)")
    parser.add_argument("--refit", action="store_true",
                        help="with --second-layer-epochs: refit the second layer by least squares "
                             "after sharing the first (eandc.reconstruction.refit_next_layer)")
    parser.add_argument("--free", action="store_true",
                        help="with --second-layer-epochs: retrain with nothing fixed")
    parser.add_argument("--lr-end", type=float, default=None,
                        help="with --second-layer-epochs: the retraining's rate decays from 1e-3 "
                             "to this")
    parser.add_argument("--whiten", action="store_true",
                        help="with --subspace: whitened coordinates (InputSubspace.whitened)")
    args = parser.parse_args()
    if args.whiten and not args.subspace:
        parser.error("--whiten applies with --subspace")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = mnist.configs("standard")[-1]
    assert len(config["widths"]) == 3, config
    split = load_mnist("test", progress=False)
    teacher = mnist.train_teacher(config, split.images, split.labels)
    X = torch.as_tensor(mnist.build_queries(split.images, config["queries"], seed=config["seed"]))
    mask = varying_pixels(X.numpy())
    record = {}
    subspace, X_pixels = None, X
    if args.subspace:
        t0 = time.perf_counter()
        subspace = input_subspace(teacher, X)
        if args.whiten:
            subspace = subspace.whitened(X)
        X = subspace.project(X_pixels)
        record["subspace"] = {"dimension": subspace.dimension, "probe_queries": subspace.n_queries,
                              "points": subspace.n_points, "whitened": args.whiten,
                              "seconds": time.perf_counter() - t0}
        mask = None  # lifted students have every pixel's weight
    y = teacher(X_pixels if subspace is None else subspace.embed(X))
    act = get_activation(config["activation"])
    widths = tuple(config["rho"] * w for w in config["widths"])
    layout = Layout(X.shape[1], widths, y.shape[1], act.leaves_linear_term)
    start = init_students(layout, act, config["n_students"], y, seed=config["seed"],
                          scale=DEEP_INIT_SCALE).theta
    record = {**record, "config": config, "student_widths": list(widths), "n_queries": len(X),
              "n_parameters": layout.size, "teacher_accuracy": mnist.accuracy(
                  teacher, split.images[config["n_train"]:], split.labels[config["n_train"]:])}
    if subspace is not None:
        print(f"input subspace: {subspace.dimension} dimensions, {subspace.n_queries} probe queries, "
              f"{record['subspace']['seconds']:.1f} s", flush=True)
    print(f"deep teacher {config['widths']}, held-out accuracy {record['teacher_accuracy']:.4f}; "
          f"{config['n_students']} students {list(widths)} ({layout.size} parameters each), "
          f"{len(X)} queries", flush=True)

    t0 = time.perf_counter()
    full = adam_phase(start, layout, act, X, y, args.full_steps, lr=3e-3)
    record["full_batch_adam"] = {"steps": args.full_steps, "lr": 3e-3,
                                 "seconds": time.perf_counter() - t0,
                                 "relative_losses": relative_losses(full, layout, act, X, y)}
    per_epoch = math.ceil(len(X) / args.batch)
    t0 = time.perf_counter()
    mini = adam_phase(start, layout, act, X, y, args.epochs * per_epoch, lr=1e-3,
                      batch_size=args.batch, seed=config["seed"])
    record["minibatch_adam"] = {"epochs": args.epochs, "batch": args.batch, "lr": 1e-3,
                                "steps": args.epochs * per_epoch,
                                "seconds": time.perf_counter() - t0,
                                "relative_losses": relative_losses(mini, layout, act, X, y)}
    for name in ("full_batch_adam", "minibatch_adam"):
        r = record[name]
        print(f"{name:16s} {r['steps']:6d} steps {r['seconds']:7.1f} s   relative losses "
              + " ".join(f"{v:.2e}" for v in r["relative_losses"]), flush=True)

    students = StudentBatch(mini, layout, act)
    n = config["n_students"]
    clustering = cluster_layer(students, 0, config["gamma"], config["beta"], np.zeros(n), mask,
                               np.ones(n, bool))
    losses = record["minibatch_adam"]["relative_losses"]
    record["first_layer"] = {"clusters_kept": clustering.width, **first_layer_alignment(
        teacher, students, X_pixels[:1000], mask, subspace),
        "clusters_kept_grid": clusters_on_grid(students, 0, losses, mask)}
    print("first layer after minibatch Adam: " + json.dumps(record["first_layer"]), flush=True)
    if args.second_layer_epochs:
        gamma, beta = SHARED_FIRST_LAYER
        first = cluster_layer(students, 0, gamma, math.radians(beta), np.asarray(losses), mask)
        shared = write_shared_layer(students, first, np.asarray(losses))
        refitted = refit_next_layer(shared, students, 0, X)
        after_sharing = {"plain": relative_losses(shared.theta, shared.layout, act, X, y),
                         "refitted": relative_losses(refitted.theta, shared.layout, act, X, y)}
        if args.refit:
            shared = refitted
        t0 = time.perf_counter()
        theta = adam_phase(shared.theta, shared.layout, act, X, y,
                           args.second_layer_epochs * per_epoch, lr=1e-3, batch_size=args.batch,
                           seed=config["seed"] + 1, fixed_layers=0 if args.free else 1,
                           lr_end=args.lr_end)
        second = StudentBatch(theta, shared.layout, act)
        losses2 = relative_losses(theta, shared.layout, act, X, y)
        metric = preactivation_metric(layer_inputs(second, np.asarray(losses2), 1, X))
        angles = sorted(round(math.degrees(c.median_angle), 1)
                        for c in cluster_layer(second, 1, 0.75, math.pi / 6, np.asarray(losses2)).kept)
        record["second_layer"] = {
            "shared_first_layer": {"gamma": gamma, "beta_degrees": beta, "width": first.width},
            "relative_losses_after_sharing": after_sharing, "refitted": args.refit,
            "epochs": args.second_layer_epochs, "seconds": time.perf_counter() - t0,
            "free": args.free, "lr_end": args.lr_end,
            "relative_losses": losses2, "clusters_kept_grid": clusters_on_grid(second, 1, losses2),
            "clusters_kept_grid_preactivations": clusters_on_grid(second, 1, losses2,
                                                                  metric=metric),
            "median_angles_degrees_gamma_0.75_beta_30": angles}
        print("second layer after retraining: " + json.dumps(record["second_layer"]), flush=True)

    trace = []

    def callback(info):
        trace.append({"iteration": info["it"], "seconds": info["seconds"],
                      "relative_losses": info["rel"].tolist(),
                      "cg_iterations": info["cg_iterations"].tolist()})
        print(f"LM iteration {info['it']}: {info['seconds']:.1f} s, conjugate-gradient iterations "
              f"{info['cg_iterations'].tolist()}, relative losses "
              + " ".join(f"{v:.2e}" for v in info["rel"].tolist()), flush=True)

    matfree_levenberg_marquardt(mini, layout, act, X, y, max_iter=args.lm_iterations,
                                cg_dtype=config["train_options"].get("cg_dtype"), callback=callback)
    record["levenberg_marquardt"] = trace
    record.update(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine(),
                  threads=torch.get_num_threads())
    name = "mnist_deep" + ("-subspace" if subspace else "") + ("-whitened" if args.whiten else "")
    write_record(name, record)


if __name__ == "__main__":
    main()
