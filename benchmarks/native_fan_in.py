"""Where the native kernel stops paying: the loss gradient of 10 g students, native against
chunked PyTorch, as the widest layer input grows (the basis of ``eandc.native.MAX_FAN_IN``).

    python benchmarks/native_fan_in.py [--threads 2] [--rows 5000]

Layouts: one hidden layer of 64 neurons on 8 to 256 inputs (one output), MNIST-sized 784-128-10,
and deep students on few inputs with hidden layers of 64 to 128 (the kernel's limit applies to
every layer's inputs). Prints milliseconds per gradient and their ratio. Then, on T2's students
(8-64-1), the native gradient under each activation: ReLU costs almost nothing to evaluate, so
its time is the linear algebra's, and the rest of another activation's time is the activation's
own. Writes ``benchmarks/results/native_fan_in-<date>-<time>.json``.
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

from eandc import get_activation, native
from eandc.fast import loss_and_gradient
from eandc.mlp import Layout

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = [(8, (64,), 1), (32, (64,), 1), (64, (64,), 1), (96, (64,), 1), (128, (64,), 1),
           (256, (64,), 1), (784, (128,), 10), (8, (64, 64), 1), (30, (90, 90, 90), 10),
           (30, (128, 128), 10)]


def best_seconds(fn, reps=3):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit("the native kernel is unavailable on this machine (no C compiler?)")
    native.MAX_FAN_IN = 10 ** 6  # measure beyond the limit too
    act, gen, rows = get_activation("g"), torch.Generator().manual_seed(0), []
    for d_in, widths, d_out in LAYOUTS:
        layout = Layout(d_in, widths, d_out)
        theta = torch.randn(10, layout.size, generator=gen, dtype=torch.float64) / d_in ** 0.5
        X = torch.rand(args.rows, d_in, generator=gen, dtype=torch.float64)
        y = torch.randn(args.rows, d_out, generator=gen, dtype=torch.float64)
        ms = {}
        for backend in ("torch", "native"):
            ms[backend] = 1e3 * best_seconds(
                lambda b=backend, t=theta, lay=layout, X=X, y=y: loss_and_gradient(t, lay, act, X, y,
                                                                                  backend=b))
        rows.append(dict(sizes=layout.sizes, widest_input=max(layout.sizes[:-1]), ms=ms,
                         native_speedup=ms["torch"] / ms["native"]))
        print(f"{'-'.join(map(str, layout.sizes)):16s} widest input {rows[-1]['widest_input']:4d}: "
              f"torch {ms['torch']:7.1f} ms, native {ms['native']:7.1f} ms, "
              f"native {rows[-1]['native_speedup']:.2f}x", flush=True)
    by_activation = {}
    layout = Layout(8, (64,), 1)
    theta = torch.randn(10, layout.size, generator=gen, dtype=torch.float64) / 8 ** 0.5
    X = torch.randn(6410, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(6410, 1, generator=gen, dtype=torch.float64)
    for name in ("relu", "tanh", "sigmoid", "softplus", "g"):
        activation = get_activation(name)
        by_activation[name] = 1e3 * best_seconds(
            lambda a=activation: native.loss_and_gradient(theta, layout, a, X, y))
    for name, ms in by_activation.items():
        share = 1 - by_activation["relu"] / ms
        print(f"8-64-1 on 6,410 rows, {name:8s}: {ms:6.2f} ms, the activation's share {share:.0%}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    write_record("native_fan_in", dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                                       commit=commit, machine=platform.platform(),
                                       processor=platform.processor(), torch=torch.__version__,
                                       threads=args.threads, students=10, rows_per_gradient=args.rows,
                                       activation="g", results=rows,
                                       t2_ms_by_activation=by_activation))


if __name__ == "__main__":
    main()
