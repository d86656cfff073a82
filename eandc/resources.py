"""Memory: estimate what training will hold from the sizes, and fail early when it cannot fit.

A run that needs more memory than the machine has is otherwise killed by the system hours in,
with nothing said. Before training, :func:`check_training_memory` adds up the largest tensors
that :func:`eandc.training.train_students` holds at once. With the dense finisher:

* the Gauss-Newton systems of Levenberg-Marquardt: per student a ``P x P`` matrix, held about
  four times (the matrix, the damped copy, its Cholesky factor, the masked copy);
* one chunk of the Jacobian (its size is bounded by ``JACOBIAN_CHUNK_ELEMENTS``: the samples are
  already processed in chunks), held about three times while it is assembled;

with the matrix-free finisher (:mod:`eandc.matfree`) instead, no ``P x P`` term:

* the conjugate-gradient vectors: about twelve ``N x P`` tensors;
* the layers' activations and slopes on all queries, kept between Jacobian products up to
  ``eandc.matfree.ACTIVATION_CACHE_BYTES`` (recomputed chunk by chunk above that);
* one chunk of per-layer tensors of the products (bounded by ``eandc.matfree.CHUNK_ELEMENTS``),
  about four times;

and with both:

* the Adam phase's autograd graph on the subset of queries: about six tensors of
  ``N x rows x width`` per hidden layer;
* the queries and targets.

It compares the total with the memory available (``MemAvailable`` on Linux, free GPU memory
on CUDA), capped by the environment variable ``EANDC_MAX_MEMORY`` (bytes, or with a suffix
``K``, ``M``, ``G``) when set, and raises :class:`ResourceError` with the estimate.
"""

from __future__ import annotations

import os

import torch

__all__ = ["ResourceError", "training_memory", "available_memory", "check_training_memory",
           "parse_size", "format_size"]

BYTES = 8  # float64


class ResourceError(RuntimeError):
    """The run would need more memory than is available."""


def parse_size(text: str | int) -> int:
    """``"512M"``, ``"4G"``, ``"1000"`` -> bytes."""
    if isinstance(text, int):
        return text
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    raw = str(text).strip().upper().removesuffix("B").removesuffix("I")
    try:
        if raw and raw[-1] in units:
            return int(float(raw[:-1]) * units[raw[-1]])
        return int(float(raw))
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (examples: 512M, 4G)") from None


def format_size(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def training_memory(layout, n_students: int, n: int, subset_rows: int,
                    finisher: str = "dense") -> dict[str, int]:
    """Estimated bytes per item (see the module doc) for training ``n_students`` of ``layout``
    with the ``"dense"`` or the ``"matfree"`` second-order finisher."""
    P, N, d_out = layout.size, n_students, layout.d_out
    if finisher == "dense":
        from .training import _chunk_rows

        rows = min(n, _chunk_rows(N, d_out, P))
        parts = {"Gauss-Newton systems": 4 * N * P * P * BYTES,
                 "Jacobian chunk": 3 * rows * N * d_out * P * BYTES}
    elif finisher == "matfree":
        from . import matfree

        rows = min(n, matfree.chunk_rows(N, layout))
        units = max(layout.sizes) + sum(layout.widths) + d_out
        parts = {"conjugate-gradient vectors": 12 * N * P * BYTES,
                 "activation cache": min(matfree.activation_cache_bytes(layout, N, n),
                                         matfree.ACTIVATION_CACHE_BYTES),
                 "Jacobian-product chunk": 4 * rows * N * units * BYTES}
    else:
        raise ValueError(f"unknown finisher {finisher!r}; choose 'dense' or 'matfree'")
    return {
        **parts,
        "Adam graph": 6 * N * subset_rows * (sum(layout.widths) + d_out) * BYTES,
        "queries and targets": 2 * n * (layout.d_in + d_out) * BYTES,
    }


def available_memory(device=None) -> int | None:
    """Bytes available on ``device`` (None: unknown), capped by ``EANDC_MAX_MEMORY``."""
    device = torch.device(device or "cpu")
    free = None
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
                        break
        except OSError:
            free = None
    cap = os.environ.get("EANDC_MAX_MEMORY")
    if cap:
        cap = parse_size(cap)
        free = cap if free is None else min(free, cap)
    return free


def check_training_memory(layout, n_students: int, n: int, subset_rows: int, device=None,
                          finisher: str = "dense") -> int:
    """Raise :class:`ResourceError` when training will not fit; return the estimate in bytes."""
    parts = training_memory(layout, n_students, n, subset_rows, finisher)
    need = sum(parts.values())
    free = available_memory(device)
    if free is not None and need > free:
        biggest = max(parts, key=parts.get)
        raise ResourceError(
            f"training {n_students} students of sizes {'-'.join(map(str, layout.sizes))} "
            f"({layout.size} parameters each) on {n} queries with the {finisher} finisher "
            f"needs about {format_size(need)} "
            f"(largest: {biggest}, {format_size(parts[biggest])}), but only {format_size(free)} "
            "is available; use fewer or narrower students, or fewer queries")
    return need
