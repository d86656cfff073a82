"""Training speed: eandc against the published recipe, a torch LBFGS loop and scikit-learn.

    python benchmarks/training_speed.py [--quick] [--problems T1,T1tanh,T2,T3] [--device cpu|cuda]
                                        [--methods ...] [--budget SECONDS] [--threads N]

Problems (teacher from eandc.random_teacher, seed 0; queries seed 1; students seed 0):

* T1: g teacher 2-4-1, 10,000 Gaussian queries, 10 students 16 wide.
* T1tanh: the same with tanh (scikit-learn has no g), for the scikit-learn comparison.
* T2: g teacher 8-16-1, 20,000 Gaussian queries, 10 students 64 wide.
* T3: MNIST-sized students 784-128-10 (g), 10 of them, 10,000 uniform [0, 1] inputs, targets of
  a g teacher 784-32-10: cost per epoch (Adam, minibatch 512) and per iteration only.

Methods, each in a fresh subprocess (so that its peak RSS is its own):

* recipe: the published recipe (benchmarks/baselines.py), float32, until 90% of the students
  are below the target relative loss 1e-10, the learning rate reaches min_lr, or the budget.
* lbfgs: torch.optim.LBFGS, one student at a time, float64, ``budget / N`` seconds per student.
* sklearn: MLPRegressor(solver="lbfgs"), one student at a time (T1tanh only).
* eandc: eandc.training.train_students on the same students (runs to its own end).
* eandc_e2e: eandc.expand_and_cluster end to end with an adaptive training budget
  (``E2E_OPTIONS``: short second-order stages first, the whole recovery done again with longer
  ones only when the first is not exact); exact = widths right and max cosine distance
  <= 1e-10 on 5,000 held-out queries (eandc.compare).
* steps: samples per second of one Adam step of the batched students on the Adam phase's rows
  (autograd through eandc.mlp.forward, the chunked analytic gradient of eandc.fast, the same
  with a torch.compile'd activation, and the compiled kernel of eandc.native, what adam_phase
  takes by default on the CPU), one Levenberg-Marquardt iteration, and their GFLOP/s (matrix
  products counted by torch.utils.flop_counter, Cholesky factorisations added as P^3/3); and the
  floor of a step: only the arithmetic that no implementation of it can skip, run with PyTorch's
  kernels on cache-sized chunks of rows (the first layer's product, the transcendental functions
  the activation's value needs, ``FLOOR_FUNCTIONS``, and the first layer's gradient product),
  whose time bounds the speed-up over autograd that any step built from these kernels can reach.
* peak (once per run): float64 and float32 matrix-multiply GFLOP/s (4096 x 4096 products).

``--quick`` scales the budget from 600 s down to 20 s (eandc runs have no budget). Writes
benchmarks/results/training_speed-<date>.json with the machine, versions, commit and every
method's numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET = 1e-10  # relative loss
STEPS_PER_CALL = 20  # Adam steps per timed call of run_steps
# End to end: Levenberg-Marquardt stages of 30 iterations (the default 400 lets wide students
# creep towards degenerate minima for minutes before compaction), two compaction rounds and a
# 10-iteration polish on all rows; the clusters, pruning and completion then find what the
# students have not settled. Not exact: everything again with 150-iteration stages and three
# compaction rounds (``retry_with``). On T2 (2 cores, session 15) the third compaction round
# cost 14 s for no change in the result; without the polish, T1's first attempt was not exact.
E2E_OPTIONS = dict(train_options=dict(max_iter=30, polish_iter=10, compaction_rounds=2),
                   retry_with=[dict(max_iter=150, compaction_rounds=3)])
PROBLEMS = {
    "T1": dict(d_in=2, width=4, d_out=1, activation="g", n=10_000, students=10, student_width=16),
    "T1tanh": dict(d_in=2, width=4, d_out=1, activation="tanh", n=10_000, students=10,
                   student_width=16),
    "T2": dict(d_in=8, width=16, d_out=1, activation="g", n=20_000, students=10, student_width=64),
    "T3": dict(d_in=784, width=32, d_out=10, activation="g", n=10_000, students=10,
               student_width=128, inputs="uniform01"),
}
# The transcendental functions an activation's value needs at least, once per hidden activity:
# softplus(z) = max(z, 0) + log1p(exp(-|z|)) and g adds sigmoid(4z), a rational function of
# exp(-|z|); tanh is one tanh.
FLOOR_FUNCTIONS = {"g": ("exp", "log1p"), "softplus": ("exp", "log1p"), "tanh": ("tanh",),
                   "sigmoid": ("exp",)}
METHODS = {
    "T1": ["steps", "recipe", "lbfgs", "eandc", "eandc_e2e"],
    "T1tanh": ["sklearn", "eandc", "eandc_e2e"],
    "T2": ["steps", "recipe", "lbfgs", "eandc", "eandc_e2e"],
    "T3": ["eandc", "autograd", "recipe", "lbfgs", "sklearn"],
}


# ---------------------------------------------------------------- worker side (one subprocess)

def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _best_seconds(fn, device, reps=3, min_seconds=0.5):
    """Best wall seconds of ``fn()`` over ``reps`` runs (more while under ``min_seconds`` total)."""
    fn()  # warm-up
    _sync(device)
    best, total, runs = float("inf"), 0.0, 0
    while runs < reps or (total < min_seconds and runs < 100):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        best, total, runs = min(best, dt), total + dt, runs + 1
    return best


def make_problem(name, device, seed=0):
    """(teacher, X, y, X numpy, y numpy, layout, activation, initial students theta0)."""
    import numpy as np
    import torch

    import eandc
    from eandc.mlp import Layout
    from eandc.training import init_students

    p = PROBLEMS[name]
    teacher = eandc.random_teacher(p["d_in"], [p["width"]], d_out=p["d_out"],
                                   activation=p["activation"], seed=seed)
    if p.get("inputs") == "uniform01":
        X_np = np.random.default_rng(seed + 1).uniform(0, 1, size=(p["n"], p["d_in"]))
    else:
        X_np = eandc.gaussian_inputs(p["n"], p["d_in"], seed=seed + 1)
    y_np = np.asarray(eandc.query(teacher, X_np)).reshape(p["n"], p["d_out"])
    X = torch.as_tensor(X_np, dtype=torch.float64, device=device)
    y = torch.as_tensor(y_np, dtype=torch.float64, device=device)
    act = eandc.get_activation(p["activation"])
    layout = Layout(p["d_in"], (p["student_width"],), p["d_out"], act.leaves_linear_term)
    theta0 = init_students(layout, act, p["students"], y.cpu(), seed=seed, device=device).theta
    return teacher, X, y, X_np, y_np, layout, act, theta0


def _summary(rel):
    from baselines import quantile_loss

    return dict(relative_losses=[float(v) for v in rel], quantile_loss=quantile_loss(rel),
                n_below_target=int(sum(float(v) <= TARGET for v in rel)))


def _adam_rows(layout, n):
    return min(n, max(1000, 10 * layout.size))  # train_students' default subset


def run_steps(problem, device, seed):
    """Samples/s of one Adam step (autograd / chunked / compiled / native), one LM iteration,
    GFLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode

    from eandc import native
    from eandc.fast import loss_and_gradient
    from eandc.training import adam_phase, levenberg_marquardt

    _, X, y, _, _, layout, act, theta0 = make_problem(problem, device, seed)
    rows = _adam_rows(layout, X.shape[0])
    Xs, ys = X[:rows], y[:rows]
    out = dict(rows=rows, n_students=theta0.shape[0], n_parameters=layout.size,
               steps_per_call=STEPS_PER_CALL)
    # Steps per timed call, for every method alike: a call's set-up (the optimizer, the checks)
    # counts once per 20 steps (once per 300 in train_students' Adam phase); with 5, the set-up
    # took about an eighth of T1's step in the kernel
    steps = STEPS_PER_CALL
    gradients = ["autograd", "chunked", "compiled"]
    reason = native.unsupported_reason(layout, act, Xs, theta0)
    if reason is None:
        gradients.append("native")
    else:
        out["native_unavailable"] = reason
    for gradient in gradients:
        t0 = time.perf_counter()
        adam_phase(theta0, layout, act, Xs, ys, 1, gradient=gradient)  # warm-up (compiles)
        _sync(device)
        warm = time.perf_counter() - t0
        # best of at least 7 runs and 2 s: the machine's speed varies from second to second
        seconds = _best_seconds(lambda g=gradient: adam_phase(theta0, layout, act, Xs, ys, steps,
                                                              gradient=g), device, reps=7,
                                min_seconds=2.0) / steps
        out[gradient] = dict(seconds_per_step=seconds, samples_per_second=rows / seconds,
                             first_call_seconds=warm)
    if "native" in out:  # adam_phase's native loop is eandc.native.adam_steps (earlier records,
        out["native"]["loop_in_kernel"] = True  # before commit ab48c9d, stepped torch's Adam)
    for gradient in gradients[1:]:
        out[gradient]["speedup_over_autograd"] = (out["autograd"]["seconds_per_step"]
                                                  / out[gradient]["seconds_per_step"])
    with FlopCounterMode(display=False) as counter:  # the native kernel does the same products
        loss_and_gradient(theta0, layout, act, Xs, ys, backend="torch")
    flops = counter.get_total_flops()
    for gradient in gradients[1:]:
        out[gradient]["gflop_per_step"] = flops / 1e9
        out[gradient]["gflops"] = flops / 1e9 / out[gradient]["seconds_per_step"]
    # Levenberg-Marquardt: two iterations from the initial students (all of them active)
    lm = _best_seconds(lambda: levenberg_marquardt(theta0, layout, act, Xs, ys, max_iter=2,
                                                   patience=10**6), device, reps=2) / 2
    with FlopCounterMode(display=False) as counter:
        levenberg_marquardt(theta0, layout, act, Xs, ys, max_iter=1, patience=10**6)
    n_students, P = theta0.shape
    lm_flops = counter.get_total_flops() + n_students * (P ** 3 / 3 + 4 * P ** 2)
    out["lm_iteration"] = dict(seconds=lm, samples_per_second=rows / lm, gflop=lm_flops / 1e9,
                               gflops=lm_flops / 1e9 / lm)
    floor = step_floor(layout, act, Xs, n_students, device)
    out["floor"] = dict(seconds_per_step=floor, samples_per_second=rows / floor,
                        functions=list(FLOOR_FUNCTIONS[act.name]),
                        ceiling_over_autograd=out["autograd"]["seconds_per_step"] / floor)
    return out


