"""The ``eandc`` command line: recover, compare, demo, sweep, book.

    eandc recover --teacher teacher.npz                  # a saved eandc.MLP
    eandc recover --teacher mymodule:predict --d-in 2 --activation tanh
    eandc recover --teacher pairs.npz --activation tanh  # recorded queries X and outputs y
    eandc compare teacher.npz results/recover/<hash>
    eandc demo
    eandc sweep configs.json --workers 2                 # or --scheduler tcp://HOST:PORT
    eandc book --profile smoke                           # execute the notebooks, build the book

Every command takes ``--seed``, ``--device``, ``--quiet`` and ``--verbose``. Exit code 0 on
success; 1 when ``demo`` (or ``compare --require-exact``) finds the recovery not exact; 2 with
a one-line reason on the last line of stderr for bad input or a failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .activations import ACTIVATIONS
from .book import add_command as add_book_command
from .checkpoint import Checkpoint
from .compare import compare
from .mlp import FORMAT as MLP_FORMAT
from .mlp import MLP
from .recover import expand_and_cluster
from .runs import (
    CHECKPOINT,
    NETWORK,
    array_hash,
    check_writable,
    config_hash,
    load_run,
    plain,
    save_run,
)
from .storage import CorruptFileError, atomic_write_bytes, load_arrays
from .teachers import check_inputs, gaussian_inputs, query, random_teacher, uniform_inputs

log = logging.getLogger("eandc")

GENERATORS = {"gaussian": gaussian_inputs, "uniform": uniform_inputs}


# ---------------------------------------------------------------------------------------------
# Argument types.

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths are positive integers separated by commas, "
                                         f"got {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r}: only cpu and cuda are supported")
    return device


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0,
                        help="seed of the students (and of generated queries: seed + 1; "
                             "held-out inputs: seed + 2); default 0")
    common.add_argument("--device", type=_device, default=torch.device("cpu"),
                        help="torch device to train on: cpu (default; bitwise reproducible) or cuda")
    common.add_argument("--quiet", action="store_true", help="no progress bars, less output")
    common.add_argument("--verbose", action="store_true", help="log what each phase does")
    return common


def _recovery_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--students", type=_positive, default=10, help="number of students N")
    parser.add_argument("--gamma", type=float, default=0.5,
                        help="a kept cluster holds at least gamma N students (default 0.5)")
    parser.add_argument("--beta", type=float, default=math.pi / 6,
                        help="largest median angle in a kept cluster, radians (default pi/6)")


# ---------------------------------------------------------------------------------------------
# Teachers and queries from files or entry points.

@dataclass
class Teacher:
    """What ``--teacher`` named: a network, a callable, or recorded outputs (and queries)."""

    description: str
    network: MLP | None = None
    function: object = None
    X: np.ndarray | None = None
    y: np.ndarray | None = None


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error):
            raise ValueError(f"{path} holds Python objects (a pickle); eandc loads plain numeric "
                             f"arrays only, never pickles ({what})") from None
        raise CorruptFileError(f"{path} is not a readable .npy file ({error})") from None
    except (OSError, EOFError) as error:
        raise CorruptFileError(f"{path} is not a readable .npy file ({error})") from None


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    import zipfile
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as error:
        if "pickle" in str(error):
            raise ValueError(f"{path} holds Python objects (a pickle); eandc loads plain numeric "
                             "arrays only, never pickles") from None
        raise CorruptFileError(f"{path} is not a readable .npz file ({error})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise CorruptFileError(f"{path} is not a readable .npz file ({error})") from None


def load_teacher(spec: str) -> Teacher:
    """A saved eandc.MLP (.npz), recorded pairs (.npz with X and y; .npy outputs), or an entry
    point ``module:function`` / ``file.py:function``."""
    from .sweep import load_entry_point

    path = Path(spec)
    if ":" in spec and not path.exists():
        obj = load_entry_point(spec, "--teacher")
        if isinstance(obj, MLP):
            return Teacher(f"entry point {spec}", network=obj)
        if not callable(obj):
            raise TypeError(f"--teacher {spec} names a {type(obj).__name__}, not a callable")
        return Teacher(f"entry point {spec}", function=obj)
    if not path.exists():
        raise FileNotFoundError(f"teacher file {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"--teacher {path} is a folder, not a file")
    if path.suffix == ".npy":
        return Teacher(f"recorded outputs {path}", y=_load_npy(path, "teacher outputs"))
    if path.suffix != ".npz":
        raise ValueError(f"unsupported teacher file {path} (type {path.suffix or 'none'!r}): give "
                         "an eandc network (.npz), recorded pairs (.npz with arrays X and y, or "
                         ".npy outputs with --queries), or module:function")
    try:
        _, meta = load_arrays(path)
    except CorruptFileError as error:
        if "no __meta__ entry" not in str(error):
            raise
        arrays = _load_npz(path)
        if {"X", "y"} <= set(arrays):
            return Teacher(f"recorded pairs {path}", X=arrays["X"], y=arrays["y"])
        raise ValueError(f"{path} is a foreign file: it holds arrays {sorted(arrays)}; expected an "
                         "eandc network file or recorded pairs with arrays X and y") from None
    if meta.get("format") != MLP_FORMAT:
        raise ValueError(f"{path} is a foreign eandc file (format {meta.get('format')!r}), not a "
                         "network")
    return Teacher(f"network file {path}", network=MLP.load(path))


def load_queries(spec: str, d_in: int | None, seed: int, what: str = "queries") -> np.ndarray:
    """``gaussian:N`` / ``uniform:N`` (needs ``d_in``), or a .npy / .npz file (array X)."""
    name, _, count = spec.partition(":")
    if name in GENERATORS and not Path(spec).exists():
        try:
            n = int(count or 10_000)
        except ValueError:
            raise ValueError(f"--{what} {spec}: the count after '{name}:' must be an integer") from None
        if n < 1:
            raise ValueError(f"--{what} {spec}: the number of {what} must be positive")
        if d_in is None:
            raise ValueError(f"--{what} {spec}: give --d-in, the input dimension of the teacher")
        return GENERATORS[name](n, d_in, seed=seed)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--{what} {spec}: no such file, and not one of "
                                f"{', '.join(g + ':N' for g in GENERATORS)}")
    if path.suffix == ".npy":
        return _load_npy(path, what)
    if path.suffix == ".npz":
        arrays = _load_npz(path)
        if "X" in arrays:
            return arrays["X"]
        if len(arrays) == 1:
            return next(iter(arrays.values()))
        raise ValueError(f"{path} holds arrays {sorted(arrays)}; name the {what} X")
    raise ValueError(f"--{what} {spec}: unsupported file type {path.suffix or 'none'!r} "
                     "(.npy or .npz)")


# ---------------------------------------------------------------------------------------------
# Commands.

def _add_demo(commands, common):
    demo = commands.add_parser("demo", parents=[common],
                               help="recover a random teacher and print the comparison")
    demo.add_argument("--activation", default="g", choices=sorted(ACTIVATIONS))
    demo.add_argument("--d-in", type=_positive, default=2, help="input dimension (default 2)")
    demo.add_argument("--width", type=_positive, default=4, help="teacher width (default 4)")
    demo.add_argument("--queries", type=_positive, default=10_000, help="number of queries")
    demo.add_argument("--students", type=_positive, default=10, help="number of students N")
    demo.add_argument("--rho", type=_positive, default=4,
                      help="overparameterisation factor: students are rho x width wide (default 4)")
    demo.set_defaults(func=demo_command)


def demo_command(args) -> int:
    teacher = random_teacher(args.d_in, [args.width], activation=args.activation, seed=args.seed)
    X = gaussian_inputs(args.queries, args.d_in, seed=args.seed + 1)
    held_out = gaussian_inputs(5_000, args.d_in, seed=args.seed + 2)
    print(f"teacher: {teacher}, seed {args.seed}; {args.queries} Gaussian queries; "
          f"{args.students} students {args.rho * args.width} wide")
    start = time.perf_counter()
    result = expand_and_cluster(teacher, X, args.activation, student_widths=[args.rho * args.width],
                                n_students=args.students, seed=args.seed, device=args.device,
                                progress=not args.quiet)
    seconds = time.perf_counter() - start
    comparison = compare(teacher, result.network.to("cpu"), held_out)
    print(result.summary())
    print(comparison.summary())
    exact = comparison.exact(distance_tol=1e-10, rmse_tol=1e-9)
    print(f"{'exact recovery' if exact else 'recovery NOT exact'} in {seconds:.1f} s")
    return 0 if exact else 1


def _add_recover(commands, common):
    recover = commands.add_parser(
        "recover", parents=[common], help="recover a black box's widths and weights",
        description="Recover a black-box MLP from its input-output pairs. The result goes to "
                    "OUT/recover/<hash of the configuration>/ (network.npz, result.json); an "
                    "identical run finds it there instead of recomputing. A run killed part-way "
                    "resumes from its checkpoint when started again with the same arguments.")
    recover.add_argument("--teacher", required=True,
                         help="a saved eandc network (.npz); recorded pairs (.npz with arrays X "
                              "and y, or .npy outputs with --queries FILE); or an entry point "
                              "module:function or file.py:function, called on (n, d_in) arrays")
    recover.add_argument("--queries", default=None,
                         help="gaussian:N or uniform:N (unit variance, seed + 1), or a .npy/.npz "
                              "file of inputs (default gaussian:10000)")
    recover.add_argument("--d-in", type=_positive, default=None,
                         help="input dimension, for generated queries of a callable teacher")
    recover.add_argument("--activation", default=None, choices=sorted(ACTIVATIONS),
                         help="the teacher's activation (default: the network file's, else g)")
    recover.add_argument("--layers", type=_positive, default=None,
                         help="hidden layers (default: the network file's, else 1)")
    recover.add_argument("--student-widths", type=_widths, default=None,
                         help="student widths, e.g. 16 or 16,12 (default: rho x the network "
                              "file's widths, else found by doubling)")
    recover.add_argument("--rho", type=_positive, default=4,
                         help="students are rho x as wide as a teacher network file (default 4)")
    _recovery_options(recover)
    recover.add_argument("--no-prune", action="store_true", help="keep every kept cluster")
    recover.add_argument("--adam-steps", type=int, default=None, help="Adam steps per training")
    recover.add_argument("--adam-batch", type=_positive, default=None,
                         help="rows per Adam step (default: all of them, full-batch steps)")
    recover.add_argument("--max-iter", type=_positive, default=None,
                         help="Levenberg-Marquardt iterations per training phase")
    recover.add_argument("--retry-max-iter", type=_positive, default=None,
                         help="when the recovered network is not exact, recover again from the "
                              "same initial students with this many Levenberg-Marquardt "
                              "iterations per training phase (default: no retry)")
    recover.add_argument("--finisher", default=None, choices=["auto", "dense", "matfree"],
                         help="second-order finisher: dense Levenberg-Marquardt, matrix-free "
                              "(conjugate gradients, for big students), or auto (default: "
                              "matrix-free above 4,000 parameters per student)")
    recover.add_argument("--held-out", default="5000",
                         help="held-out inputs for comparing with a teacher network: a count "
                              "(same generator as the queries, seed + 2) or a file (default 5000)")
    recover.add_argument("--out", default="results", type=Path,
                         help="results folder (created if its parent exists; default results)")
    recover.add_argument("--checkpoint-interval", type=_seconds, default=60.0,
                         help="seconds between checkpoints (default 60)")
    recover.add_argument("--force", action="store_true",
                         help="recompute even if this configuration's result is stored")
    recover.set_defaults(func=recover_command)


def recover_command(args) -> int:
    out = check_writable(args.out)
    teacher = load_teacher(args.teacher)
    net = teacher.network
    if teacher.X is not None:
        if args.queries is not None:
            raise ValueError(f"--teacher {args.teacher} holds its own queries (X); drop --queries")
        X, query_spec = teacher.X, f"recorded in {args.teacher}"
    else:
        query_spec = args.queries or "gaussian:10000"
        d_in = net.d_in if net is not None else args.d_in
        X = load_queries(query_spec, d_in, args.seed + 1)
    X = check_inputs(X).numpy()
    if net is not None and X.shape[1] != net.d_in:
        raise ValueError(f"the queries have {X.shape[1]} columns but the teacher network takes "
                         f"{net.d_in} inputs")
    if teacher.y is not None:
        y = check_inputs(teacher.y if teacher.y.ndim == 2 else np.asarray(teacher.y)[:, None],
                         name="teacher outputs").numpy()
        if len(y) != len(X):
            raise ValueError(f"{len(y)} teacher outputs for {len(X)} queries")
    else:
        y = query(net if net is not None else teacher.function, X)
    activation = args.activation or (net.activation.name if net is not None else "g")
    if net is not None and activation != net.activation.name:
        raise ValueError(f"--activation {activation}, but the teacher network uses "
                         f"{net.activation.name}")
    layers = args.layers or (net.n_hidden_layers if net is not None else 1)
    widths = args.student_widths
    if widths is None and net is not None:
        widths = [args.rho * w for w in net.widths]
    train_options = {k: v for k, v in (("adam_steps", args.adam_steps), ("adam_batch", args.adam_batch),
                                       ("max_iter", args.max_iter), ("finisher", args.finisher))
                     if v is not None}
    retry_with = [{"max_iter": args.retry_max_iter}] if args.retry_max_iter else []
    config = {"command": "recover", "queries": array_hash(X), "targets": array_hash(y),
              "activation": activation, "n_hidden_layers": layers, "student_widths": widths,
              "n_students": args.students, "gamma": args.gamma, "beta": args.beta,
              "seed": args.seed, "prune": not args.no_prune, "train_options": train_options,
              "retry_with": retry_with, "device": args.device.type, "eandc": __version__}
    key = config_hash(config)
    folder = out / "recover" / key
    say = (lambda *a: None) if args.quiet else print
    record = None
    if not args.force:
        try:
            record = load_run(folder)
        except CorruptFileError as error:  # reported, and recomputed below; never used
            print(f"eandc: damaged result, recomputing it: {error}", file=sys.stderr)
    if record is not None:
        say(f"already computed: {folder} (recovered widths {record.metrics['widths']}, "
            f"relative loss {record.metrics['final_loss']:.1e})")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(folder / CHECKPOINT, args.checkpoint_interval, fingerprint=key)
    if checkpoint.resumed_from:
        say(f"resuming from {checkpoint.path}: {checkpoint.resumed_from['finished_steps']} "
            f"finished step(s)")
    say(f"teacher: {teacher.description}; {len(X)} queries ({query_spec}); run {key}")
    start = time.perf_counter()
    result = expand_and_cluster(y, X, activation, layers, student_widths=widths,
                                n_students=args.students, gamma=args.gamma, beta=args.beta,
                                seed=args.seed, device=args.device, progress=not args.quiet,
                                prune_network=not args.no_prune, train_options=train_options,
                                retry_with=retry_with, checkpoint=checkpoint)
    wall = time.perf_counter() - start
    network = result.network.to("cpu")
    metrics = {"widths": result.widths, "clustered_widths": result.clustered_widths,
               "student_widths": result.student_widths, "final_loss": result.final_loss,
               "student_losses": [float(v) for v in result.student_losses[0]],
               "timings": result.timings, "pruning": result.pruning,
               "attempts": result.attempts}
    if net is not None and teacher.X is None:
        if args.held_out.isdigit():
            name = query_spec.partition(":")[0]
            held_out = GENERATORS.get(name, gaussian_inputs)(int(args.held_out), net.d_in,
                                                             seed=args.seed + 2)
        else:
            held_out = load_queries(args.held_out, net.d_in, args.seed + 2, "held-out")
        comparison = compare(net, network, held_out)
        metrics["comparison"] = dict(comparison.to_dict(), exact=comparison.exact())
    save_run(folder, config, metrics, network, wall,
             extra={"teacher": teacher.description, "query_spec": query_spec,
                    "resumed_from_checkpoint": checkpoint.resumed_from})
    checkpoint.remove()
    say(result.summary())
    if "comparison" in metrics:
        say(comparison.summary())
    print(f"recovered widths {result.widths} in {wall:.1f} s; saved {folder / NETWORK} and "
          f"{folder / 'result.json'}")
    return 0


def _load_network(spec: str, what: str) -> MLP:
    path = Path(spec)
    if path.is_dir():  # a result folder: checked against its result.json
        record = load_run(path)
        if record is None or record.network is None:
            raise FileNotFoundError(f"{what} {path}: no finished run with a network in this folder")
        return record.network
    teacher = load_teacher(spec)
    if teacher.network is None:
        raise ValueError(f"{what} {spec} is not an eandc network ({teacher.description})")
    return teacher.network


def _add_compare(commands, common):
    comp = commands.add_parser("compare", parents=[common],
                               help="compare a recovered network with its teacher")
    comp.add_argument("teacher", help="teacher network (.npz written by eandc.MLP.save)")
    comp.add_argument("recovered", help="recovered network (.npz), or a result folder")
    comp.add_argument("--inputs", default="gaussian:5000",
                      help="held-out inputs: gaussian:N, uniform:N (seed + 2) or a .npy/.npz file")
    comp.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    comp.add_argument("--require-exact", action="store_true",
                      help="exit 1 unless the recovery is exact (tolerances below)")
    comp.add_argument("--distance-tol", type=float, default=1e-6)
    comp.add_argument("--rmse-tol", type=float, default=1e-6)
    comp.set_defaults(func=compare_command)


def compare_command(args) -> int:
    teacher = _load_network(args.teacher, "teacher")
    recovered = _load_network(args.recovered, "recovered network")
    X = load_queries(args.inputs, teacher.d_in, args.seed + 2, "inputs")
    comparison = compare(teacher, recovered, X)
    exact = comparison.exact(args.distance_tol, args.rmse_tol)
    if args.json is not None:
        check_writable(args.json.parent, create=False)
        document = dict(comparison.to_dict(), exact=exact, distance_tol=args.distance_tol,
                        rmse_tol=args.rmse_tol)
        atomic_write_bytes(args.json, json.dumps(plain(document), indent=1).encode() + b"\n")
    if not args.quiet:
        print(comparison.summary())
    print("exact" if exact else "NOT exact", f"(cosine distance <= {args.distance_tol:g}, "
          f"relative RMSE <= {args.rmse_tol:g})")
    if args.require_exact and not exact:
        print("eandc: the recovery is not exact", file=sys.stderr)
        return 1
    return 0


def _add_sweep(commands, common):
    sweep = commands.add_parser(
        "sweep", parents=[common], help="run a task over many configurations (pool or Dask)",
        description="Run a task over the configurations in a JSON file (a list of objects, or "
                    "{\"configs\": [...], \"task\": ..., \"kind\": ...}); each result goes to "
                    "RESULTS/KIND/<hash>/ and is not recomputed; a killed sweep resumes. The "
                    "default task recovers eandc.random_teacher networks (keys: see "
                    "eandc.sweep.RANDOM_TEACHER_DEFAULTS).")
    sweep.add_argument("configs", type=Path, help="JSON file of configurations")
    sweep.add_argument("--task", default=None, help="module:function (default: the file's task, "
                       "else eandc.sweep:recover_random_teacher)")
    sweep.add_argument("--kind", default=None, help="results subfolder (default: the file's, "
                       "else sweep)")
    sweep.add_argument("--results", type=Path, default=Path("results"), help="results root")
    sweep.add_argument("--workers", type=_positive, default=None,
                       help="local processes (default: one per CPU core)")
    sweep.add_argument("--scheduler", default=None,
                       help="tcp://HOST:PORT of a running Dask scheduler to run the tasks on")
    sweep.add_argument("--scheduler-timeout", type=_seconds, default=10.0,
                       help="seconds to wait for the Dask scheduler (default 10)")
    sweep.add_argument("--threads", type=_positive, default=1, help="torch threads per task")
    sweep.add_argument("--checkpoint-interval", type=_seconds, default=60.0,
                       help="seconds between checkpoints of each task (default 60)")
    sweep.set_defaults(func=sweep_command)


def sweep_command(args) -> int:
    from .sweep import DEFAULT_TASK, dask_executor, load_configs, run_sweep

    configs, options = load_configs(args.configs)
    task = args.task or options.get("task") or DEFAULT_TASK
    kind = args.kind or options.get("kind") or "sweep"
    check_writable(args.results)
    client = executor = None
    if args.scheduler:
        client, executor = dask_executor(args.scheduler, args.scheduler_timeout)
    try:
        rows = run_sweep(configs, task, kind=kind, root=args.results, executor=executor,
                         workers=args.workers, progress=not args.quiet,
                         checkpoint_interval=args.checkpoint_interval, threads=args.threads)
    finally:
        if client is not None:
            client.close()
    counts = {s: sum(r["status"] == s for r in rows) for s in ("computed", "cached", "failed")}
    print(f"{len(rows)} task(s): {counts['computed']} computed, {counts['cached']} already done, "
          f"{counts['failed']} failed; results in {args.results / kind} (summary.csv)")
    if counts["failed"]:
        first = next(r for r in rows if r["status"] == "failed")
        raise RuntimeError(f"{counts['failed']} task(s) failed; first ({first['hash']}): "
                           f"{first['error']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eandc", description="Recover the exact weights and "
                                     "layer widths of black-box MLPs with Expand-and-Cluster.")
    parser.add_argument("--version", action="version", version=f"eandc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()
    _add_recover(commands, common)
    _add_compare(commands, common)
    _add_demo(commands, common)
    _add_sweep(commands, common)
    add_book_command(commands)  # eandc/book.py
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="eandc: %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("eandc: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError, ImportError, MemoryError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        print(f"eandc: error: {reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
