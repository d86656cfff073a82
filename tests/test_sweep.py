"""Sweeps: idempotent tasks stored by configuration hash, on a process pool or a Dask cluster;
a sweep killed with SIGKILL is finished by running it again, without redoing finished tasks."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eandc.cli import main
from eandc.runs import config_hash, load_run
from eandc.storage import load_arrays
from eandc.sweep import dask_executor, load_configs, run_sweep

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
TINY = dict(activation="tanh", d_in=2, widths=[2], rho=2, n_queries=500, n_students=4,
            n_held_out=500, train_options=dict(adam_steps=100, max_iter=100, polish_iter=20))
CONFIGS = [dict(TINY, seed=seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted sweep on the default local process pool (two workers)."""
    root = tmp_path_factory.mktemp("reference")
    return root, run_sweep(CONFIGS, root=root, workers=2, progress=False)


def _networks(root: Path, kind="sweep") -> dict:
    return {folder.name: load_arrays(folder / "network.npz")[0]
            for folder in (root / kind).iterdir() if (folder / "network.npz").exists()}


def _assert_same_networks(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for key in a:
        for name in a[key]:
            assert np.array_equal(a[key][name], b[key][name]), (key, name)


def test_a_sweep_stores_each_task_by_hash_and_does_not_redo_it(reference):
    root, rows = reference
    assert [r["status"] for r in rows] == ["computed"] * 3
    for row in rows:
        assert row["hash"] == config_hash(row["config"])
        record = load_run(Path(row["folder"]))
        assert record.config["seed"] == row["config"]["seed"] and record.wall_seconds > 0
        assert record.metrics["success"] and record.metrics["widths"] == [2]
        assert record.machine["torch_threads"] == 1 and record.network.widths == [2]
    before = {r["hash"]: os.stat(Path(r["folder"]) / "result.json").st_mtime_ns for r in rows}
    again = run_sweep(CONFIGS, root=root, progress=False)
    assert [r["status"] for r in again] == ["cached"] * 3
    assert [r["metrics"] for r in again] == [r["metrics"] for r in rows]
    assert before == {r["hash"]: os.stat(Path(r["folder"]) / "result.json").st_mtime_ns for r in rows}
    with open(root / "sweep" / "summary.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [int(r["seed"]) for r in table] == [1, 2, 3] and {r["success"] for r in table} == {"true"}


def test_a_damaged_result_is_reported_and_recomputed(reference, tmp_path, caplog):
    _, rows = reference
    root = tmp_path / "results"
    run_sweep(CONFIGS[:1], root=root, executor=_inline(), progress=False)
    folder = root / "sweep" / rows[0]["hash"]
    data = (folder / "network.npz").read_bytes()
    (folder / "network.npz").write_bytes(data[:100])  # truncated
    again = run_sweep(CONFIGS[:1], root=root, executor=_inline(), progress=False)
    assert again[0]["status"] == "computed"
    assert "damaged result" in caplog.text and "network.npz" in caplog.text
    assert load_run(folder).network is not None


class _inline:
    """An Executor that runs each task at once, in this process (any Executor works)."""

    def submit(self, fn, *args):
        from concurrent.futures import Future
        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as error:
            future.set_exception(error)
        return future


def test_dask_local_cluster_gives_the_same_results_as_the_pool(reference, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    root, _ = reference
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps({"kind": "sweep", "configs": CONFIGS}))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  protocol="tcp", dashboard_address=None) as cluster:
        code = main(["sweep", str(configs), "--results", str(tmp_path / "results"), "--quiet",
                     "--scheduler", cluster.scheduler_address])
    assert code == 0
    _assert_same_networks(_networks(root), _networks(tmp_path / "results"))


def test_sweep_killed_with_sigkill_resumes_without_redoing_finished_tasks(reference, tmp_path):
    root, _ = reference
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps(CONFIGS))
    results = tmp_path / "results"
    command = [sys.executable, "-m", "eandc.cli", "sweep", str(configs), "--results", str(results),
               "--workers", "1", "--checkpoint-interval", "0.05", "--quiet"]
    sweep = subprocess.Popen(command, env=ENV, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sweep.poll() is None:
        if list(results.glob("sweep/*/result.json")):  # one task finished, the next under way
            break
        time.sleep(0.02)
    os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and its worker processes
    sweep.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in results.glob("sweep/*/result.json")}
    assert 1 <= len(finished) < 3, "the sweep should be killed part-way"

    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{3 - len(finished)} computed, {len(finished)} already done" in rerun.stdout
    for key, mtime in finished.items():  # finished tasks were not redone
        assert (results / "sweep" / key / "result.json").stat().st_mtime_ns == mtime
    _assert_same_networks(_networks(root), _networks(results))


def test_bad_sweep_inputs_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"seed\": 1,")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_configs(bad)
    bad.write_text("{\"configs\": []}")
    with pytest.raises(ValueError, match="no configuration"):
        load_configs(bad)
    with pytest.raises(ValueError, match=r"unknown configuration key\(s\) \['sede'\]"):
        run_sweep([{"sede": 1}], root=tmp_path, progress=False)
    with pytest.raises(ValueError, match="cannot import"):
        run_sweep([{}], task="no_such_module:task", root=tmp_path, progress=False)
    rows = run_sweep([dict(TINY, n_students=1)], root=tmp_path, executor=_inline(),
                     progress=False)  # a task that fails is reported, the sweep goes on
    assert rows[0]["status"] == "failed" and "n_students must be" in rows[0]["error"]


def test_dask_executor_warns_about_workers_with_a_fixed_malloc_trim_threshold(caplog):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_ by default, which slows eandc tasks 1.75x."""
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        with caplog.at_level("WARNING", logger="eandc.sweep"):
            client, _ = dask_executor(cluster.scheduler_address)
            client.close()
    assert "MALLOC_TRIM_THRESHOLD_" in caplog.text