def step_floor(layout, act, X, n_students, device):
    """Seconds of the part of one gradient step that no implementation can skip, on PyTorch's
    kernels: per chunk of rows (as many as :func:`eandc.fast.loss_and_gradient` takes), the
    first layer's pre-activations of all students (one product), ``FLOOR_FUNCTIONS`` of the
    activation applied in place to them, and the first layer's gradient product."""
    import torch

    from eandc.fast import CHUNK_ELEMENTS, _chunk_rows

    width = layout.widths[0]
    rows = _chunk_rows(X.shape[0], n_students, max(layout.widths), CHUNK_ELEMENTS)
    w_first = torch.randn(n_students * width, layout.d_in, dtype=X.dtype, device=device)
    functions = [getattr(torch, name) for name in FLOOR_FUNCTIONS[act.name]]
    z = torch.empty(rows, n_students * width, dtype=X.dtype, device=device)
    gradient = torch.empty_like(w_first)

    def step():
        for start in range(0, X.shape[0], rows):
            x = X[start:start + rows]
            h = torch.mm(x, w_first.T, out=z[:x.shape[0]])
            for f in functions:
                f(h, out=h)
            torch.mm(h.T, x, out=gradient)

    return _best_seconds(step, device)


def run_t3(method, device, seed):
    """T3: seconds per epoch (Adam, minibatch 512) and per full-batch iteration."""
    import torch
    from baselines import PLAIN, _recipe_parameters, recipe_forward, recipe_losses

    from eandc.fast import autograd_loss_and_gradient, loss_and_gradient
    from eandc.mlp import forward

    _, X, y, X_np, y_np, layout, act, theta0 = make_problem("T3", device, seed)
    n, batch = X.shape[0], 512
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    batches = [order[i:i + batch] for i in range(0, n, batch)]
    out = dict(batch_size=batch, rows=n, batches_per_epoch=len(batches))
    if method in ("eandc", "autograd"):
        grad_fn = loss_and_gradient if method == "eandc" else autograd_loss_and_gradient
        theta = theta0.clone()
        optimizer = torch.optim.Adam([theta.requires_grad_(True)], lr=1e-3)

        def epoch():
            for rows in batches:
                theta.grad = grad_fn(theta.detach(), layout, act, X[rows], y[rows])[1]
                optimizer.step()

        def full_step():
            theta.grad = grad_fn(theta.detach(), layout, act, X, y)[1]
            optimizer.step()

        out["dtype"] = "float64"
        out["seconds_per_epoch"] = _best_seconds(epoch, device, reps=2)
        out["seconds_per_iteration"] = _best_seconds(full_step, device, reps=2)
        out["iteration"] = "one full-batch Adam step, all students"
        out["levenberg_marquardt"] = (f"not run: {theta0.shape[0]} Gauss-Newton systems of "
                                      f"{layout.size:,}^2 float64 = "
                                      f"{theta0.shape[0] * layout.size ** 2 * 8 / 1e9:,.0f} GB")
    elif method == "recipe":
        ws, bs = _recipe_parameters(theta0, layout)
        X32, y32 = X.to(torch.float32), y.to(torch.float32)
        optimizer = torch.optim.Adam([*ws, *bs], lr=1e-3)
        a = PLAIN[act.name]

        def step(rows):
            optimizer.zero_grad()
            loss = recipe_losses(recipe_forward(ws, bs, a, X32[rows]), y32[rows]).sum()
            loss.backward()
            optimizer.step()
            return loss.item()

        out["dtype"] = "float32"
        out["seconds_per_epoch"] = _best_seconds(lambda: [step(r) for r in batches], device, reps=2)
        out["seconds_per_iteration"] = _best_seconds(lambda: step(order), device, reps=2)
        out["iteration"] = "one full-batch Adam step, all students"
    elif method == "lbfgs":
        p = theta0[0].clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([p], lr=1, max_iter=1, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = (forward(p, layout, act, X) - y).square().mean()
            loss.backward()
            return loss

        per_student = _best_seconds(lambda: optimizer.step(closure), device, reps=3)
        out["dtype"] = "float64"
        out["seconds_per_iteration"] = per_student * theta0.shape[0]
        out["iteration"] = "one LBFGS iteration (strong Wolfe) per student, times N"
    elif method == "sklearn":
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPRegressor

        def fit(iterations):
            model = MLPRegressor(hidden_layer_sizes=(layout.widths[0],), activation="tanh",
                                 solver="lbfgs", alpha=0.0, tol=0.0, max_iter=iterations,
                                 random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(X_np, y_np)
            return model.n_iter_

        t0 = time.perf_counter()
        done = fit(10)
        ten = time.perf_counter() - t0
        t0 = time.perf_counter()
        fit(1)
        one = time.perf_counter() - t0
        per_iteration = (ten - one) / max(1, done - 1)
        out["dtype"] = "float64"
        out["activation"] = "tanh (scikit-learn has no g)"
        out["seconds_per_iteration"] = per_iteration * theta0.shape[0]
        out["iteration"] = "one L-BFGS-B iteration per student (tanh), times N"
    return out


def run_method(method, problem, device, budget, seed):
    import baselines

    import eandc
    from eandc import StudentBatch
    from eandc.training import train_students

    if problem == "T3":
        return run_t3(method, device, seed)
    if method == "steps":
        return run_steps(problem, device, seed)
    teacher, X, y, X_np, y_np, layout, act, theta0 = make_problem(problem, device, seed)
    if method == "recipe":
        return baselines.train_recipe(theta0, layout, act, X, y, budget, TARGET, seed=seed)
    if method == "lbfgs":
        return baselines.train_lbfgs_loop(theta0, layout, act, X, y, budget, TARGET)
    if method == "sklearn":
        p = PROBLEMS[problem]
        return baselines.train_sklearn(X_np, y_np, p["students"], layout.widths, p["activation"],
                                       budget, TARGET, seed=seed)
    if method == "eandc":
        _sync(device)
        t0 = time.perf_counter()
        _, report = train_students(StudentBatch(theta0, layout, act), X, y, seed=seed)
        _sync(device)
        seconds = time.perf_counter() - t0
        out = _summary(report.relative_losses)
        out.update(seconds=seconds, phases=report.seconds, iterations=report.iterations,
                   seconds_to_target=seconds if out["quantile_loss"] <= TARGET else None)
        return out
    if method == "eandc_e2e":
        p = PROBLEMS[problem]
        t0 = time.perf_counter()
        result = eandc.expand_and_cluster(teacher, X_np, act.name, student_widths=[p["student_width"]],
                                          n_students=p["students"], seed=seed, device=device,
                                          progress=False, **E2E_OPTIONS)
        seconds = time.perf_counter() - t0
        held_out = eandc.gaussian_inputs(5_000, p["d_in"], seed=seed + 2)
        comparison = eandc.compare(teacher, result.network, held_out)
        exact = comparison.widths_match and comparison.max_distance <= TARGET
        return dict(seconds=seconds, exact=bool(exact), widths=result.widths, options=E2E_OPTIONS,
                    attempts=result.attempts, source=result.source,
                    max_cosine_distance=comparison.max_distance,
                    relative_rmse=comparison.relative_rmse, timings=result.timings,
                    seconds_to_exact=seconds if exact else None,
                    **_summary(result.student_losses[0]))
    raise ValueError(f"unknown method {method!r}")


def run_peak(device):
    """Matrix-multiply GFLOP/s, float64 and float32 (4096 x 4096 x 4096)."""
    import torch

    out = {}
    for dtype in (torch.float64, torch.float32):
        a = torch.randn(4096, 4096, dtype=dtype, device=device)
        b = torch.randn(4096, 4096, dtype=dtype, device=device)
        seconds = _best_seconds(lambda a=a, b=b: torch.matmul(a, b), device, reps=3)
        out[str(dtype).replace("torch.", "")] = 2 * 4096 ** 3 / seconds / 1e9
    return out


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after imports
    t0 = time.perf_counter()
    if args.worker == "peak":
        result = run_peak(device)
    else:
        result = run_method(args.worker, args.problem, device, args.budget, args.seed)
    result["wall_seconds"] = time.perf_counter() - t0
    result["rss_after_imports_mb"] = base_rss
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    Path(args.out).write_text(json.dumps(result, default=float))


# ---------------------------------------------------------------- parent side

def _machine(device):
    import numpy
    import torch

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(cpu=model, cores=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), torch=torch.__version__, numpy=numpy.__version__)
    try:
        import sklearn

        info["scikit-learn"] = sklearn.__version__
    except ImportError:
        info["scikit-learn"] = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _launch(task, args, budget):
    problem, method = task
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method,
               "--problem", problem or "-", "--device", args.device, "--budget", str(budget),
               "--threads", str(args.threads), "--seed", str(args.seed), "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   OPENBLAS_NUM_THREADS=str(args.threads), TQDM_DISABLE="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(Path(__file__).parent),
                                               os.environ.get("PYTHONPATH", "")]))
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return dict(error=f"timed out after {args.timeout} s")
        if proc.returncode != 0 or not out.exists():
            return dict(error=(proc.stderr or proc.stdout).strip().splitlines()[-1:] or
                        [f"exit status {proc.returncode}"])
        return json.loads(out.read_text())


