"""Memory: estimate what training will hold from the sizes, and fail early when it cannot fit.

A run that needs more memory than the machine has is otherwise killed by the system hours in,
with nothing said. Before training, :func:`check_training_memory` adds up the largest tensors
that :func:`eandc.training.train_students` holds at once:

* the Gauss-Newton systems of Levenberg-Marquardt: per student a ``P x P`` matrix, held about
  four times (the matrix, the damped copy, its Cholesky factor, the masked copy);
* one chunk of the Jacobian (its size is bounded by ``JACOBIAN_CHUNK_ELEMENTS``: the samples are
  already processed in chunks), held about three times while it is assembled;
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


def training_memory(layout, n_students: int, n: int, subset_rows: int) -> dict[str, int]:
    """Estimated bytes per item (see the module doc) for training ``n_students`` of ``layout``."""
    from .training import _chunk_rows

    P, N, d_out = layout.size, n_students, layout.d_out
    rows = min(n, _chunk_rows(N, d_out, P))
    return {
        "Gauss-Newton systems": 4 * N * P * P * BYTES,
        "Jacobian chunk": 3 * rows * N * d_out * P * BYTES,
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


def check_training_memory(layout, n_students: int, n: int, subset_rows: int, device=None) -> int:
    """Raise :class:`ResourceError` when training will not fit; return the estimate in bytes."""
    parts = training_memory(layout, n_students, n, subset_rows)
    need = sum(parts.values())
    free = available_memory(device)
    if free is not None and need > free:
        biggest = max(parts, key=parts.get)
        raise ResourceError(
            f"training {n_students} students of sizes {'-'.join(map(str, layout.sizes))} "
            f"({layout.size} parameters each) on {n} queries needs about {format_size(need)} "
            f"(largest: {biggest}, {format_size(parts[biggest])}), but only {format_size(free)} "
            "is available; use fewer or narrower students, or fewer queries")
    return need
