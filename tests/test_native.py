"""The compiled CPU kernel (eandc.native): activations against 300-bit arithmetic, losses and
gradients against autograd, bitwise independence of the thread count, where it applies and
what happens where it does not (no compiler, switched off)."""

import os
import subprocess
import sys

import mpmath
import pytest
import torch
from conftest import random_students

from eandc import native
from eandc.activations import ACTIVATIONS
from eandc.fast import autograd_loss_and_gradient, chosen_backend, loss_and_gradient
from eandc.mlp import Layout
from eandc.training import adam_phase

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the kernel is off")

mpmath.mp.prec = 300
ULP = 2.0 ** -52


def _exact(name, x):
    """Value and derivative in 300-bit arithmetic, written without cancellation."""
    x = mpmath.mpf(x)

    def sig(u):
        return 1 / (1 + mpmath.exp(-u))

    def softplus(u):
        return mpmath.log1p(mpmath.exp(u))

    def sig_slope(u):  # sigmoid(u) (1 - sigmoid(u))
        return mpmath.exp(-abs(u)) / (1 + mpmath.exp(-abs(u))) ** 2

    if name == "g":
        return sig(4 * x) + softplus(x), 4 * sig_slope(4 * x) + sig(x)
    if name == "tanh":
        return mpmath.tanh(x), mpmath.sech(x) ** 2
    if name == "sigmoid":
        return sig(x), sig_slope(x)
    if name == "softplus":
        return softplus(x), sig(x)
    if name == "silu":
        return x * sig(x), sig(x) + x * sig_slope(x)
    raise KeyError(name)


def _points():
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(600, generator=gen, dtype=torch.float64) * 4,
                      torch.randn(200, generator=gen, dtype=torch.float64) * 1e-4,
                      torch.randn(200, generator=gen, dtype=torch.float64) * 60,
                      torch.linspace(-2, 2, 101, dtype=torch.float64),
                      torch.tensor([0.0, -0.0, 1e-300, -1e-300, 0.881373587019543, 40.0, -40.0,
                                    177.0, -177.0, 700.0, -700.0], dtype=torch.float64)])


@pytest.mark.parametrize("name", ["g", "tanh", "sigmoid", "softplus", "silu"])
def test_smooth_activations_are_within_a_few_ulps(name):
    z = _points()
    value, slope = native.activate(ACTIVATIONS[name], z)
    worst = [0.0, 0.0]
    for x, got in zip(z.tolist(), zip(value.tolist(), slope.tolist())):
        for k, exact in enumerate(_exact(name, x)):
            if abs(exact) < 1e-290:  # exp(x) is taken as 0 below x = -708
                assert abs(got[k]) < 1e-290
                continue
            error = float(abs(got[k] - exact))
            if name == "silu" and k == 1:  # its slope crosses zero at -1.28: absolute there
                error /= max(abs(float(exact)), 1.0)
            else:
                error /= abs(float(exact))
            worst[k] = max(worst[k], error / ULP)
    assert worst[0] <= 8 and worst[1] <= 8, worst


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_piecewise_linear_activations_are_exact(name):
    z = torch.cat([_points(), torch.tensor([0.0, -0.0], dtype=torch.float64)])
    value, slope = native.activate(ACTIVATIONS[name], z)
    ref_value, ref_slope = ACTIVATIONS[name].value_and_derivative(z)
    assert torch.equal(value, ref_value) and torch.equal(slope, ref_slope)


def test_nan_and_infinities_as_the_reference_has_them():
    z = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    for name in native.ACTIVATION_CODES:
        got = native.activate(ACTIVATIONS[name], z)
        ref = ACTIVATIONS[name].value_and_derivative(z)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
    assert native.activate(ACTIVATIONS["g"], z)[0][0].isnan()  # a diverging student shows


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("widths", [(5,), (6, 4), (3, 7, 2)], ids=["depth1", "depth2", "depth3"])
@pytest.mark.parametrize("activation", list(native.ACTIVATION_CODES))
def test_gradient_matches_autograd(activation, widths, skip):
    # 257 rows: four whole chunks of 64 and one row in a fifth
    theta, layout, act, X, y = random_students(activation, widths, skip)
    ref_loss, ref_grad = autograd_loss_and_gradient(theta, layout, act, X, y)
    loss, grad = native.loss_and_gradient(theta, layout, act, X, y)
    assert loss.dtype == grad.dtype == torch.float64 and grad.shape == theta.shape
    assert float(((loss - ref_loss).abs() / ref_loss).max()) < 1e-12
    for s in range(theta.shape[0]):  # every student's own gradient
        assert float((grad[s] - ref_grad[s]).norm() / ref_grad[s].norm()) < 1e-12


