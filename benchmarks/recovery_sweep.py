"""Recovery success over random teachers: the issue's toy setting, for several seeds.

    python benchmarks/recovery_sweep.py [--activations g,tanh,...] [--seeds 0-7] [--widths 4]
    python benchmarks/recovery_sweep.py --activations g --widths 4,3 --seeds 1-2   # deep

For each activation and seed: a teacher d_in=2 -> widths -> 1 (eandc.random_teacher), 10,000
Gaussian queries, 10 students rho x widths wide; success means recovered widths exact, max
cosine distance <= 1e-10 and held-out relative RMSE <= 1e-9. Prints a table and writes
benchmarks/results/recovery_sweep-<date>-<time>.json with the machine, versions and commit.
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

import eandc
from eandc.recover import NoClusterError


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", default="g,tanh,sigmoid,softplus,relu")
    parser.add_argument("--seeds", default="0-7", type=_seeds)
    parser.add_argument("--widths", default="4", help="teacher hidden widths, e.g. 4 or 4,3")
    parser.add_argument("--rho", type=int, default=4)
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    rows = []
    for activation in args.activations.split(","):
        for seed in args.seeds:
            teacher = eandc.random_teacher(2, widths, activation=activation, seed=seed)
            X = eandc.gaussian_inputs(10_000, 2, seed=seed + 1)
            start = time.perf_counter()
            try:
                result = eandc.expand_and_cluster(teacher, X, activation,
                                                  n_hidden_layers=len(widths),
                                                  student_widths=[args.rho * w for w in widths],
                                                  seed=seed, progress=False)
            except NoClusterError as error:  # no cluster survived: a failed recovery, recorded
                seconds = time.perf_counter() - start
                rows.append(dict(activation=activation, seed=seed, success=False, error=str(error),
                                 seconds=round(seconds, 2)))
                print(f"{activation:9s} seed {seed}: failed after {seconds:.1f} s: {error}", flush=True)
                continue
            seconds = time.perf_counter() - start
            held_out = eandc.gaussian_inputs(5_000, 2, seed=seed + 2)
            comparison = eandc.compare(teacher, result.network, held_out)
            row = dict(activation=activation, seed=seed, widths=result.widths,
                       clustered_widths=result.clustered_widths,
                       max_cosine_distance=comparison.max_distance,
                       relative_rmse=comparison.relative_rmse, seconds=round(seconds, 2),
                       success=comparison.exact(distance_tol=1e-10, rmse_tol=1e-9))
            rows.append(row)
            print(f"{activation:9s} seed {seed}: widths {row['widths']} (clusters "
                  f"{row['clustered_widths']}), max cos dist {row['max_cosine_distance']:.1e}, "
                  f"rel RMSE {row['relative_rmse']:.1e}, {seconds:.1f} s, "
                  f"{'exact' if row['success'] else 'NOT exact'}", flush=True)
    print("\nactivation  exact / runs")
    for activation in args.activations.split(","):
        mine = [r for r in rows if r["activation"] == activation]
        print(f"{activation:10s}  {sum(r['success'] for r in mine)} / {len(mine)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    record = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit,
                  machine=platform.platform(), processor=platform.processor(),
                  threads=torch.get_num_threads(), torch=torch.__version__, eandc=eandc.__version__,
                  widths=widths, rho=args.rho, rows=rows)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = Path(__file__).parent / "results" / f"recovery_sweep-{stamp}.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
