"""The toy family: 150 synthetic teachers, the protocol run on them, and its tidy table.

The paper's toy generator is not published (see ``method-notes.md`` section 4); this is ours.

* **Teachers**: one hidden layer, activation g, one output, drawn by
  :func:`eandc.random_teacher` (weights and biases N(0, 1), the recipe of the authors'
  MLPGradientFlow scripts), for every input dimension in ``D_IN`` x teacher width in ``WIDTHS``
  x seed in ``SEEDS``: 3 x 5 x 10 = 150 problems, from 2 neurons in 8 dimensions (easy: the
  weight vectors are far apart) to 6 neurons in 2 dimensions (hard: crowded weight vectors).
  The widths stop at 6 so that the whole family, 150 problems x 4 factors, runs within two
  hours on a 2-core CPU (measured at commit a578d53: 2.6 single-thread hours, 78 min on two
  workers with the companion sweep; the longest run, g-d2-w6-s0 at rho = 8, 340 s).
* **Queries**: Gaussian, ``n_queries(d_in, width)`` = max(2000, 5 P) where P is the number of
  parameters of the widest (rho = 8) student, the same queries for every rho of a problem;
  held-out comparison on 5,000 other Gaussian inputs.
* **Protocol**: for rho in ``RHOS``, ``N_STUDENTS`` students rho times wider,
  Expand-and-Cluster with gamma 0.5, beta pi/6, Levenberg-Marquardt stages of at most
  ``MAX_ITER`` iterations and compaction rounds from a coarse 3% cosine distance down
  (``TRAIN_OPTIONS``); a recovery that is not exact (relative loss on the queries above 1e-20;
  no teacher needed) is done again from the same initial students with stages of up to 400
  iterations (``RETRY_WITH``), and the better network is kept. Success:
  recovered width equal to the teacher's, max cosine distance <= 1e-6 and held-out relative
  RMSE <= 1e-6. rho = 1 is the control: students at the teacher's size, trained the same way.
* **Ease of identifiability** of a problem: the fraction of its rho = 1 students that reach the
  global minimum (relative loss <= ``ZERO_LOSS``) -- how often plain training at the teacher's
  size finds the teacher. A teacher that direct training finds every time needs no expansion;
  one it never finds is the hard case that expansion is for. Also reported: the smallest rho at
  which at least ceil(gamma N) students reach zero loss.

``python -m eandc.family`` runs the family (``--part companion``: a subset under the other
activations) through :func:`eandc.sweep.run_sweep` into ``results/toy/<hash>/`` and writes the
tidy table ``results/toy/summary.csv``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from .recover import EXACT_LOSS, ZERO_LOSS
from .storage import write_csv
from .sweep import dask_executor, run_sweep, stored_rows

__all__ = ["D_IN", "WIDTHS", "SEEDS", "RHOS", "problems", "n_queries", "configs",
           "companion_configs", "all_configs", "summary_rows", "write_summary", "stored_table",
           "run", "ease_of_identifiability"]

log = logging.getLogger(__name__)

D_IN = (2, 4, 8)
WIDTHS = (2, 3, 4, 5, 6)
SEEDS = tuple(range(10))
RHOS = (1, 2, 4, 8)
N_STUDENTS = 10
MAX_ITER = 150
# A coarse first compaction round (3% cosine distance) merges the loose neuron groups of wide
# students; a recovery that is not exact is done again with longer stages (RETRY_WITH).
TRAIN_OPTIONS = {"max_iter": MAX_ITER, "compaction_rounds": 4,
                 "compaction_tolerances": [0.03, 0.01, 1e-3, 1e-4]}
RETRY_WITH = [{"max_iter": 400}]
KIND = "toy"
COMPANION_ACTIVATIONS = ("tanh", "sigmoid", "softplus", "gelu", "silu", "relu")
COMPANION_PROBLEMS = [(4, 2, s) for s in range(3)] + [(4, 4, s) for s in range(3)]
SUMMARY_COLUMNS = ("problem_id", "activation", "d_in", "teacher_width", "rho", "seed",
                   "n_students", "n_queries", "success", "recovered_width", "clustered_width",
                   "source", "attempts", "max_cosine_distance", "relative_rmse",
                   "students_at_zero_loss", "students_exact", "wall_seconds", "finished", "hash")


def problem_id(activation: str, d_in: int, width: int, seed: int) -> str:
    return f"{activation}-d{d_in}-w{width}-s{seed}"


def problems(activation: str = "g", seeds=SEEDS) -> list[dict]:
    """The family's problems (150 with the default seeds), each ``{activation, d_in, width,
    seed}``."""
    return [{"activation": activation, "d_in": d, "width": w, "seed": int(s)}
            for d in D_IN for w in WIDTHS for s in seeds]


def n_queries(d_in: int, width: int) -> int:
    """max(2000, 5 x the parameters of a student ``max(RHOS)`` times the teacher's width)."""
    student = max(RHOS) * width
    return max(2000, 5 * ((d_in + 1) * student + student + 1))


def _config(problem: dict, rho: int) -> dict:
    d, w = problem["d_in"], problem["width"]
    return {"activation": problem["activation"], "d_in": d, "widths": [w], "seed": problem["seed"],
            "rho": rho, "n_queries": n_queries(d, w), "n_students": N_STUDENTS,
            "train_options": dict(TRAIN_OPTIONS), "retry_with": [dict(r) for r in RETRY_WITH]}


def configs(rhos=RHOS, activation: str = "g", seeds=SEEDS) -> list[dict]:
    """Configurations of :func:`eandc.sweep.recover_random_teacher`, rho by rho in the order
    given (a sweep cut short holds whole factors first)."""
    for rho in rhos:
        if not isinstance(rho, int) or rho < 1:
            raise ValueError(f"a factor rho is a positive integer, got {rho!r}")
    return [_config(p, rho) for rho in rhos for p in problems(activation, seeds)]


def companion_configs(rhos=(4,)) -> list[dict]:
    """The companion sweep: ``COMPANION_PROBLEMS`` under every other activation."""
    return [_config({"activation": a, "d_in": d, "width": w, "seed": s}, rho)
            for rho in rhos for a in COMPANION_ACTIVATIONS for d, w, s in COMPANION_PROBLEMS]


def summary_rows(rows: list[dict]) -> list[dict]:
    """The tidy table (``SUMMARY_COLUMNS``) of :func:`eandc.sweep.run_sweep`'s rows; a task that
    failed or did not run has empty result cells."""
    table = []
    for r in rows:
        c, m = r["config"], r.get("metrics") or {}
        losses = m.get("student_losses")
        width = m.get("widths")
        table.append({
            "problem_id": problem_id(c["activation"], c["d_in"], c["widths"][0], c["seed"]),
            "activation": c["activation"], "d_in": c["d_in"], "teacher_width": c["widths"][0],
            "rho": c["rho"], "seed": c["seed"], "n_students": c["n_students"],
            "n_queries": c["n_queries"],
            "success": m.get("success") if m else None,
            "recovered_width": width[0] if width else (0 if m else None),
            "clustered_width": (m.get("clustered_widths") or [0])[0] if m else None,
            "source": m.get("source", "none") if m else None,
            "attempts": m.get("attempts"),
            "max_cosine_distance": m.get("max_distance"),
            "relative_rmse": m.get("relative_rmse"),
            "students_at_zero_loss": (sum(v <= ZERO_LOSS for v in losses)
                                      if losses is not None else None),
            "students_exact": (sum(v <= EXACT_LOSS for v in losses)
                               if losses is not None else None),
            "wall_seconds": r.get("wall_seconds"), "finished": r.get("finished"),
            "hash": r["hash"]})
    return table


def write_summary(rows: list[dict], path: str | Path) -> Path:
    """Write the tidy table of ``rows`` (from :func:`summary_rows`) as CSV, atomically."""
    return write_csv(rows, SUMMARY_COLUMNS, path)


def ease_of_identifiability(table, gamma: float = 0.5) -> dict[str, dict]:
    """Per problem id: ``ease`` (fraction of its rho = 1 students at zero loss) and
    ``smallest_rho`` (the smallest rho at which ceil(gamma N) students reach zero loss; None if
    none does). ``table``: rows of :func:`summary_rows` (dicts, or a pandas DataFrame)."""
    records = table.to_dict("records") if hasattr(table, "to_dict") else list(table)
    out: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: r["rho"]):
        at_zero = r["students_at_zero_loss"]
        if at_zero is None or at_zero == "" or (isinstance(at_zero, float) and math.isnan(at_zero)):
            continue
        entry = out.setdefault(r["problem_id"], {"ease": None, "smallest_rho": None})
        if r["rho"] == 1:
            entry["ease"] = at_zero / r["n_students"]
        if entry["smallest_rho"] is None and at_zero >= math.ceil(gamma * r["n_students"] - 1e-9):
            entry["smallest_rho"] = r["rho"]
    return out


