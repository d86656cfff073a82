"""Checkpoints: a run killed part-way resumes and ends with bitwise the same result.

A run is a deterministic sequence of *steps*: an Adam phase, a Levenberg-Marquardt solve, the
training of a batch of students. Each step has a key, its position in the tree of steps
(``"3-train_students.1-lm"``: the second step inside the fourth top-level one). The control flow
depends only on earlier steps' results, so a rerun with the same arguments meets the same keys
in the same order.

* When a step finishes, its result (arrays, plus a little JSON) is recorded under its key, and
  the records of the steps inside it are dropped: the outer result subsumes them.
* Inside its loop, a long step records its *loop state* (parameters, optimizer state, damping,
  counters) whenever ``interval`` wall-clock seconds have passed since the last write.
* The record goes to one file at most every ``interval`` seconds, atomically (temporary file,
  fsync, rename; :func:`eandc.storage.save_arrays`), with a SHA-256 checksum of every array.

A restarted run opens the same file: a finished step returns its recorded result without
computing, the interrupted step continues from its loop state, and the cheap deterministic work
in between (clustering, compaction, assembling networks) is recomputed from those. On CPU the
resumed run ends with bitwise the same weights as an uninterrupted one (tested by killing a
run with SIGKILL). A damaged checkpoint file, or one written for other inputs (its
``fingerprint`` differs), is reported in the log and ignored: the run starts over.

Use::

    with Checkpoint("run/checkpoint.npz", interval=60, fingerprint=config_hash):
        result = expand_and_cluster(...)        # or expand_and_cluster(..., checkpoint=ckpt)

The training code marks its steps with :func:`memoize` and, inside loops, :func:`loop`; both do
nothing when no checkpoint is active, so there is one code path.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from .storage import CorruptFileError, load_arrays, save_arrays

__all__ = ["Checkpoint", "memoize", "loop", "active", "adam_state", "load_adam_state"]

log = logging.getLogger(__name__)

FORMAT = "eandc.checkpoint/1"

_active: contextvars.ContextVar = contextvars.ContextVar("eandc_checkpoint", default=None)


def active() -> Checkpoint | None:
    """The checkpoint of the ``with`` block we are in, if any."""
    return _active.get()


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    return np.array(value)  # python scalars: float64 / int64 / bool, exactly


class Checkpoint:
    """Records finished steps and loop states of one run in the file ``path`` (see module doc).

    ``interval``: seconds between writes (0: write at every opportunity). ``fingerprint``: a
    string naming the run's inputs and settings; a file with another fingerprint is ignored.
    """

    def __init__(self, path: str | os.PathLike, interval: float = 60.0, fingerprint: str = ""):
        if not interval >= 0:
            raise ValueError(f"the checkpoint interval must be >= 0 seconds, got {interval!r}")
        self.path = Path(path)
        self.interval = float(interval)
        self.fingerprint = str(fingerprint)
        self.results: dict[str, tuple[dict, dict]] = {}  # key -> (arrays, info)
        self.states: dict[str, tuple[dict, dict]] = {}
        self.resumed_from: dict | None = None  # what the file held when the run started
        self.writes = 0
        self._stack: list[list] = [["", 0]]  # (key of the enclosing step, children so far)
        self._last_write = time.monotonic()
        self._token = None
        self._read()

    # -- the file ---------------------------------------------------------------------------
    def _read(self):
        if not self.path.exists():
            return
        try:
            arrays, meta = load_arrays(self.path)
            if meta.get("format") != FORMAT:
                raise CorruptFileError(f"{self.path} is not an eandc checkpoint")
        except (CorruptFileError, OSError) as error:
            log.warning("checkpoint %s is damaged and is ignored, the run starts over: %s",
                        self.path, error)
            return
        if meta.get("fingerprint") != self.fingerprint:
            log.warning("checkpoint %s belongs to another run (fingerprint %s, expected %s); "
                        "ignored", self.path, meta.get("fingerprint"), self.fingerprint)
            return
        for kind, table in (("r", self.results), ("s", self.states)):
            for key, (fields, info) in meta[kind].items():
                table[key] = ({f: arrays[f"{kind}|{key}|{f}"] for f in fields}, info)
        self.resumed_from = {"finished_steps": len(self.results),
                             "interrupted_steps": len(self.states)}
        log.info("resuming from checkpoint %s: %d finished step(s), %d interrupted", self.path,
                 len(self.results), len(self.states))

    def write(self) -> None:
        """Write the record now (atomically)."""
        arrays, meta = {}, {"format": FORMAT, "fingerprint": self.fingerprint, "r": {}, "s": {}}
        for kind, table in (("r", self.results), ("s", self.states)):
            for key, (fields, info) in table.items():
                meta[kind][key] = (sorted(fields), info)
                arrays.update({f"{kind}|{key}|{f}": v for f, v in fields.items()})
        save_arrays(self.path, arrays, meta)
        self.writes += 1
        self._last_write = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last_write >= self.interval

    def remove(self) -> None:
        """Delete the file (the run is finished and its result stored elsewhere)."""
        self.path.unlink(missing_ok=True)

    # -- activation -------------------------------------------------------------------------
    def __enter__(self) -> Checkpoint:
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.path.parent} does not exist")
        self._stack = [["", 0]]
        self._token = _active.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.reset(self._token)
        self._token = None

    # -- steps ------------------------------------------------------------------------------
    def _open(self, name: str) -> str:
        parent = self._stack[-1]
        key = f"{parent[0]}.{parent[1]}-{name}" if parent[0] else f"{parent[1]}-{name}"
        parent[1] += 1
        return key

    def _finish(self, key: str, arrays: dict, info: dict) -> None:
        prefix = key + "."
        for table in (self.results, self.states):
            for old in [k for k in table if k.startswith(prefix) or k == key]:
                del table[old]
        self.results[key] = ({f: _to_numpy(v) for f, v in arrays.items()}, info)
        if self.due():
            self.write()


def memoize(name: str, pack, unpack):
    """Decorator: the function is one step (see the module doc).

    ``pack(result) -> (arrays, info)`` turns the function's result into named arrays (tensors,
    numpy arrays or python scalars) and a JSON-serialisable dict; ``unpack(arrays, info, *args,
    **kwargs)`` rebuilds the result from them (arrays come back as tensors on the CPU) given the
    call's arguments. Without an active checkpoint the function just runs.
    """
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            ckpt = _active.get()
            if ckpt is None:
                return fn(*args, **kwargs)
            key = ckpt._open(name)
            if key in ckpt.results:
                arrays, info = ckpt.results[key]
                return unpack({f: torch.from_numpy(v.copy()) for f, v in arrays.items()}, info,
                              *args, **kwargs)
            ckpt._stack.append([key, 0])
            try:
                result = fn(*args, **kwargs)
            finally:
                ckpt._stack.pop()
            ckpt._finish(key, *pack(result))
            return result
        return wrapper
    return decorate


class _Loop:
    """The loop state of the step being computed (see :func:`loop`)."""

    def __init__(self, ckpt: Checkpoint | None):
        self._ckpt = ckpt
        self._key = ckpt._stack[-1][0] if ckpt is not None else ""
        if ckpt is not None and not self._key:
            raise RuntimeError("checkpoint.loop() is called outside of a memoized step")

    @property
    def state(self) -> tuple[dict, dict] | None:
        """(arrays as CPU tensors, info) recorded by an interrupted earlier run, or ``None``."""
        if self._ckpt is None or self._key not in self._ckpt.states:
            return None
        arrays, info = self._ckpt.states[self._key]
        return {f: torch.from_numpy(v.copy()) for f, v in arrays.items()}, info

    def due(self) -> bool:
        """Whether it is time to record the loop state (never without a checkpoint)."""
        return self._ckpt is not None and self._ckpt.due()

    def save(self, arrays: dict, info: dict | None = None) -> None:
        """Record the loop state and write the checkpoint file."""
        if self._ckpt is None:
            return
        self._ckpt.states[self._key] = ({f: _to_numpy(v) for f, v in arrays.items()}, info or {})
        self._ckpt.write()


def loop() -> _Loop:
    """Inside a :func:`memoize` step: its recorded loop state, and a way to record it."""
    return _Loop(_active.get())


def adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    """The Adam moments and step count of ``param``, as arrays."""
    return {f"adam_{name}": value for name, value in optimizer.state[param].items()}


def load_adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, arrays: dict) -> None:
    """Put state recorded by :func:`adam_state` back (same dtypes, on ``param``'s device)."""
    state = {name[5:]: value.to(param.device) if value.ndim else value
             for name, value in arrays.items() if name.startswith("adam_")}
    optimizer.state[param].update(state)
