"""The standard profile's shallow MNIST teachers recovered in their input subspace.

Each shallow teacher of ``eandc.mnist``'s standard profile (784-16-10; g, tanh, sigmoid,
softplus, ReLU), with its own query set and training options, recovered with
``input_subspace`` on (``eandc.subspace``) and the profile's subspace options (whitened
coordinates, ``input_polish_iter``; ``--overrides`` can change them): the black box is first
probed by finite differences along every pixel at a few images, and the students (16-64-10)
take the queries' coordinates in the span of the Jacobians' rows. Records per teacher the
recovered widths, the cosine distances on every pixel (no mask), argmax agreement on the
held-out images, the subspace dimension, the probe queries, the phases' seconds and the wall
time; the wall time of the stored pixel-space run of the same teacher (under
``results/mnist``, another day: this machine's speed varies between runs) is printed beside
it, without a ratio::

    EANDC_DATA=../shared/data/mnist python benchmarks/mnist_subspace.py [--activations tanh,relu]
        [--overrides '{"seed": 1}']

``--polish N`` then takes N Levenberg-Marquardt iterations of the lifted network on all 784
pixels and reports the held-out RMSE after them (the subspace's finite-difference error is in
the lifted weights; the iterations remove it where the queries vary). The profile's
configurations already take ``input_polish_iter`` such iterations inside the recovery; to see
the RMSE before and after them, ``--overrides '{"input_polish_iter": 0}' --polish 5``.
``--overrides`` sets configuration keys of every teacher; training options are merged into
each teacher's own (``eandc.mnist.configs``): ``'{"train_options": {"finisher": "matfree",
"cg_dtype": "float32"}}'`` (``eandc.mnist.MATRIX_FREE``) gives the runs with the matrix-free
finisher stored before the profile took the dense one.

Prints a table and writes ``benchmarks/results/mnist_subspace-<date>-<time>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from record import write_record

from eandc import mnist
from eandc.compare import compare
from eandc.data import mnist as load_mnist
from eandc.reconstruction import finetune
from eandc.sweep import stored_rows
from eandc.teachers import query

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("widths", "clustered_widths", "median_cosine_distance", "max_cosine_distance",
        "relative_rmse", "argmax_agreement", "teacher_accuracy", "subspace_dimension",
        "probe_queries", "compared_pixels", "n_queries", "student_losses", "source", "timings",
        "success")


def stored_pixel_seconds() -> dict:
    """Wall seconds of the stored pixel-space runs of the standard shallow teachers (the
    profile's configurations with ``input_subspace`` off and the matrix-free finisher), by
    activation."""
    pixels = {"input_subspace": False, "input_polish_iter": 0, "input_whitening": False,
              **mnist.MATRIX_FREE}
    shallow = mnist.select_teachers(mnist.configs("standard", pixels), "shallow")
    return {r["config"]["activation"]: r["wall_seconds"]
            for r in stored_rows(shallow, mnist.TASK, kind=mnist.KIND, root=ROOT / "results")
            if r["status"] == "cached"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", default=",".join(mnist.SHALLOW_ACTIVATIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overrides", type=json.loads, default={},
                        help='JSON of configuration keys for every teacher, for example '
                             '\'{"seed": 1, "n_students": 6}\' (see eandc.mnist.DEFAULTS)')
    parser.add_argument("--polish", type=int, default=0, metavar="N",
                        help="then N Levenberg-Marquardt iterations of the lifted network on all "
                             "784 pixels; report their seconds and the held-out RMSE after them")
    args = parser.parse_args()
    if args.polish < 0:
        parser.error(f"--polish must be >= 0, got {args.polish}")
    if not isinstance(args.overrides, dict):
        parser.error(f"--overrides must be a JSON object, got {args.overrides!r}")
    torch.set_num_threads(args.threads)
    wanted = args.activations.split(",")
    unknown = set(wanted) - set(mnist.SHALLOW_ACTIVATIONS)
    if unknown:
        parser.error(f"unknown activation(s) {sorted(unknown)}; the standard shallow teachers: "
                     f"{', '.join(mnist.SHALLOW_ACTIVATIONS)}")
    # every teacher, softplus too, as the profile recovers those in their subspace
    overrides = {"input_whitening": True, "input_polish_iter": mnist.SUBSPACE_POLISH,
                 **args.overrides, "input_subspace": True}
    pixels = stored_pixel_seconds()
    rows, total = [], 0.0
    for config in mnist.select_teachers(mnist.configs("standard", overrides), "shallow"):
        if config["activation"] not in wanted:
            continue
        start = time.perf_counter()
        metrics, networks = mnist.recover_mnist_teacher(config)
        seconds = time.perf_counter() - start
        total += seconds
        rows.append({"activation": config["activation"], "config": config, "wall_seconds": seconds,
                     "stored_pixel_space_seconds": pixels.get(config["activation"]),
                     **{k: metrics.get(k) for k in KEYS}})
        r = rows[-1]
        if args.polish and "network" in networks:
            r["polish"] = polish_in_pixels(config, networks, args.polish)
            print(f"{r['activation']:9s} {args.polish} iterations on the pixels: relative RMSE "
                  f"{r['relative_rmse']:.1e} -> {r['polish']['relative_rmse']:.1e} in "
                  f"{r['polish']['seconds']:.0f} s", flush=True)
        print(f"{r['activation']:9s} widths {r['widths']} (clusters {r['clustered_widths']}), "
              f"max cos dist {max(r['max_cosine_distance'] or [float('nan')]):.1e} on "
              f"{r['compared_pixels']} pixels, argmax agreement {r['argmax_agreement']}, subspace "
              f"{r['subspace_dimension']} dims ({r['probe_queries']} probes), {seconds:.0f} s "
              f"(stored pixel-space run: {_seconds(r['stored_pixel_space_seconds'])})", flush=True)
    print(f"total {total:.0f} s for {len(rows)} teachers")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    write_record("mnist_subspace", dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                                        commit=commit, machine=platform.platform(),
                                        torch=torch.__version__, threads=args.threads,
                                        overrides=args.overrides, total_seconds=total, rows=rows))


def polish_in_pixels(config: dict, networks: dict, iterations: int) -> dict:
    """Levenberg-Marquardt iterations of the lifted network on the configuration's queries, in
    pixel space: its seconds, then the comparison with the teacher on the held-out images."""
    split = load_mnist(config["split"], progress=False)
    X = torch.as_tensor(mnist.build_queries(split.images, config["queries"], seed=config["seed"]))
    teacher = networks["teacher"]
    start = time.perf_counter()
    network, loss = finetune(networks["network"], X, query(teacher, X), max_iter=iterations)
    seconds = time.perf_counter() - start
    comparison = compare(teacher, network, split.images[config["n_train"]:])
    return {"iterations": iterations, "seconds": seconds, "relative_loss": loss,
            "relative_rmse": comparison.relative_rmse,
            "max_cosine_distance": [float(layer.distances.max()) for layer in comparison.layers]}


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.0f} s"


if __name__ == "__main__":
    main()