def all_configs(seeds=SEEDS) -> list[dict]:
    """Every run of the chapter: the family at every rho, then the companion sweep."""
    return configs(RHOS, seeds=seeds) + companion_configs()


def stored_table(root: str | Path = "results", seeds=SEEDS) -> list[dict]:
    """The tidy table of every run of :func:`all_configs`, from what is stored under
    ``root/toy`` (nothing is computed; a run not stored yet has empty result cells)."""
    rows = stored_rows(all_configs(seeds), kind=KIND, root=root)
    return summary_rows(rows)


def run(todo: list[dict], root: str | Path = "results", *, workers: int | None = None,
        executor=None, progress: bool = True, seeds=SEEDS) -> list[dict]:
    """Run the configurations ``todo`` that are not stored yet (:func:`eandc.sweep.run_sweep`),
    then rewrite ``root/toy/summary.csv``; returns the tidy table (:func:`stored_table`)."""
    if todo:
        run_sweep(todo, kind=KIND, root=root, executor=executor, workers=workers,
                  progress=progress, summary=None)
    table = stored_table(root, seeds)
    write_summary(table, Path(root) / KIND / "summary.csv")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eandc.family",
        description="Run the toy family (or its companion sweep) into RESULTS/toy/ and write "
                    "RESULTS/toy/summary.csv. Finished runs are not redone; a killed sweep resumes.")
    parser.add_argument("--part", choices=("family", "companion", "all"), default="all")
    parser.add_argument("--rhos", default=",".join(map(str, RHOS)),
                        help="comma-separated factors, run in this order (default 1,2,4,8)")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--workers", type=int, default=None, help="local processes")
    parser.add_argument("--scheduler", default=None, help="tcp://HOST:PORT of a Dask scheduler")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N tasks")
    args = parser.parse_args(argv)
    try:
        rhos = [int(v) for v in args.rhos.split(",")]
    except ValueError:
        parser.error(f"--rhos must be comma-separated integers, got {args.rhos!r}")
    todo = []
    if args.part in ("family", "all"):
        todo += configs(rhos)
    if args.part in ("companion", "all"):
        todo += companion_configs()
    todo = todo[:args.limit] if args.limit else todo
    client = executor = None
    if args.scheduler:
        client, executor = dask_executor(args.scheduler)
    try:
        table = run(todo, args.results, workers=args.workers, executor=executor)
    finally:
        if client is not None:
            client.close()
    print(f"{sum(r['success'] is not None for r in table)} of {len(table)} runs stored; "
          f"table: {args.results / KIND / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