def _fmt(v, spec=".3g"):
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _ratio(eandc_run, other, budget):
    """How many times faster eandc reached the target than ``other`` (number or None, text)."""
    if not other or "error" in other or not eandc_run or "error" in eandc_run:
        return None, "n/a"
    mine, theirs = eandc_run.get("seconds_to_target"), other.get("seconds_to_target")
    spent = other.get("seconds", budget)
    if mine is not None and theirs is not None:
        return theirs / mine, f"{theirs / mine:.2f}x"
    if mine is not None:
        bound = f"> {spent / mine:.2f}x: " if spent > mine else ""
        return None, (f"{bound}eandc reached {TARGET:g} in {mine:.1f} s; the other never did "
                      f"(90% loss {other['quantile_loss']:.1e} after {spent:.1f} s, "
                      f"stop: {other.get('stop', '-')})")
    if theirs is not None:
        return theirs / eandc_run["seconds"], (f"{theirs / eandc_run['seconds']:.2f}x "
                                               "(eandc did not reach the target)")
    return None, (f"neither reached {TARGET:g}: 90% loss eandc {eandc_run['quantile_loss']:.1e} "
                  f"in {eandc_run['seconds']:.1f} s, the other {other['quantile_loss']:.1e} in "
                  f"{spent:.1f} s (stop: {other.get('stop', '-')})")


