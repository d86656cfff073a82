"""Speed-up of a sweep on a 2-worker Dask cluster over one local worker, measured in one run.

    python benchmarks/sweep_speedup.py                  # 24 runs of the toy family (rho 2)
    python benchmarks/sweep_speedup.py --tasks 8 --rho 1

Both sweeps run the same configurations (the first ``--tasks`` problems of the toy family at
``--rho``) into fresh temporary folders, every process single-threaded (torch and BLAS): first
a local process pool of one worker (the baseline), then a ``dask.distributed.LocalCluster`` of
two worker processes, started with ``eandc.sweep.DASK_WORKER_ENVIRON``, through
``Client.get_executor()``, as ``eandc sweep --scheduler`` uses one. The script checks that both
give the same recovered widths and writes the timings, with machine, versions and source commit,
to ``benchmarks/results/sweep_speedup-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

from eandc import family
from eandc.runs import machine
from eandc.sweep import DASK_WORKER_ENVIRON, run_sweep

HERE = Path(__file__).resolve().parent


def _timed(configs, root, **kwargs) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    rows = run_sweep(configs, kind="toy", root=root, progress=False, summary=None, **kwargs)
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--rho", type=int, default=2)
    args = parser.parse_args()
    import dask
    from dask.distributed import Client, LocalCluster

    # workers without Dask's MALLOC_TRIM_THRESHOLD_ (see eandc.sweep.DASK_WORKER_ENVIRON)
    dask.config.set({"distributed.nanny.pre-spawn-environ": DASK_WORKER_ENVIRON})

    configs = family.configs([args.rho])[:args.tasks]
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        serial, rows_one = _timed(configs, one, workers=1)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            parallel, rows_two = _timed(configs, two, executor=client.get_executor(pure=False))
    widths_one = [(r["metrics"] or {}).get("widths") for r in rows_one]
    widths_two = [(r["metrics"] or {}).get("widths") for r in rows_two]
    same = widths_one == widths_two
    print(f"{len(configs)} runs of the toy family at rho = {args.rho}")
    print(f"  local pool, 1 worker : {serial:8.1f} s")
    print(f"  Dask, 2 workers      : {parallel:8.1f} s")
    print(f"  speed-up             : {serial / parallel:8.2f}x   (same widths: {same})")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = HERE / "results" / f"sweep_speedup-{stamp}.json"
    out.write_text(json.dumps({
        "tasks": len(configs), "rho": args.rho, "seconds_pool_1_worker": serial,
        "seconds_dask_2_workers": parallel, "speedup": serial / parallel,
        "same_widths": same, "machine": machine(),  # with the source commit
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}, indent=2))
    print(f"wrote {out}")
    if not same:
        raise SystemExit("the two sweeps recovered different widths")


if __name__ == "__main__":
    main()
