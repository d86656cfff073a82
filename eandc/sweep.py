"""Sweeps: one task over a list of configurations, on any ``concurrent.futures.Executor``.

:func:`run_sweep` runs ``task(config, checkpoint=...) -> (metrics, network)`` for every
configuration. Each task is idempotent: its result lives in ``<root>/<kind>/<hash of its
configuration>/`` (:mod:`eandc.runs`: configuration, metrics, recovered network, wall seconds,
machine; written atomically, ``result.json`` last). A task whose folder holds a valid result is
not run again; a damaged one is reported and recomputed; a task that was killed part-way
resumes from its checkpoint (:mod:`eandc.checkpoint`). So a sweep that was killed is finished by
running it again, and redoes no finished task.

Executors: by default a local process pool (``spawn``, ``workers`` processes); any other
``concurrent.futures.Executor`` works, for example a Dask cluster's (:func:`dask_executor`, used
by ``eandc sweep --scheduler tcp://HOST:PORT``). Each task runs with ``threads`` torch threads
(default 1, parallelism comes from the tasks), so its result does not depend on the executor.
The executor ships the task's arguments (a configuration, plain JSON) and returns a small
summary; results travel through the result folders only.

The default task, :func:`recover_random_teacher`, recovers a random teacher
(:func:`eandc.random_teacher`) and compares the result with it; its configuration keys and
defaults are ``RANDOM_TEACHER_DEFAULTS``. A task is named by ``"module:function"`` (or
``"path/to/file.py:function"``); it may carry a ``normalize(config) -> config`` attribute that
fills in defaults and rejects unknown keys, before the configuration is hashed.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import importlib
import importlib.util
import io
import json
import logging
import math
import multiprocessing
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint
from .runs import CHECKPOINT, find_run, run_folder, save_run
from .storage import atomic_write_bytes

__all__ = ["run_sweep", "recover_random_teacher", "RANDOM_TEACHER_DEFAULTS", "dask_executor",
           "DASK_WORKER_ENVIRON", "load_entry_point", "load_configs", "stored_rows"]

log = logging.getLogger(__name__)

DEFAULT_TASK = "eandc.sweep:recover_random_teacher"


def load_entry_point(spec: str, what: str = "entry point"):
    """The object named by ``"package.module:name"`` or ``"path/to/file.py:name"``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{what} must look like 'module:function', got {spec!r}")
    module_name, _, attribute = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as error:
        raise ValueError(f"cannot import {module_name!r} for {what} {spec!r}: {error}") from None
    except Exception as error:  # the user's module raised while being imported
        raise RuntimeError(f"importing {module_name!r} for {what} {spec!r} raised "
                           f"{type(error).__name__}: {error}") from error
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attribute!r} ({what} {spec!r})")
        obj = getattr(obj, part)
    return obj


def _task_name(task) -> str:
    if isinstance(task, str):
        return task
    return f"{task.__module__}:{task.__qualname__}"


def _resolve(task):
    fn = load_entry_point(task, "task") if isinstance(task, str) else task
    if not callable(fn):
        raise TypeError(f"the task {_task_name(task)!r} is not callable")
    return fn


# ---------------------------------------------------------------------------------------------
# The default task.

RANDOM_TEACHER_DEFAULTS = {
    "activation": "g", "d_in": 2, "widths": [4], "d_out": 1, "seed": 0, "rho": 4,
    "student_widths": None, "n_queries": 10_000, "n_students": 10, "gamma": 0.5,
    "beta": math.pi / 6, "n_held_out": 5_000, "train_options": {}, "distance_tol": 1e-6,
    "rmse_tol": 1e-6, "retry_with": [],
}


def _normalize_random_teacher(config: dict) -> dict:
    if not isinstance(config, dict):
        raise TypeError(f"a configuration is a dict, got {type(config).__name__}")
    unknown = set(config) - set(RANDOM_TEACHER_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown configuration key(s) {sorted(unknown)}; known: "
                         f"{sorted(RANDOM_TEACHER_DEFAULTS)}")
    config = {**RANDOM_TEACHER_DEFAULTS, **config}
    if isinstance(config["widths"], int):
        config["widths"] = [config["widths"]]
    return config


