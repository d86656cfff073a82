"""Plain-file storage: atomic writes and array files with a checksum, never pickles.

An array file is one ``.npz`` archive holding named arrays plus a ``__meta__`` entry, a JSON
document stored as bytes. The JSON records a SHA-256 of every array, so a truncated or altered
file is detected on load instead of being used.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["atomic_write_bytes", "array_digest", "save_arrays", "load_arrays", "CorruptFileError",
           "user_cache_folder"]

_META_KEY = "__meta__"


class CorruptFileError(ValueError):
    """A stored file is unreadable, truncated, or does not match its recorded checksums."""


def user_cache_folder(name: str) -> Path:
    """``$XDG_CACHE_HOME/eandc/<name>`` (when set to an absolute path), else ``~/.cache/eandc/<name>``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "eandc" / name


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename (all or nothing)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_csv(rows: list[dict], columns, path: str | os.PathLike) -> Path:
    """Write ``rows`` (dicts) as a CSV table with ``columns``, atomically; ``None`` is empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in columns})
    return atomic_write_bytes(path, buffer.getvalue().encode())


def array_digest(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    header = f"{array.dtype.str}{array.shape}".encode()
    return hashlib.sha256(header + array.tobytes()).hexdigest()


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Store ``arrays`` and the JSON-serialisable ``meta`` in one ``.npz`` file, atomically."""
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    for name, value in arrays.items():
        if value.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; only plain numeric arrays are stored")
    record = dict(meta, checksums={name: array_digest(value) for name, value in arrays.items()})
    buffer = io.BytesIO()
    payload = dict(arrays)
    payload[_META_KEY] = np.frombuffer(json.dumps(record, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(buffer, **payload)
    return atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by :func:`save_arrays`; verify every checksum; return (arrays, meta)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise CorruptFileError(f"{path} is not a readable eandc array file ({error})") from error
    if _META_KEY not in contents:
        raise CorruptFileError(f"{path} is not an eandc array file (no {_META_KEY} entry)")
    try:
        meta = json.loads(contents.pop(_META_KEY).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(f"{path}: its metadata is not valid JSON ({error})") from error
    checksums = meta.pop("checksums", None)
    if not isinstance(checksums, dict) or set(checksums) != set(contents):
        raise CorruptFileError(f"{path}: the recorded checksums do not list the stored arrays")
    for name, value in contents.items():
        if array_digest(value) != checksums[name]:
            raise CorruptFileError(f"{path}: array {name!r} does not match its checksum")
    return contents, meta
