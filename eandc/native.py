"""The compiled CPU kernel of the first-order phase: loss and gradient of all students in one call.

Why it exists: on a CPU, the chunked PyTorch step of :mod:`eandc.fast` is bound by its
element-wise kernels (one pass over memory each: ``sigmoid``, ``softplus``, products, sums) and
by PyTorch's per-operation overhead on small students. ``native.c`` does the whole forward and
backward pass of a student in one sweep over the samples, 64 rows at a time with every
activity in cache, and evaluates the activation (value and derivative from one exponential, one
``log1p`` for g and softplus) with polynomials the compiler vectorises. Threads take whole
students, so the result does not depend on their number. :func:`adam_steps` runs Adam itself
in the kernel as well: each thread takes its students through many steps (gradient, then
torch's update, operation for operation), with no Python and no synchronisation in between.

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc``), for
this machine (``-march=native``), into the per-user cache (``$EANDC_CACHE``, else
``$XDG_CACHE_HOME/eandc`` or ``~/.cache/eandc``) under a name that hashes the source, the
compiler and the processor, and loaded with :mod:`ctypes`: no build step at install time. Where
there is no working compiler, or ``EANDC_NATIVE=0``, :func:`available` is false and callers use
the PyTorch path. The kernel covers float64 tensors on the CPU, the activations of
``ACTIVATION_CODES`` (not GELU: its ``erf`` is left to PyTorch) and layers of up to
``MAX_FAN_IN`` inputs; wider layers (MNIST's 784 pixels) are matrix-product bound and faster
through PyTorch's GEMM.

Tested against autograd through :func:`eandc.mlp.forward` (``tests/test_native.py``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .activations import Activation
from .mlp import Layout
from .storage import user_cache_folder

__all__ = ["available", "unsupported_reason", "loss_and_gradient", "adam_steps", "activate",
           "ACTIVATION_CODES", "MAX_FAN_IN", "library_path"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
# The activation codes of native.c.
ACTIVATION_CODES = {"g": 0, "tanh": 1, "sigmoid": 2, "softplus": 3, "relu": 4, "leaky_relu": 5,
                    "silu": 6}
# Widest layer input the kernel takes: its products are plain loops, even with PyTorch's GEMM at
# 128 inputs and slower beyond (benchmarks/native_fan_in.py; MNIST's 784 pixels go to PyTorch).
MAX_FAN_IN = 128
MAX_LAYERS = 64  # native.c's MAX_LAYERS: weight layers (hidden layers + output)
ENV_SWITCH = "EANDC_NATIVE"
# Tried in turn: without -march=native where it is refused, without threads where OpenMP is missing.
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3", "-fopenmp-simd"])
# -fno-trapping-math lets the compiler evaluate both sides of a select without masks (the
# floating-point flags raised may differ; the results do not): the activations 14% faster.
COMMON_FLAGS = ["-std=gnu11", "-fno-trapping-math", "-fPIC", "-shared"]

_library: ctypes.CDLL | None = None
_failure: str | None = None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _processor() -> str:
    """What -march=native compiles for: the CPU's model and flags where Linux tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def library_path(compiler: str, flags: list[str]) -> Path:
    """Where the library compiled by ``compiler`` with ``flags`` for this processor is cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version,
                                    " ".join([*flags, *COMMON_FLAGS]), _processor()]).encode()
                         ).hexdigest()[:16]
    return user_cache_folder("native") / f"eandc-native-{key}.so"


def _compile(compiler: str) -> Path:
    errors = []
    for flags in FLAG_SETS:
        path = library_path(compiler, flags)
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        command = [compiler, *flags, *COMMON_FLAGS, "-o", tmp, str(SOURCE), "-lm"]
        log.info("compiling the native kernel: %s", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(tmp, path)  # atomic: a concurrent compile leaves one whole library
            return path
        os.unlink(tmp)
        errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"])
    raise RuntimeError(f"{compiler} failed: {errors}")


def _load() -> ctypes.CDLL | None:
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        _failure = f"switched off by {ENV_SWITCH}"
        return None
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')!r} not found; set $CC)")
        lib = ctypes.CDLL(str(_compile(compiler)))
    except (OSError, RuntimeError) as error:
        _failure = str(error)
        log.warning("native kernel unavailable, using the PyTorch path: %s", error)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64  # tensors are passed by their data_ptr()
    lib.eandc_loss_and_gradient.restype = ctypes.c_int
    lib.eandc_loss_and_gradient.argtypes = [
        ctypes.c_int, ctypes.c_int, pointer, ctypes.c_int, ctypes.c_int, pointer, size, pointer,
        pointer, size, pointer, pointer, ctypes.c_int]
    lib.eandc_adam.restype = ctypes.c_int
    lib.eandc_adam.argtypes = [
        ctypes.c_int, ctypes.c_int, pointer, ctypes.c_int, ctypes.c_int, pointer, size, pointer,
        pointer, size, pointer, pointer, ctypes.c_double, size, pointer, ctypes.c_double,
        ctypes.c_double, ctypes.c_double, pointer, pointer, pointer, pointer, ctypes.c_int]
    lib.eandc_activate.restype = None
    lib.eandc_activate.argtypes = [ctypes.c_int, pointer, pointer, pointer, size]
    _library = lib
    return lib


def available() -> bool:
    """True when the kernel is compiled and loaded (compiling it on the first call)."""
    return _load() is not None


def unsupported_reason(layout: Layout, activation: Activation, X: torch.Tensor,
                       theta: torch.Tensor | None = None) -> str | None:
    """Why the kernel does not take these students (``theta``, when given) and queries, or
    ``None`` when it does."""
    for name, t in (("queries", X), ("students", theta)):
        if t is None:
            continue
        if t.device.type != "cpu":
            return f"{name} on {t.device}, the kernel runs on the CPU"
        if t.dtype != torch.float64:
            return f"{name} in {t.dtype}, the kernel computes in float64"
    if activation.name not in ACTIVATION_CODES:
        return f"activation {activation.name!r} has no native code"
    if not layout.widths:
        return "no hidden layer"
    if layout.n_layers > MAX_LAYERS:
        return f"{layout.n_layers} weight layers (more than MAX_LAYERS = {MAX_LAYERS})"
    if max(layout.sizes[:-1]) > MAX_FAN_IN:
        return f"a layer with {max(layout.sizes[:-1])} inputs (more than MAX_FAN_IN = {MAX_FAN_IN})"
    if not available():
        return f"the kernel is unavailable ({_failure})"
    return None


@functools.lru_cache(maxsize=64)
def _sizes(layout: Layout):
    return (ctypes.c_int64 * len(layout.sizes))(*layout.sizes)


def _checked(theta: torch.Tensor, layout: Layout, activation: Activation, X: torch.Tensor,
             y: torch.Tensor):
    """``X`` and ``y`` as the kernel takes them, after the checks every entry makes on them and
    on ``theta``."""
    reason = unsupported_reason(layout, activation, X, theta)
    if reason is not None:
        raise ValueError(f"the native kernel does not apply: {reason}")
    if theta.dim() != 2 or theta.shape[1] != layout.size:
        raise ValueError(f"theta must be (students, {layout.size}), got {tuple(theta.shape)}")
    if X.dim() != 2 or X.shape[1] != layout.d_in or y.shape != (X.shape[0], layout.d_out):
        raise ValueError(f"X must be (n, {layout.d_in}) and y (n, {layout.d_out}), got "
                         f"{tuple(X.shape)} and {tuple(y.shape)}")
    return X.contiguous(), y.to(torch.float64).contiguous()


def _raise_for(status: int, layout: Layout) -> None:
    if status == 2:
        raise MemoryError("the native kernel could not allocate its work space")
    if status != 0:
        raise RuntimeError(f"the native kernel refused the layout {layout} (status {status})")


@torch.no_grad()
def loss_and_gradient(theta: torch.Tensor, layout: Layout, activation: Activation, X: torch.Tensor,
                      y: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error of each student ``(N,)`` and its gradient ``(N, P)``, as
    :func:`eandc.fast.loss_and_gradient` returns them; ``threads`` defaults to PyTorch's."""
    X, y = _checked(theta, layout, activation, X, y)
    theta = theta.detach().contiguous()
    losses = torch.empty(theta.shape[0], dtype=torch.float64)
    grad = torch.empty_like(theta)
    _raise_for(_library.eandc_loss_and_gradient(
        theta.shape[0], layout.n_layers, _sizes(layout), int(layout.skip),
        ACTIVATION_CODES[activation.name], theta.data_ptr(), layout.size, X.data_ptr(), y.data_ptr(),
        X.shape[0], losses.data_ptr(), grad.data_ptr(), threads or torch.get_num_threads()),
        layout)
    return losses, grad