def recover_random_teacher(config: dict, checkpoint: Checkpoint | None = None):
    """Recover ``random_teacher(d_in, widths, d_out, activation, seed)`` from ``n_queries``
    Gaussian queries (seed + 1) and compare on ``n_held_out`` others (seed + 2); students are
    ``rho`` x the teacher's widths unless ``student_widths`` is given. Returns (metrics,
    network); a recovery in which no cluster survives is a result too (``success`` False)."""
    from .compare import compare
    from .recover import NoClusterError, expand_and_cluster
    from .teachers import gaussian_inputs, random_teacher

    c = _normalize_random_teacher(config)
    teacher = random_teacher(c["d_in"], c["widths"], c["d_out"], c["activation"], c["seed"])
    X = gaussian_inputs(c["n_queries"], c["d_in"], seed=c["seed"] + 1)
    student_widths = c["student_widths"] or [c["rho"] * w for w in c["widths"]]
    try:
        result = expand_and_cluster(teacher, X, c["activation"], len(c["widths"]),
                                    student_widths=student_widths, n_students=c["n_students"],
                                    gamma=c["gamma"], beta=c["beta"], seed=c["seed"],
                                    progress=False, train_options=c["train_options"],
                                    retry_with=c["retry_with"], checkpoint=checkpoint)
    except NoClusterError as error:  # no cluster survived: a failed recovery, recorded as such
        return {"success": False, "error": str(error), "student_widths": student_widths,
                "widths": [0] * len(c["widths"]),
                "student_losses": [float(v) for v in error.student_losses[0]]}, None
    comparison = compare(teacher, result.network,
                         gaussian_inputs(c["n_held_out"], c["d_in"], seed=c["seed"] + 2))
    metrics = dict(comparison.to_dict(), success=comparison.exact(c["distance_tol"], c["rmse_tol"]),
                   max_distance=comparison.max_distance, widths=result.widths,
                   clustered_widths=result.clustered_widths, student_widths=result.student_widths,
                   final_loss=result.final_loss, source=result.source,
                   attempts=result.attempts,
                   student_losses=[float(v) for v in result.student_losses[0]],
                   timings=result.timings)
    return metrics, result.network


recover_random_teacher.normalize = _normalize_random_teacher


# ---------------------------------------------------------------------------------------------
# Running.

def _run_one(task, kind: str, root: str, config: dict, checkpoint_interval: float,
             threads: int) -> dict:
    """One task, in a worker: skip it if its result is stored, else compute and store it."""
    folder = run_folder(root, kind, config)
    record = find_run(folder, load_network=False)
    if record is not None:
        return {"hash": folder.name, "status": "cached", "metrics": record.metrics,
                "wall_seconds": record.wall_seconds}
    fn = _resolve(task)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(folder / CHECKPOINT, checkpoint_interval, fingerprint=folder.name)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        with checkpoint:
            metrics, network = fn({k: v for k, v in config.items() if k != "task"},
                                  checkpoint=checkpoint)
        wall = time.perf_counter() - start
        save_run(folder, config, metrics, network, wall,  # records the threads it ran with
                 extra={"resumed_from_checkpoint": checkpoint.resumed_from})
    finally:
        torch.set_num_threads(previous)
    checkpoint.remove()
    return {"hash": folder.name, "status": "computed", "metrics": metrics, "wall_seconds": wall}