def _e2e_ratio(e2e, other, budget):
    """How many times faster eandc's end-to-end exact recovery was than ``other``'s training
    reached the target (a lower bound when it never did: its time spent)."""
    if not e2e or "error" in e2e or not e2e.get("exact") or not other or "error" in other:
        return None, "n/a"
    theirs = other.get("seconds_to_target")
    spent = other.get("seconds", budget)
    if theirs is not None:
        return theirs / e2e["seconds"], f"{theirs / e2e['seconds']:.1f}x"
    if "budget" not in str(other.get("stop", "budget")):  # it gave up on its own: no bound
        return None, (f"exact in {e2e['seconds']:.1f} s; the other stopped without reaching "
                      f"{TARGET:g} (90% loss {other['quantile_loss']:.1e} after {spent:.1f} s, "
                      f"stop: {other['stop']})")
    return spent / e2e["seconds"], (
        f"> {spent / e2e['seconds']:.1f}x: exact in {e2e['seconds']:.1f} s; the other never "
        f"reached {TARGET:g} (90% loss {other['quantile_loss']:.1e} after {spent:.1f} s, "
        f"stop: {other.get('stop', '-')})")


def report(results, args, budget):
    lines = [f"threads {args.threads}, device {args.device}, budget {budget:g} s, target: 90% of "
             f"students below relative loss {TARGET:g}", ""]
    head = (f"{'problem':8s} {'method':10s} {'to target s':>11s} {'90% loss':>9s} {'below':>6s} "
            f"{'run s':>7s} {'peak MB':>8s}  notes")
    lines += [head, "-" * len(head)]
    ratios = {}
    for problem, methods in results.items():
        if problem in ("T3", "_peak"):
            continue
        for method, r in methods.items():
            if method == "steps":
                continue
            if "error" in r:
                lines.append(f"{problem:8s} {method:10s} ERROR {r['error']}")
                continue
            note = ""
            if method == "recipe":
                note = f"{r['epochs']} epochs, lr {r['final_lr']:.1e}, stop {r['stop']}"
            elif method == "eandc_e2e":
                note = (f"widths {r['widths']}, max cos dist {r['max_cosine_distance']:.1e}, "
                        f"{'exact' if r['exact'] else 'NOT exact'}")
                if "attempts" in r:
                    note += f" (from {r['source']}, {r['attempts']} attempt(s))"
            elif method == "sklearn":
                note = f"tanh, scikit-learn's own init; stop: {r['stop']}"
            elif method == "lbfgs":
                note = f"stop: {r['stop']}"
            elif method == "eandc":
                note = "phases " + ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items())
            below = r.get("n_below_target", sum(v <= TARGET for v in r["relative_losses"]))
            to_target = r.get("seconds_to_exact") if method == "eandc_e2e" else r.get("seconds_to_target")
            lines.append(f"{problem:8s} {method:10s} {_fmt(to_target, '.1f'):>11s} "
                         f"{r['quantile_loss']:9.1e} {below:>3d}/{len(r['relative_losses']):<2d} "
                         f"{r.get('seconds', r['wall_seconds']):7.1f} {r['peak_rss_mb']:8.0f}  {note}")
        mine = methods.get("eandc")
        for other in ("recipe", "lbfgs", "sklearn"):
            if other in methods:
                value, text = _ratio(mine, methods[other], budget)
                ratios[f"{problem} eandc vs {other}"] = dict(speedup=value, text=text)
                value, text = _e2e_ratio(methods.get("eandc_e2e"), methods[other], budget)
                ratios[f"{problem} eandc_e2e vs {other}"] = dict(speedup=value, text=text)
    if ratios:
        lines += ["", "eandc (train_students) speed-up in time to target, and end-to-end exact "
                      "recovery (eandc_e2e) against the baseline's training:"]
        lines += [f"  {k}: {v['text']}" for k, v in ratios.items()]
    peak = results.get("_peak", {}).get("peak", {})
    steps = {p: m["steps"] for p, m in results.items() if "steps" in m and "error" not in m["steps"]}
    if steps:
        lines += ["", "Adam step of all students on the Adam phase's rows (samples/s, higher is "
                      "better) and one Levenberg-Marquardt iteration:"]
        for p, s in steps.items():
            # records before the native kernel called the chunked PyTorch step "fused"
            fast = [(label, s[key]) for label, key in (("chunked", "chunked"), ("chunked", "fused"),
                                                       ("compiled", "compiled"), ("native", "native"))
                    if key in s]
            lines.append(f"  {p} ({s['n_students']} x {s['n_parameters']} params, {s['rows']} rows): "
                         f"autograd {s['autograd']['samples_per_second']:,.0f}, "
                         + ", ".join(f"{label} {r['samples_per_second']:,.0f} "
                                     f"({r['speedup_over_autograd']:.2f}x"
                                     + (f", first call {r['first_call_seconds']:.1f} s)"
                                        if label == "compiled" else ")") for label, r in fast)
                         + f"; LM iteration {s['lm_iteration']['seconds'] * 1e3:.0f} ms")
            if "native_unavailable" in s:
                lines.append(f"      native kernel not run: {s['native_unavailable']}")
            if "floor" in s:
                f = s["floor"]
                lines.append(f"      floor of a step on PyTorch's kernels ({' + '.join(f['functions'])} "
                             f"per hidden activity and the first layer's two products): "
                             f"{f['samples_per_second']:,.0f} samples/s, at most "
                             f"{f['ceiling_over_autograd']:.1f}x over autograd for a step built from them")
            if "float64" in peak:
                share = 100 * s["lm_iteration"]["gflops"] / peak["float64"]
                lines.append("      GFLOP/s: " + ", ".join(f"{label} step {r['gflops']:.2f}"
                                                           for label, r in fast if "gflops" in r)
                             + f", LM iteration {s['lm_iteration']['gflops']:.2f}; float64 matmul "
                             f"peak {peak['float64']:.1f} ({share:.0f}% for LM)")
    if "T3" in results:
        lines += ["", "T3 (784-128-10 x 10 students, 10,000 rows): seconds per epoch (minibatch 512) "
                      "and per iteration (all students)"]
        for method, r in results["T3"].items():
            if "error" in r:
                lines.append(f"  {method:9s} ERROR {r['error']}")
                continue
            lines.append(f"  {method:9s} epoch {_fmt(r.get('seconds_per_epoch'), '.3f'):>7s} s, "
                         f"iteration {r['seconds_per_iteration']:.3f} s ({r['iteration']}, "
                         f"{r['dtype']}), peak {r['peak_rss_mb']:.0f} MB")
    if peak:
        lines += ["", f"matmul peak: float64 {peak.get('float64', float('nan')):.1f} GFLOP/s, "
                      f"float32 {peak.get('float32', float('nan')):.1f} GFLOP/s"]
    return "\n".join(lines), ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="budget 20 s instead of 600 s")
    parser.add_argument("--problems", default="T1,T1tanh,T2,T3")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of steps,recipe,lbfgs,sklearn,eandc,eandc_e2e,"
                             "autograd, each optionally as PROBLEM:METHOD (default: all that apply)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per baseline run (default 600, 20 with --quick)")
    parser.add_argument("--note", default="", help="a remark stored in the JSON (e.g. machine load)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per subprocess")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--report", metavar="JSON",
                        help="print the table of a stored run (benchmarks/results/*.json) again")
    args = parser.parse_args()
    if args.report:
        record = json.loads(Path(args.report).read_text())
        args.threads, args.device = record["threads"], record["device"]
        print(report(record["results"], args, record["budget_seconds"])[0])
        return
    budget = args.budget if args.budget is not None else (20.0 if args.quick else 600.0)
    if args.worker:
        args.budget = budget
        worker(args)
        return
    from tqdm.auto import tqdm

    wanted = set(args.methods.split(",")) if args.methods else None
    tasks = [(None, "peak")]
    for problem in args.problems.split(","):
        if problem not in PROBLEMS:
            parser.error(f"unknown problem {problem!r}; choose from {', '.join(PROBLEMS)}")
        tasks += [(problem, m) for m in METHODS[problem]
                  if wanted is None or m in wanted or f"{problem}:{m}" in wanted]
    results: dict = {}
    bar = tqdm(tasks, desc="training speed")
    for problem, method in bar:
        bar.set_postfix_str(f"{problem or ''} {method}")
        results.setdefault(problem or "_peak", {})[method] = _launch((problem, method), args, budget)
    text, ratios = report(results, args, budget)
    print(text)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, cwd=ROOT).stdout.strip())
    record = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit,
                  dirty_worktree=dirty, machine=_machine(args.device), threads=args.threads,
                  device=args.device, quick=args.quick, note=args.note, budget_seconds=budget, target=TARGET,
                  seed=args.seed,
                  problems={p: PROBLEMS[p] for p in args.problems.split(",")},
                  results=results, ratios=ratios, table=text)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"training_speed-{stamp}.json"
    out.write_text(json.dumps(record, indent=1, default=float))
    print(f"written {out}")


if __name__ == "__main__":
    main()