@torch.no_grad()
def adam_steps(theta: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, taken: int,
               layout: Layout, activation: Activation, X: torch.Tensor, y: torch.Tensor,
               lrs: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               rows: torch.Tensor | None = None, bounds: torch.Tensor | None = None,
               frozen: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """``len(lrs)`` steps of ``torch.optim.Adam`` on every student's own loss, in place on
    ``theta`` ``(N, P)`` and its moments ``exp_avg``, ``exp_avg_sq`` (contiguous float64), after
    ``taken`` earlier steps; the update is torch's, operation for operation (the moments bit for
    bit; the parameters may differ in the last bit, as torch's vectorised ``sqrt`` rounds).

    Step ``k`` has learning rate ``lrs[k]`` and the rows ``rows[bounds[k]:bounds[k + 1]]`` of
    ``X``, ``y`` (all of them when ``rows`` is ``None``); ``frozen`` ``(N, P)`` bool: parameters
    whose gradient is taken as zero. Each thread takes whole students through all the steps, so
    there is no Python and no synchronisation between steps. Returns each student's loss at the
    last step (before its update)."""
    X, y = _checked(theta, layout, activation, X, y)
    tensors = [theta, exp_avg, exp_avg_sq] + ([frozen] if frozen is not None else [])
    if any(t.shape != theta.shape or not t.is_contiguous() or t.device.type != "cpu"
           for t in tensors):
        raise ValueError("theta, its moments and frozen must be contiguous CPU tensors of one shape")
    if exp_avg.dtype != torch.float64 or exp_avg_sq.dtype != torch.float64:
        raise ValueError("the moments must be float64")
    if frozen is not None and frozen.dtype != torch.bool:
        raise ValueError(f"frozen must be a bool mask, got {frozen.dtype}")
    lrs = torch.as_tensor(lrs, dtype=torch.float64).contiguous()
    steps = lrs.numel()
    if rows is not None:
        rows, bounds = rows.to(torch.int64).contiguous(), bounds.to(torch.int64).contiguous()
        if bounds.shape != (steps + 1,) or bounds[0] != 0 or bounds[-1] != rows.numel() or \
                bool((bounds.diff() < 1).any()):
            raise ValueError("bounds must rise from 0 to len(rows), each step taking a row or more")
        if rows.numel() and not bool(((rows >= 0) & (rows < X.shape[0])).all()):
            raise ValueError(f"rows must index the {X.shape[0]} rows of X")
    losses = torch.empty(theta.shape[0], dtype=torch.float64)
    if steps == 0:
        return losses.fill_(float("nan"))
    _raise_for(_library.eandc_adam(
        theta.shape[0], layout.n_layers, _sizes(layout), int(layout.skip),
        ACTIVATION_CODES[activation.name], theta.data_ptr(), layout.size, X.data_ptr(), y.data_ptr(),
        X.shape[0], exp_avg.data_ptr(), exp_avg_sq.data_ptr(), float(taken), steps, lrs.data_ptr(),
        float(betas[0]), float(betas[1]), float(eps), rows.data_ptr() if rows is not None else None,
        bounds.data_ptr() if rows is not None else None,
        frozen.data_ptr() if frozen is not None else None, losses.data_ptr(),
        threads or torch.get_num_threads()), layout)
    return losses


def activate(activation: Activation, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation's value and derivative on ``z`` (float64, CPU) as the kernel computes them."""
    if not available():
        raise RuntimeError(f"the native kernel is unavailable ({_failure})")
    z = z.detach().to(torch.float64).contiguous()
    value, slope = torch.empty_like(z), torch.empty_like(z)
    _library.eandc_activate(ACTIVATION_CODES[activation.name], z.data_ptr(), value.data_ptr(),
                            slope.data_ptr(), z.numel())
    return value, slope