@pytest.mark.parametrize("n", [1, 63, 64, 65])
def test_sample_counts_around_a_chunk(n):
    theta, layout, act, X, y = random_students("g", (4,), False, n=n, d_out=3)
    ref_loss, ref_grad = autograd_loss_and_gradient(theta, layout, act, X, y)
    loss, grad = native.loss_and_gradient(theta, layout, act, X, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-11, atol=1e-14)


def test_threads_do_not_change_a_bit():
    theta, layout, act, X, y = random_students("g", (8, 5), True, n_students=7, n=300)
    one = native.loss_and_gradient(theta, layout, act, X, y, threads=1)
    for threads in (2, 3, 16):
        other = native.loss_and_gradient(theta, layout, act, X, y, threads=threads)
        assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1])
    # a student's result does not depend on the other students in the batch
    alone = native.loss_and_gradient(theta[3:4], layout, act, X, y)
    assert torch.equal(alone[1][0], one[1][3])


def test_inputs_are_left_alone_and_views_accepted():
    theta, layout, act, X, y = random_students("tanh", (5,), False, n=100)
    wide = torch.cat([X, X], dim=1)[:, :3]  # a non-contiguous view of the same queries
    before = theta.clone()
    loss, grad = native.loss_and_gradient(theta.requires_grad_(True), layout, act, wide, y)
    assert torch.equal(theta.detach(), before) and not grad.requires_grad
    ref = native.loss_and_gradient(before, layout, act, X, y)
    assert torch.equal(grad, ref[1])


def test_where_the_kernel_applies():
    theta, layout, act, X, y = random_students("g", (5,), False)
    assert chosen_backend(layout, act, X) == "native"
    assert chosen_backend(layout, act, X, "torch") == "torch"
    assert chosen_backend(layout, act, X, compiled=True) == "torch"
    cases = [(layout, ACTIVATIONS["gelu"], X, None, "gelu"),
             (layout, act, X.float(), None, "float32"),
             (layout, act, X, theta.float(), "students in torch.float32"),
             (Layout(native.MAX_FAN_IN + 1, (3,), 1), act,
              torch.zeros(4, native.MAX_FAN_IN + 1, dtype=torch.float64), None, "MAX_FAN_IN")]
    for lay, activation, queries, students, reason in cases:
        assert reason in native.unsupported_reason(lay, activation, queries, students)
        assert chosen_backend(lay, activation, queries, theta=students) == "torch"
        with pytest.raises(ValueError, match="native kernel does not apply"):
            chosen_backend(lay, activation, queries, "native", theta=students)
    with pytest.raises(ValueError, match="backend"):
        chosen_backend(layout, act, X, "cuda")
    with pytest.raises(ValueError, match="theta must be"):
        native.loss_and_gradient(theta[:, :-1], layout, act, X, y)
    with pytest.raises(ValueError, match="X must be"):
        native.loss_and_gradient(theta, layout, act, X[:, :2], y)
    # gelu through auto: the torch path, still right
    gelu = ACTIVATIONS["gelu"]
    ref = autograd_loss_and_gradient(theta, layout, gelu, X, y)[1]
    assert float((loss_and_gradient(theta, layout, gelu, X, y)[1] - ref).norm() / ref.norm()) < 1e-12


def test_adam_phase_native_follows_autograd_and_refuses_what_it_cannot_run():
    theta, layout, act, X, y = random_students("softplus", (6, 4), True, n=150)
    ref = adam_phase(theta, layout, act, X, y, 30, gradient="autograd")
    got = adam_phase(theta, layout, act, X, y, 30, gradient="native")
    assert float((got - ref).norm() / (ref - theta).norm()) < 1e-9
    with pytest.raises(ValueError, match="native kernel does not apply"):
        adam_phase(theta, layout, ACTIVATIONS["gelu"], X, y, 1, gradient="native")


