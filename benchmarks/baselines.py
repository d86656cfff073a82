"""Baseline student trainers that benchmarks/training_speed.py compares eandc against.

* :func:`train_recipe`: the published recipe (Martinelli et al., the authors' code): N students
  in one tensor per layer, weights ``[fan_in, fan_out, N]`` contracted with ``einsum``, float32,
  Adam lr 1e-3 on minibatches of 512 shuffled every epoch, ReduceLROnPlateau (factor 1/sqrt(10),
  patience 200, cooldown 100, min_lr 1e-7) stepped on the epoch loss; training ends when the
  learning rate reaches min_lr (as in the authors' loop) or the time budget is spent.
* :func:`train_lbfgs_loop`: ``torch.optim.LBFGS`` (strong Wolfe line search, float64, full
  batch), one student after the other, each with ``budget / N`` seconds.
* :func:`train_sklearn`: scikit-learn ``MLPRegressor(solver="lbfgs")``, one student after the
  other (its activations: tanh, ReLU, logistic, identity), with scikit-learn's own initialisation.

Every trainer starts from the same students as eandc where it can (the recipe and the LBFGS loop
take eandc's initial parameters; scikit-learn initialises its own) and returns a dict with the
final relative losses (MSE / variance of the targets, in float64), a trace of the loss that 90%
of the students are below, and the seconds until that loss first reached ``target`` (None if
never). Loss evaluations are not counted in the training time.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from eandc.mlp import Layout, forward

log = logging.getLogger(__name__)

QUANTILE = 0.9  # "90% of the students are below"


def quantile_loss(losses) -> float:
    """The relative loss that a fraction QUANTILE of the students are at or below."""
    losses = np.sort(np.asarray(losses, dtype=float))
    return float(losses[max(0, math.ceil(QUANTILE * len(losses)) - 1)])


def relative_losses(theta: torch.Tensor, layout: Layout, activation, X: torch.Tensor,
                    y: torch.Tensor) -> np.ndarray:
    """Float64 relative losses of the students ``theta`` ``(N, P)`` on (X, y)."""
    with torch.no_grad():
        theta, X, y = theta.to(torch.float64), X.to(torch.float64), y.to(torch.float64)
        mse = (forward(theta, layout, activation, X) - y).square().mean(dim=(1, 2))
        return (mse / y.var(dim=0, unbiased=False).mean()).cpu().numpy()


class Clock:
    """Training seconds, with evaluations excluded (``with clock.paused(): ...``)."""

    def __init__(self):
        self.start, self.excluded = time.perf_counter(), 0.0

    def __call__(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def paused(self):
        clock = self

        class _Paused:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.excluded += time.perf_counter() - self.t0

        return _Paused()


# Plain activations for the recipe: the value only, as the authors' modules compute it.
PLAIN = {
    "g": lambda z: torch.sigmoid(4 * z) + torch.nn.functional.softplus(z),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
    "relu": torch.relu,
}


def _recipe_parameters(theta: torch.Tensor, layout: Layout):
    """eandc flat students ``(N, P)`` as the recipe's ``[fan_in, fan_out, N]`` float32 tensors."""
    weights, biases, _ = layout.unflatten(theta.detach())
    ws = [torch.nn.Parameter(w.permute(2, 1, 0).to(torch.float32).contiguous()) for w in weights]
    bs = [torch.nn.Parameter(b.T.to(torch.float32).contiguous()) for b in biases]
    return ws, bs


def _recipe_theta(ws, bs, layout: Layout) -> torch.Tensor:
    weights = [w.detach().permute(2, 1, 0).to(torch.float64) for w in ws]
    biases = [b.detach().T.to(torch.float64) for b in bs]
    return layout.flatten(weights, biases)


def recipe_forward(ws, bs, act, x):
    """The authors' batched forward: ``bi,ihn->bhn`` for the first layer, ``bin,ihn->bhn`` after."""
    a = act(torch.einsum("bi,ihn->bhn", x, ws[0]) + bs[0])
    for l in range(1, len(ws)):
        z = torch.einsum("bin,ihn->bhn", a, ws[l]) + bs[l]
        a = z if l == len(ws) - 1 else act(z)
    return a


def recipe_losses(out, y):
    """Each student's MSE ``(N,)`` (the authors' ``individual_losses``)."""
    return (out - y.unsqueeze(2)).square().mean(dim=(0, 1))


def train_recipe(theta0: torch.Tensor, layout: Layout, activation, X: torch.Tensor, y: torch.Tensor,
                 budget_s: float, target: float = 1e-10, batch_size: int = 512, seed: int = 0,
                 eval_every_s: float = 1.0, max_epochs: int | None = None) -> dict:
    """The published recipe (see the module doc) from the students ``theta0`` (float64, eandc layout)."""
    if layout.skip:
        raise ValueError("the recipe has no input-to-output linear term")
    act = PLAIN.get(activation.name, activation)
    ws, bs = _recipe_parameters(theta0, layout)
    X32, y32 = X.to(torch.float32), y.to(torch.float32)
    optimizer = torch.optim.Adam([*ws, *bs], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=1 / math.sqrt(10), patience=200, cooldown=100, min_lr=1e-7)
    gen = torch.Generator().manual_seed(seed)
    trace, reached, epochs, stop = [], None, 0, "budget"
    clock, next_eval = Clock(), 0.0
    n = X.shape[0]
    while True:
        order = torch.randperm(n, generator=gen).to(X.device)
        epoch_loss, batches = 0.0, 0
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = recipe_losses(recipe_forward(ws, bs, act, X32[rows]), y32[rows]).sum()
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item()
            batches += 1
        epochs += 1
        lr = optimizer.param_groups[0]["lr"]
        if lr < scheduler.min_lrs[0] + scheduler.eps:
            stop = "min_lr"
        else:
            scheduler.step(epoch_loss / batches)
        seconds = clock()
        done = stop != "budget" or seconds >= budget_s or bool(max_epochs and epochs >= max_epochs)
        if seconds >= next_eval or done:
            with clock.paused():
                rel = relative_losses(_recipe_theta(ws, bs, layout), layout, activation, X, y)
                q = quantile_loss(rel)
                trace.append((round(seconds, 3), q))
                if reached is None and q <= target:
                    reached, stop, done = seconds, "target", True
            next_eval = seconds + eval_every_s
        if done:
            break
    return dict(relative_losses=rel.tolist(), quantile_loss=q, seconds_to_target=reached,
                seconds=clock(), epochs=epochs, final_lr=optimizer.param_groups[0]["lr"],
                stop=stop, trace=trace)


