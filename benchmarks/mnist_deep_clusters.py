"""Which of the deep MNIST students' third-layer clusters are teacher neurons, under two rule sets.

Runs the standard profile's deep teacher (``eandc.mnist``: 784-30-30-30-10, g, its
``DEEP_OPTIONS``) as ``python -m eandc.mnist`` does, but with the clustering rules of before
2026-12-07 evening (no ``drop_undetermined``, a loose cluster's tight group kept at median
angles up to beta, not beta/2), and stops where the last hidden layer is about to be
reconstructed. Those students' third layer is then clustered twice, under the old rules and
under the current ones (``eandc.clustering.undetermined_neurons``, ``CORE_BETA_FRACTION``), and
each kept cluster is matched to the teacher neuron whose preactivation on the queries is closest
in angle to its representative's (the black box opened for the diagnosis only). Prints, per
rule set, the width and each cluster's students, members, median angle, why it is kept, its
closest teacher neuron and cosine distance, and its ablation effect
(``eandc.clustering.ablation_effects``) against the students' losses::

    EANDC_DATA=../shared/data/mnist python benchmarks/mnist_deep_clusters.py
        [--checkpoint PATH]

The training (about 13 minutes on 2 cores) is checkpointed in ``PATH`` (default: the per-user
cache), which a second run reuses. Writes ``benchmarks/results/mnist_deep_clusters-<date>.json``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from record import write_record

from eandc import clustering, mnist
from eandc import recover as recover_module
from eandc.checkpoint import Checkpoint
from eandc.data import mnist as load_mnist
from eandc.runs import config_hash
from eandc.storage import user_cache_folder
from eandc.training import _target_scale


class _Captured(Exception):
    """Raised once the students of the last hidden layer are in hand."""

    def __init__(self, students, losses, X, y):
        super().__init__("captured")
        self.students, self.losses, self.X, self.y = students, losses, X, y


def _capture(students, clustering_, losses, X, y, *args, **kwargs):
    raise _Captured(students, losses, X, y)


def train_to_last_layer(config: dict, checkpoint_path) -> _Captured:
    """The students, their losses and the (subspace) queries and targets at the last layer."""
    with Checkpoint(checkpoint_path, 60, fingerprint="mnist_deep_clusters:" +
                    config_hash(config)) as checkpoint, \
            mock.patch.object(recover_module, "_reconstruct", _capture), \
            mock.patch.object(clustering, "CORE_BETA_FRACTION", 1.0):
        try:
            mnist.recover_mnist_teacher({**config, "drop_undetermined": False},
                                        checkpoint=checkpoint)
        except _Captured as captured:
            return captured
    raise RuntimeError("the recovery ended before its last layer was reconstructed")


def teacher_preactivations(config: dict) -> torch.Tensor:
    """The teacher's third-layer preactivations on the configuration's queries, ``(n, 30)``."""
    split = load_mnist(config["split"], progress=False)
    teacher = mnist.train_teacher(config, split.images, split.labels)
    X = torch.as_tensor(mnist.build_queries(split.images, config["queries"], seed=config["seed"]),
                        dtype=torch.float64).reshape(-1, teacher.d_in)
    below = teacher.hidden(X)[-2]
    return below @ teacher.weights[-2].T + teacher.biases[-2]


def describe(captured: _Captured, teacher_pre: torch.Tensor, config: dict, current: bool) -> dict:
    students, losses, X, y = captured.students, captured.losses, captured.X, captured.y
    layer = students.n_hidden_layers - 1
    effects = clustering.ablation_effects(students, layer, X, _target_scale(y))
    exclude = effects <= losses[:, None] if current else None
    metric = clustering.preactivation_metric(recover_module.layer_inputs(students, losses, layer, X))
    betas = config["beta"] if isinstance(config["beta"], list) else [config["beta"]] * 3
    with mock.patch.object(clustering, "CORE_BETA_FRACTION",
                           clustering.CORE_BETA_FRACTION if current else 1.0):
        result = clustering.cluster_layer(
            students, layer, config["gamma"], betas[layer], losses, None,
            recover_module.converged(losses, clustering.min_students(config["gamma"], len(losses))),
            input_metric=metric, exclude=exclude)
    unit_teacher = teacher_pre / teacher_pre.norm(dim=0)
    rank = np.argsort(np.argsort(losses))
    rows = []
    for cluster in result.kept:
        best = cluster.core[np.argmin(rank[result.student[cluster.core]])]
        s, j = int(result.student[best]), int(result.neuron[best])
        student = students.student(s)
        pre = student.hidden(X)[layer - 1] @ student.weights[layer][j] + student.biases[layer][j]
        cosines = unit_teacher.T @ (pre / pre.norm())
        rows.append({"students": cluster.n_students, "members": len(cluster.members),
                     "median_angle_deg": math.degrees(cluster.median_angle),
                     "reason": cluster.reason, "teacher_neuron": int(cosines.argmax()),
                     "cosine_distance": 1 - float(cosines.max()),
                     "effect": float(effects[s, j])})
    matched = {r["teacher_neuron"] for r in rows}
    return {"width": result.width, "teacher_neurons_matched": len(matched),
            "excluded_per_student": None if exclude is None else exclude.sum(1).tolist(),
            "clusters": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(user_cache_folder("benchmarks")
                                                    / "mnist_deep_clusters.npz"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
    config = mnist.select_teachers(mnist.configs("standard"), "deep")[0]
    start = time.perf_counter()
    captured = train_to_last_layer(config, args.checkpoint)
    seconds = time.perf_counter() - start
    teacher_pre = teacher_preactivations(config)
    record = {"config": config, "checkpoint": args.checkpoint, "training_seconds": seconds,
              "student_losses": captured.losses.tolist()}
    for name, current in (("old_rules", False), ("current_rules", True)):
        summary = describe(captured, teacher_pre, config, current)
        record[name] = summary
        print(f"\n{name}: width {summary['width']}, {summary['teacher_neurons_matched']} teacher "
              f"neurons matched; excluded per student {summary['excluded_per_student']}")
        for k, r in enumerate(summary["clusters"]):
            print(f"  {k:2d}: {r['students']} students, {r['members']:3d} members, median "
                  f"{r['median_angle_deg']:5.1f} deg, teacher {r['teacher_neuron']:2d} at "
                  f"{r['cosine_distance']:.1e}, effect {r['effect']:.1e}  ({r['reason']})")
    print(f"\nstudent losses {np.array2string(captured.losses, precision=2)}")
    write_record("mnist_deep_clusters", record)


if __name__ == "__main__":
    main()
