"""The dense Gauss-Newton matrix of one-hidden-layer students: from the Jacobian against
eandc.gram (the sum over the outputs taken first), on the MNIST chapter's students.

    python benchmarks/gram_speed.py [--threads 2] [--rows 4000] [--students 4]

Students 16-64-10 (the standard MNIST teachers' students in their whitened input subspace;
also with softplus's linear term, 16-64-10 + 160) and students with one output (those of the
training benchmark's T2 and T1, 8-64-1 and 2-16-1), where only the sums over pairs of neurons and
pairs of inputs save work. Prints seconds per matrix, the ratio, the multiply-adds
each way and the largest relative difference between the two matrices. Writes
``benchmarks/results/gram_speed-<date>-<time>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import time
from pathlib import Path

import torch
from record import write_record

from eandc import get_activation
from eandc import gram as shallow_gram
from eandc.mlp import Layout
from eandc.training import jacobian

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = [(16, (64,), 10, False), (16, (64,), 10, True), (8, (64,), 1, False), (2, (16,), 1, False)]


def from_jacobian(theta, layout, activation, X, y, rows=500):
    """J^T J, J^T r and the squared error from the analytic Jacobian, chunk by chunk (what
    eandc.training._gauss_newton does when eandc.gram does not apply)."""
    N, P = theta.shape
    gram = torch.zeros(N, P, P, dtype=theta.dtype)
    grad = torch.zeros(N, P, dtype=theta.dtype)
    sse = torch.zeros(N, dtype=theta.dtype)
    for start in range(0, X.shape[0], rows):
        out, jac = jacobian(theta, layout, activation, X[start:start + rows])
        r = (out - y[start:start + rows]).flatten(1)
        jac = jac.flatten(1, 2)
        gram += jac.transpose(1, 2) @ jac
        grad += (jac.transpose(1, 2) @ r[:, :, None])[:, :, 0]
        sse += r.square().sum(1)
    return gram, grad, sse


def best_seconds(fn, *args, reps=3):
    times, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--students", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    act, gen, results = get_activation("g"), torch.Generator().manual_seed(0), []
    for d_in, widths, d_out, skip in LAYOUTS:
        layout = Layout(d_in, widths, d_out, skip)
        theta = torch.randn(args.students, layout.size, generator=gen, dtype=torch.float64) / d_in ** 0.5
        X = torch.randn(args.rows, d_in, generator=gen, dtype=torch.float64)
        y = torch.randn(args.rows, d_out, generator=gen, dtype=torch.float64)
        jac_s, want = best_seconds(from_jacobian, theta, layout, act, X, y)
        gram_s, got = best_seconds(shallow_gram.gauss_newton, theta, layout, act, X, y)
        difference = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want))
        row = dict(sizes=layout.sizes, skip=skip, parameters=layout.size,
                   jacobian_seconds=jac_s, gram_seconds=gram_s, speedup=jac_s / gram_s,
                   jacobian_multiply_adds=float(args.rows) * d_out * layout.size ** 2,
                   gram_multiply_adds=shallow_gram.gram_multiply_adds(layout, args.rows),
                   max_relative_difference=difference)
        results.append(row)
        name = "-".join(map(str, layout.sizes)) + (" + linear term" if skip else "")
        print(f"{name:26s} P {layout.size:5d}: from the Jacobian {jac_s:7.3f} s, eandc.gram "
              f"{gram_s:7.3f} s ({row['speedup']:.1f}x; multiply-adds "
              f"{row['jacobian_multiply_adds'] / row['gram_multiply_adds']:.1f}x fewer), "
              f"largest relative difference {difference:.1e}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    write_record("gram_speed", dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                                    commit=commit, machine=platform.platform(),
                                    processor=platform.processor(), torch=torch.__version__,
                                    threads=args.threads, students=args.students, rows=args.rows,
                                    activation="g", results=results))


if __name__ == "__main__":
    main()
