"""Teachers and queries: random teacher networks, input generators, and querying a black box.

Random-teacher recipe (:func:`random_teacher`), fixed so that results can be re-run:

* first hidden layer and output layer: every weight and bias i.i.d. ``N(0, 1)``, as in the
  random teachers of the authors' lab (MLPGradientFlow.jl: ``W1 ~ N(0, 1)`` of size
  ``k x (d_in + 1)``, ``W2 ~ N(0, 1)``); a shallow teacher is exactly that;
* deeper hidden layers see their input the way the first layer sees standard Gaussian queries:
  weights and biases ``V, c ~ N(0, 1)`` act on the previous layer's activity *standardised*
  (mean 0, variance 1 per neuron, measured on ``REFERENCE_INPUTS`` standard Gaussian inputs of
  a fixed generator), i.e. ``W = V / std`` and ``b = c - W @ mean``;
* no linear term; the draws use ``numpy.random.default_rng(seed)`` layer by layer, weights
  before biases.

Why standardise: hidden activities are far from unit-variance, zero-mean inputs (``g`` is
positive, with means of order 1). With raw ``N(0, 1)`` weights, a deeper neuron's
pre-activation has an offset of several units next to a spread of about one, so it works in
g's exponential tail (where bias and outgoing weight trade off) or its nearly linear range;
with ``N(0, 1 / fan_in)`` weights, offsets dominate even more. Either way the queries barely
determine such neurons, and no method can identify them. Standardising puts every hidden
neuron in the same, strongly nonlinear regime as a first-layer neuron.

The teacher is any callable: an :class:`~eandc.MLP`, a ``torch.nn.Module``, or a plain function
of numpy arrays or of tensors. :func:`query` calls it in chunks and returns float64 outputs of
shape ``(n, d_out)``, refusing outputs that are not finite or not of one row per input.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from .activations import get_activation
from .mlp import MLP

__all__ = ["random_teacher", "REFERENCE_INPUTS", "gaussian_inputs", "uniform_inputs", "query", "check_inputs"]

log = logging.getLogger(__name__)

REFERENCE_INPUTS = 10_000  # standard Gaussian inputs on which deeper layers are standardised


def random_teacher(d_in: int, widths, d_out: int = 1, activation: str = "g", seed: int = 0) -> MLP:
    """A random teacher MLP ``d_in -> widths -> d_out`` drawn by the recipe in this module's doc."""
    if isinstance(widths, (int, np.integer)):
        widths = [int(widths)]
    sizes = [d_in, *widths, d_out]
    if any(not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
        raise ValueError(f"layer sizes must be positive integers, got {sizes}")
    act = get_activation(activation)
    rng = np.random.default_rng(seed)
    reference = np.random.default_rng(0).normal(size=(REFERENCE_INPUTS, d_in))
    weights, biases = [], []
    for l, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w, b = rng.normal(0.0, 1.0, size=(fan_out, fan_in)), rng.normal(0.0, 1.0, size=fan_out)
        if 0 < l < len(widths):
            mean, std = reference.mean(0), reference.std(0)
            if (std == 0).any():
                raise ValueError(f"hidden layer {l} of this teacher has a constant neuron on "
                                 "Gaussian inputs; draw another seed")
            w = w / std
            b = b - w @ mean
        weights.append(w)
        biases.append(b)
        if l < len(widths):
            reference = act(torch.from_numpy(reference @ w.T + b)).numpy()
    return MLP(weights, biases, activation)


def gaussian_inputs(n: int, d_in: int, seed: int = 0, std: float = 1.0) -> np.ndarray:
    """``n`` inputs with i.i.d. ``N(0, std^2)`` coordinates, float64, shape ``(n, d_in)``."""
    _check_counts(n, d_in)
    return np.random.default_rng(seed).normal(0.0, std, size=(n, d_in))


def uniform_inputs(n: int, d_in: int, seed: int = 0, low: float = -np.sqrt(3), high: float = np.sqrt(3)):
    """``n`` inputs uniform in ``[low, high]^d_in`` (default: unit variance), float64."""
    _check_counts(n, d_in)
    if not low < high:
        raise ValueError(f"need low < high, got [{low}, {high}]")
    return np.random.default_rng(seed).uniform(low, high, size=(n, d_in))


def _check_counts(n, d_in):
    if int(n) != n or n < 1 or int(d_in) != d_in or d_in < 1:
        raise ValueError(f"n and d_in must be positive integers, got n={n}, d_in={d_in}")


def check_inputs(X, name: str = "queries") -> torch.Tensor:
    """``X`` as a float64 tensor of shape ``(n, d)``; errors name what is wrong."""
    if isinstance(X, torch.Tensor):
        tensor = X.detach()
    else:
        array = np.asarray(X)
        if array.dtype == object or not np.issubdtype(array.dtype, np.number) or \
                np.issubdtype(array.dtype, np.complexfloating):
            raise TypeError(f"{name} must be a real numeric array, got dtype {array.dtype}")
        tensor = torch.from_numpy(np.array(array, dtype=np.float64))
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got dtype {tensor.dtype}")
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (n, d), got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")
    tensor = tensor.to(torch.float64)
    bad = ~torch.isfinite(tensor)
    if bad.any():
        rows = torch.nonzero(bad.any(dim=1)).flatten()
        raise ValueError(f"{name} contain NaN or inf in {len(rows)} row(s), first at row {int(rows[0])}")
    return tensor


def _call_numpy(fn, X: torch.Tensor):
    return fn(X.cpu().numpy())


def _call_torch(fn, X: torch.Tensor):
    with torch.no_grad():
        return fn(X)


def query(teacher, X, chunk_size: int = 65536, input_type: str = "auto"):
    """Outputs of ``teacher`` on ``X`` as float64, shape ``(n, d_out)``, computed in chunks.

    ``teacher`` may be an :class:`~eandc.MLP`, a ``torch.nn.Module`` (queried on a float64 copy),
    or a function. ``input_type`` says what a function takes: ``"numpy"``, ``"torch"``, or
    ``"auto"`` (try numpy arrays, fall back to tensors if that raises a ``TypeError``).
    Returns a numpy array when ``X`` is one, else a tensor.
    """
    was_numpy = not isinstance(X, torch.Tensor)
    X = check_inputs(X)
    if input_type not in ("auto", "numpy", "torch"):
        raise ValueError(f"input_type must be 'auto', 'numpy' or 'torch', got {input_type!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if isinstance(teacher, MLP):
        call = _call_torch
        X = X.to(teacher.device)
    elif isinstance(teacher, torch.nn.Module):
        teacher = copy.deepcopy(teacher).to(torch.float64).eval()
        call = _call_torch
        parameter = next(teacher.parameters(), None)
        if parameter is not None:
            X = X.to(parameter.device)
    elif callable(teacher):
        call = {"numpy": _call_numpy, "torch": _call_torch}.get(input_type)
        if call is None:  # auto: decide on the first row
            try:
                _call_numpy(teacher, X[:1])
                call = _call_numpy
            except TypeError:
                call = _call_torch
            except Exception as error:
                raise RuntimeError(f"the teacher raised {type(error).__name__} on row 0: "
                                   f"{error}") from error
    else:
        raise TypeError(f"the teacher must be callable, got {type(teacher).__name__}")

    outputs = []
    for start in range(0, X.shape[0], chunk_size):
        chunk = X[start:start + chunk_size]
        try:
            out = call(teacher, chunk)
        except Exception as error:
            raise RuntimeError(f"the teacher raised {type(error).__name__} on rows "
                               f"{start}..{start + len(chunk) - 1}: {error}") from error
        outputs.append(_as_output(out, len(chunk)))
    y = torch.cat(outputs)
    if len({o.shape[1] for o in outputs}) != 1:
        raise ValueError("the teacher returned outputs of different widths for different chunks")
    bad = ~torch.isfinite(y)
    if bad.any():
        rows = torch.nonzero(bad.any(dim=1)).flatten()
        raise ValueError(f"the teacher returned NaN or inf for {len(rows)} input(s), first at row "
                         f"{int(rows[0])}")
    log.debug("queried %d inputs, outputs of width %d", y.shape[0], y.shape[1])
    return y.numpy() if was_numpy else y


def _as_output(out, n: int) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().to(torch.float64)
    else:
        try:
            out = torch.from_numpy(np.asarray(out, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise TypeError(f"the teacher returned {type(out).__name__}, not a numeric array") from error
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2 or out.shape[0] != n:
        raise ValueError(f"the teacher returned shape {tuple(out.shape)} for {n} inputs; expected "
                         f"({n}, d_out) or ({n},)")
    return out