def load_configs(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """Configurations from a JSON file: a list of dicts, or ``{"configs": [...], "task": ...,
    "kind": ...}``. Returns (configs, the other keys)."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no such configuration file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    options = {}
    if isinstance(document, dict):
        options = {k: v for k, v in document.items() if k != "configs"}
        document = document.get("configs")
    if not isinstance(document, list) or not all(isinstance(c, dict) for c in document):
        raise ValueError(f"{path} must hold a list of configurations (JSON objects), or an object "
                         "with such a list under 'configs'")
    if not document:
        raise ValueError(f"{path} holds no configuration")
    unknown = set(options) - {"task", "kind"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    return document, options


# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (its default
# ``distributed.nanny.pre-spawn-environ``). A fixed trim threshold also fixes glibc's mmap
# threshold, and torch's many short-lived CPU tensors then cost a system call each: a recovery
# takes 1.75x as long (measured: 7.4 s -> 12.9 s on a toy-family run). Workers should start
# without it: ``dask.config.set({"distributed.nanny.pre-spawn-environ": DASK_WORKER_ENVIRON})``
# before creating a cluster, or the same in the workers' Dask configuration.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
DASK_WORKER_ENVIRON = {k: 1 for k in THREAD_VARIABLES}


def _worker_trim_threshold() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def dask_executor(address: str, timeout: float = 10.0):
    """(client, executor) for the Dask scheduler at ``address`` (``tcp://HOST:PORT``). Warns when
    the workers run with ``MALLOC_TRIM_THRESHOLD_`` set (see ``DASK_WORKER_ENVIRON``)."""
    try:
        from dask.distributed import Client
    except ImportError:
        raise ImportError("--scheduler needs dask.distributed: pip install 'eandc[dask]'") from None
    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise ConnectionError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s "
                              f"({type(error).__name__}: {error})") from None
    try:
        slowed = sorted(w for w, v in client.run(_worker_trim_threshold).items() if v)
    except Exception as error:  # a worker that cannot run the check is not a reason to stop
        log.debug("could not read the workers' environment: %s", error)
        slowed = []
    if slowed:
        log.warning("%d Dask worker(s) run with MALLOC_TRIM_THRESHOLD_ set (Dask's default), "
                    "which makes eandc tasks about 1.75x slower; start them with "
                    "distributed.nanny.pre-spawn-environ = eandc.sweep.DASK_WORKER_ENVIRON",
                    len(slowed))
    return client, client.get_executor(pure=False)


def _write_summary(path: Path, rows: list[dict]) -> None:
    def cell(value):
        return json.dumps(value) if isinstance(value, (list, dict, type(None), bool)) else value
    config_keys = sorted({k for r in rows for k in r["config"]})
    metric_keys = sorted({k for r in rows for k in (r.get("metrics") or {})
                          if not isinstance(r["metrics"][k], dict) and k != "student_losses"})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["hash", "status", *config_keys,  # a metric named like a setting: result_...
                     *(f"result_{k}" if k in config_keys else k for k in metric_keys),
                     "wall_seconds", "error"])
    for r in rows:
        metrics = r.get("metrics") or {}
        writer.writerow([r["hash"], r["status"], *(cell(r["config"].get(k)) for k in config_keys),
                         *(cell(metrics.get(k)) for k in metric_keys), r.get("wall_seconds"),
                         r.get("error", "")])
    atomic_write_bytes(path, buffer.getvalue().encode())


@contextlib.contextmanager
def _thread_limits(threads: int):
    """Set the BLAS/OpenMP thread variables (unless the user set them) while the pool's
    workers are spawned: each task then uses ``threads`` cores in numpy and SciPy too, not only
    in torch, and the workers do not oversubscribe the machine."""
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    for k in THREAD_VARIABLES:
        os.environ.setdefault(k, str(threads))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stored_rows(configs: list[dict], task=DEFAULT_TASK, *, kind: str = "sweep",
                root: str | os.PathLike = "results") -> list[dict]:
    """One row per configuration (completed by the task's ``normalize``, then hashed) with what
    ``<root>/<kind>/`` holds for it; computes nothing. Keys: ``hash``, ``status`` (``cached`` or
    ``pending``), ``config``, ``metrics``, ``wall_seconds``, ``finished``, ``folder``."""
    return _stored_rows(configs, _resolve(task), _task_name(task), kind, root)


def _stored_rows(configs, fn, name: str, kind: str, root) -> list[dict]:
    normalize = getattr(fn, "normalize", lambda c: dict(c))
    records, rows = {}, []
    for c in configs:
        config = dict(normalize(c), task=name)
        folder = run_folder(root, kind, config)
        if folder.name not in records:
            records[folder.name] = find_run(folder, load_network=False)
        record = records[folder.name]
        rows.append({"hash": folder.name, "status": "cached" if record else "pending",
                     "config": config, "metrics": record.metrics if record else None,
                     "wall_seconds": record.wall_seconds if record else None,
                     "finished": record.finished if record else None, "folder": str(folder)})
    return rows


def run_sweep(configs: list[dict], task=DEFAULT_TASK, *, kind: str = "sweep",
              root: str | os.PathLike = "results", executor: cf.Executor | None = None,
              workers: int | None = None, progress: bool = True,
              checkpoint_interval: float = 60.0, threads: int = 1,
              summary: str | None = "summary.csv") -> list[dict]:
    """Run ``task`` on every configuration (see the module doc); return one row per
    configuration, in order: ``hash``, ``status`` (``computed``, ``cached`` or ``failed``),
    ``config``, ``metrics``, ``wall_seconds``, ``error``, ``folder``. Writes
    ``<root>/<kind>/<summary>`` (``summary=None``: no table). A failing task does not stop the
    others."""
    fn = _resolve(task)
    if not isinstance(configs, (list, tuple)) or not configs:
        raise ValueError("run_sweep needs a non-empty list of configurations")
    root = Path(root)
    rows = _stored_rows(configs, fn, _task_name(task), kind, root)
    (root / kind).mkdir(parents=True, exist_ok=True)
    todo = {row["hash"]: row["config"] for row in rows if row["status"] == "pending"}
    log.info("sweep %s: %d configuration(s), %d to compute", kind, len(rows), len(todo))
    own = executor is None and bool(todo)
    if own:
        with _thread_limits(threads):  # the workers' BLAS reads them when they start
            executor = cf.ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1,
                                              mp_context=multiprocessing.get_context("spawn"))
    done: dict[str, dict] = {}
    try:
        futures = {executor.submit(_run_one, task if isinstance(task, str) else fn, kind,
                                   str(root), config, checkpoint_interval, threads): key
                   for key, config in todo.items()}
        with tqdm(total=len(futures), desc=f"sweep {kind}", disable=not progress) as bar:
            for future in cf.as_completed(futures):
                key = futures[future]
                try:
                    done[key] = future.result()
                except Exception as error:  # reported per task; the others go on
                    done[key] = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
                    log.error("task %s failed: %s", key, done[key]["error"])
                bar.update(1)
    finally:
        if own:
            executor.shutdown(wait=True, cancel_futures=True)
    for row in rows:
        if row["hash"] in done:
            outcome = done[row["hash"]]
            row.update({k: v for k, v in outcome.items() if k != "hash"})
    if summary:
        _write_summary(root / kind / summary, rows)
    return rows

