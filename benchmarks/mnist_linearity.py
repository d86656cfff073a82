"""How linear is each standard MNIST teacher on each query set?

For every shallow teacher of ``eandc.mnist``'s standard profile and every query set, the share of
the variance of the teacher's logits that the best affine map of the queries leaves unexplained
(least squares on ``[X, 1]``; 0: the teacher is linear there), the share of each neuron's
preactivations inside ``[-2, 2]``, near the activation's bend, the least share of queries on
which a neuron's preactivation is positive (a ReLU neuron's weights are seen only there), and the
neurons silent on every
query (``eandc.compare.silent_neurons``: a ReLU neuron inactive on all of them, which no recovery
from those queries can find). Why the g, softplus and ReLU
teachers take contrast queries (``eandc.data.contrast_queries``)::

    EANDC_DATA=../shared/data/mnist python benchmarks/mnist_linearity.py

Prints a table and writes ``benchmarks/results/mnist_linearity-<date>-<time>.json``.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch
from record import write_record

from eandc import mnist
from eandc.compare import silent_neurons
from eandc.data import mnist as load_mnist

QUERY_SETS = {"images + noise 2000": {"images": True, "noise": 2_000},
              "images + contrast 2000": {"images": True, "contrast": 2_000},
              "images + contrast 10000": {"images": True, "contrast": 10_000},
              "contrast 12000": {"contrast": 12_000},
              "images + contrast 10000 (max_factor 3)": {"images": True,
                                                         "contrast": {"n": 10_000, "max_factor": 3.0}},
              "images + noise 10000 (noise_std 0.5)": {"images": True,
                                                       "noise": {"n": 10_000, "noise_std": 0.5}},
              "images + noise 10000 (noise_std 1)": {"images": True,
                                                     "noise": {"n": 10_000, "noise_std": 1.0}}}


def unexplained_share(X: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared residual of the least-squares affine fit of ``y`` on ``X`` over the mean
    variance of ``y``'s columns."""
    design = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    coef = torch.linalg.lstsq(design, y).solution
    return float(((design @ coef - y) ** 2).mean() / y.var(0).mean())


def main() -> None:
    split = load_mnist("test", progress=False)
    rows = []
    for config in mnist.configs("standard"):
        if len(config["widths"]) != 1:
            continue
        teacher = mnist.train_teacher(config, split.images, split.labels)
        for name, queries in QUERY_SETS.items():
            X = torch.as_tensor(mnist.build_queries(split.images, queries, seed=config["seed"]))
            y = teacher(X)
            z = X @ teacher.weights[0].T + teacher.biases[0]
            near_bend = (z.abs() < 2).double().mean(0).numpy()
            rows.append({"activation": config["activation"], "queries": name,
                         "unexplained_share": unexplained_share(X, y),
                         "near_bend_median": float(np.median(near_bend)),
                         "near_bend_min": float(near_bend.min()),
                         "least_positive_share": float((z > 0).double().mean(0).min()),
                         "silent_neurons": silent_neurons(teacher, X)[0]})
            print(f"{config['activation']:9s} {name:40s} unexplained by an affine map "
                  f"{rows[-1]['unexplained_share']:.3f}   preactivations in [-2, 2]: median "
                  f"{rows[-1]['near_bend_median']:.2f}, least {rows[-1]['near_bend_min']:.2f}   "
                  f"positive: least {rows[-1]['least_positive_share']:.4f}   silent neurons "
                  f"{rows[-1]['silent_neurons']}",
                  flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    write_record("mnist_linearity", dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                                         commit=commit, machine=platform.platform(),
                                         torch=torch.__version__, rows=rows))


if __name__ == "__main__":
    main()
