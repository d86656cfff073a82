"""The toy family: its problems, configurations, tidy table and ease of identifiability."""

import csv
import math
from pathlib import Path

import pytest
import torch

from eandc import family
from eandc.runs import load_run
from eandc.sweep import recover_random_teacher


def test_the_family_has_150_distinct_problems_and_600_runs():
    problems = family.problems()
    assert len(problems) == 150
    ids = {family.problem_id(p["activation"], p["d_in"], p["width"], p["seed"]) for p in problems}
    assert len(ids) == 150
    runs = family.configs()
    assert len(runs) == 600
    assert [c["rho"] for c in runs[:150]] == [1] * 150  # factor by factor, in the order given
    for c in runs:  # every configuration is valid for the task
        recover_random_teacher.normalize(c)


def test_queries_cover_five_times_the_widest_students_parameters():
    assert family.n_queries(2, 2) == 2000
    student = 8 * 6
    assert family.n_queries(8, 6) == 5 * (9 * student + student + 1)
    by_problem = {}
    for c in family.configs():
        by_problem.setdefault((c["d_in"], c["widths"][0], c["seed"]), set()).add(c["n_queries"])
    assert all(len(v) == 1 for v in by_problem.values())  # the same queries for every rho


def test_bad_factors_are_named():
    with pytest.raises(ValueError, match="rho"):
        family.configs([4, 0])


def _row(rho, width, losses, success=True, recovered=None):
    config = recover_random_teacher.normalize(
        {"d_in": 2, "widths": [width], "rho": rho, "seed": 3, "n_students": len(losses)})
    metrics = {"success": success, "widths": [recovered or width], "max_distance": 1e-15,
               "relative_rmse": 1e-15, "student_losses": losses}
    return {"hash": f"h{rho}", "config": config, "metrics": metrics, "wall_seconds": 1.5}


def test_the_tidy_table_and_ease_of_identifiability(tmp_path):
    rows = [_row(1, 4, [1e-3, 1e-20, 1e-2, 1e-9]), _row(2, 4, [1e-3, 1e-20, 1e-2, 1e-9]),
            _row(4, 4, [1e-12] * 3 + [1e-3], success=False, recovered=5),
            {"hash": "h8", "config": _row(8, 4, [0.0])["config"], "metrics": None,
             "wall_seconds": None}]
    table = family.summary_rows(rows)
    assert [r["students_at_zero_loss"] for r in table] == [2, 2, 3, None]
    assert [r["students_exact"] for r in table] == [1, 1, 0, None]
    assert table[2]["recovered_width"] == 5 and table[2]["success"] is False
    path = family.write_summary(table, tmp_path / "summary.csv")
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == list(family.SUMMARY_COLUMNS)
    assert read[0]["problem_id"] == "g-d2-w4-s3" and read[3]["success"] == ""
    ease = family.ease_of_identifiability(table)
    assert ease == {"g-d2-w4-s3": {"ease": 0.5, "smallest_rho": 1}}
    table[0]["students_at_zero_loss"] = table[1]["students_at_zero_loss"] = 1
    assert family.ease_of_identifiability(table)["g-d2-w4-s3"] == {"ease": 0.25,
                                                                    "smallest_rho": 4}


RESULTS = Path(__file__).resolve().parents[1] / "results"


def _close(a, b):
    """Equal to 1e-9 relative; two distances at machine precision (below 1e-12) are equal."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_two_committed_results_are_recomputed_from_their_stored_configurations():
    """The two cheapest exact recoveries of the committed family (at different factors) are
    run again from the configuration stored beside them, on one thread as the sweep ran them."""
    summary = RESULTS / "toy" / "summary.csv"
    assert summary.is_file(), "the toy family's results are committed under results/toy"
    with open(summary) as f:
        rows = [r for r in csv.DictReader(f) if r["success"] == "True"]
    chosen = []
    for row in sorted(rows, key=lambda r: float(r["wall_seconds"])):
        if row["rho"] not in {c["rho"] for c in chosen}:
            chosen.append(row)
        if len(chosen) == 2:
            break
    assert len(chosen) == 2
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row in chosen:
            record = load_run(RESULTS / "toy" / row["hash"])
            config = {k: v for k, v in record.config.items() if k != "task"}
            metrics, network = recover_random_teacher(config)
            assert metrics["widths"] == record.metrics["widths"]
            assert metrics["success"] == record.metrics["success"]
            for new, old in zip(metrics["max_cosine_distance"],
                                record.metrics["max_cosine_distance"]):
                assert _close(new, old), (row["hash"], new, old)
            for new, old in zip(metrics["median_cosine_distance"],
                                record.metrics["median_cosine_distance"]):
                assert _close(new, old), (row["hash"], new, old)
    finally:
        torch.set_num_threads(previous)