def train_lbfgs_loop(theta0: torch.Tensor, layout: Layout, activation, X: torch.Tensor,
                     y: torch.Tensor, budget_s: float, target: float = 1e-10,
                     iterations_per_step: int = 5, stall_steps: int = 20) -> dict:
    """``torch.optim.LBFGS`` on one student at a time (float64, full batch, strong Wolfe).

    Each student gets ``budget_s / N`` seconds; it stops earlier at the target, or when its
    loss has not decreased over ``stall_steps`` optimizer steps (of ``iterations_per_step``
    LBFGS iterations each).
    """
    n_students = theta0.shape[0]
    var = float(y.var(dim=0, unbiased=False).mean())
    clock = Clock()
    finished, losses, reached, iterations, stops = [], [], None, [], []
    for s in range(n_students):
        p = theta0[s].detach().clone().to(torch.float64).requires_grad_(True)
        optimizer = torch.optim.LBFGS([p], lr=1, max_iter=iterations_per_step, history_size=100,
                                      tolerance_grad=0.0, tolerance_change=0.0,
                                      line_search_fn="strong_wolfe")

        def closure(p=p, optimizer=optimizer):
            optimizer.zero_grad()
            loss = (forward(p, layout, activation, X) - y).square().mean()
            loss.backward()
            return loss

        started, best, best_step, step = clock(), float("inf"), 0, 0
        while True:
            optimizer.step(closure)
            step += 1
            with clock.paused(), torch.no_grad():
                rel = float((forward(p, layout, activation, X) - y).square().mean()) / var
            if rel < best * (1 - 1e-6):
                best, best_step = rel, step
            if rel <= target:
                stops.append("target")
            elif not math.isfinite(rel) or step - best_step >= stall_steps:
                stops.append("stalled")
            elif clock() - started >= budget_s / n_students:
                stops.append("budget")
            else:
                continue
            break
        losses.append(rel)
        iterations.append(optimizer.state[p].get("n_iter", 0))
        finished.append(round(clock(), 3))
        if reached is None and sum(v <= target for v in losses) >= math.ceil(QUANTILE * n_students):
            reached = clock()
    return dict(relative_losses=losses, quantile_loss=quantile_loss(losses),
                seconds_to_target=reached, seconds=clock(), finished_at=finished,
                iterations=iterations, stop=_stops(stops))


def _stops(stops) -> str:
    """``"8 target, 2 budget"``: why the students of a one-at-a-time loop stopped."""
    return ", ".join(f"{stops.count(k)} {k}" for k in dict.fromkeys(stops))


def train_sklearn(X: np.ndarray, y: np.ndarray, n_students: int, widths, activation: str,
                  budget_s: float, target: float = 1e-10, seed: int = 0,
                  iterations_per_fit: int = 2000) -> dict:
    """scikit-learn ``MLPRegressor(solver="lbfgs")``, one student at a time, ``budget_s / N``
    seconds each: ``fit`` runs ``iterations_per_fit`` iterations at most and is called again
    (``warm_start``) while the student is above the target, within its time, and L-BFGS-B
    stopped on its iteration limit rather than its own convergence test."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    var = float(np.var(y, axis=0).mean())
    target_1d = y.ravel() if y.shape[1] == 1 else y
    clock = Clock()
    losses, finished, iterations, reached, stops = [], [], [], None, []
    for s in range(n_students):
        model = MLPRegressor(hidden_layer_sizes=tuple(widths), activation=activation, solver="lbfgs",
                             alpha=0.0, tol=0.0, max_iter=iterations_per_fit,
                             max_fun=10 * iterations_per_fit, random_state=seed + s, warm_start=True)
        started, total = clock(), 0
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(X, target_1d)
            total += model.n_iter_
            with clock.paused():
                pred = model.predict(X).reshape(y.shape)
                rel = float(np.mean((pred - y) ** 2)) / var
            if rel <= target:
                stops.append("target")
            elif model.n_iter_ < iterations_per_fit:
                stops.append("converged")  # L-BFGS-B's own test (ftol, gtol)
            elif clock() - started >= budget_s / n_students:
                stops.append("budget")
            else:
                continue
            break
        losses.append(rel)
        iterations.append(total)
        finished.append(round(clock(), 3))
        if reached is None and sum(v <= target for v in losses) >= math.ceil(QUANTILE * n_students):
            reached = clock()
    return dict(relative_losses=losses, quantile_loss=quantile_loss(losses),
                seconds_to_target=reached, seconds=clock(), finished_at=finished,
                iterations=iterations, stop=_stops(stops))