def test_the_compiled_adam_loop_takes_torch_adams_steps():
    """``adam_steps`` against ``torch.optim.Adam`` fed the kernel's gradients step by step: each
    step its own rate, minibatch rows and frozen entries; two calls (``taken``) make one run."""
    theta, layout, act, X, y = random_students("g", (6, 4), True, n=150)
    gen = torch.Generator().manual_seed(3)
    steps = 25
    lrs = 1e-2 * 0.8 ** torch.arange(steps, dtype=torch.float64)
    sizes = torch.randint(1, 150, (steps,), generator=gen)
    rows = torch.cat([torch.randperm(150, generator=gen)[:k] for k in sizes.tolist()])
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    frozen = torch.rand(theta.shape, generator=gen) < 0.2
    own = theta.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([own], lr=1.0)
    for k in range(steps):
        batch = rows[bounds[k]:bounds[k + 1]]
        loss, own.grad = native.loss_and_gradient(own, layout, act, X[batch], y[batch])
        own.grad[frozen] = 0.0
        optimizer.param_groups[0]["lr"] = float(lrs[k])
        optimizer.step()
    p, m, v = theta.clone(), torch.zeros_like(theta), torch.zeros_like(theta)
    native.adam_steps(p, m, v, 0, layout, act, X, y, lrs[:10], rows=rows[:bounds[10]],
                      bounds=bounds[:11], frozen=frozen)
    last = native.adam_steps(p, m, v, 10, layout, act, X, y, lrs[10:], rows=rows[bounds[10]:],
                             bounds=bounds[10:] - bounds[10], frozen=frozen)
    state = optimizer.state[own]
    for got, ref in ((p - theta, own.detach() - theta), (m, state["exp_avg"]),
                     (v, state["exp_avg_sq"])):
        assert float((got - ref).norm() / ref.norm()) < 1e-12
    assert torch.equal(p[frozen], theta[frozen]) and not torch.equal(p, theta)
    torch.testing.assert_close(last, loss, rtol=1e-12, atol=0)
    full = theta.clone()
    native.adam_steps(full, torch.zeros_like(theta), torch.zeros_like(theta), 0, layout, act, X, y,
                      lrs[:3])
    assert not torch.equal(full, theta)
    bad_bounds = bounds[:11].clone()
    bad_bounds[3] = bad_bounds[2]  # a step without rows
    for kwargs, match in ((dict(rows=rows[:bounds[10]], bounds=bad_bounds), "bounds"),
                          (dict(rows=rows[:bounds[10]] + 150, bounds=bounds[:11]), "rows"),
                          (dict(frozen=frozen.double()), "frozen"),
                          (dict(frozen=frozen[:, :-1]), "one shape")):
        with pytest.raises(ValueError, match=match):
            native.adam_steps(theta.clone(), torch.zeros_like(theta), torch.zeros_like(theta), 0,
                              layout, act, X, y, lrs[:10], **kwargs)
    with pytest.raises(ValueError, match="one shape"):
        native.adam_steps(theta.t().contiguous().t(), torch.zeros_like(theta),
                          torch.zeros_like(theta), 0, layout, act, X, y, lrs[:1])


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@pytest.mark.parametrize("env", [{"EANDC_NATIVE": "0"}, {"CC": "/nonexistent/cc"}],
                         ids=["switched-off", "no-compiler"])
def test_without_the_kernel_training_takes_the_torch_path(env, tmp_path):
    code = ("import logging, torch, eandc\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            "from eandc import native\n"
            "from eandc.fast import chosen_backend\n"
            "from eandc.mlp import Layout\n"
            "print('available', native.available())\n"
            "X = torch.zeros(5, 2, dtype=torch.float64)\n"
            "print('backend', chosen_backend(Layout(2, (3,), 1), eandc.get_activation('g'), X))\n")
    done = _python(code, XDG_CACHE_HOME=str(tmp_path), **env)  # an empty cache: nothing compiled
    assert done.returncode == 0, done.stderr
    assert "available False" in done.stdout and "backend torch" in done.stdout
    if "CC" in env:
        assert "native kernel unavailable" in done.stderr and "/nonexistent/cc" in done.stderr


def test_the_library_is_compiled_once_into_the_cache(tmp_path):
    code = "from eandc import native; print(native.available())"
    first = _python(code, XDG_CACHE_HOME=str(tmp_path))
    assert first.stdout.strip() == "True", first.stderr
    built = list((tmp_path / "eandc" / "native").glob("eandc-native-*.so"))
    assert len(built) == 1 and not list((tmp_path / "eandc" / "native").glob(".*tmp"))
    stamp = built[0].stat().st_mtime_ns
    second = _python(code, XDG_CACHE_HOME=str(tmp_path))
    assert second.stdout.strip() == "True" and built[0].stat().st_mtime_ns == stamp
