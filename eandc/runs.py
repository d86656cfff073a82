"""Results stored by the hash of their configuration: an identical run is found, not redone.

A run's folder is ``<root>/<kind>/<hash>/``, the hash being a SHA-256 of its configuration (a
JSON document: settings, and the hashes of the query and target arrays where there are any).
It holds plain files, never pickles:

* ``network.npz``: the recovered network (:meth:`eandc.MLP.save`: arrays with SHA-256 checksums);
* ``result.json``: configuration, metrics, wall seconds, machine, date, the SHA-256 of
  ``network.npz``, and a checksum of the JSON document itself. It is written last, atomically:
  a folder without a valid ``result.json`` holds no finished run;
* ``checkpoint.npz`` while the run is in progress (:mod:`eandc.checkpoint`).

:func:`load_run` checks every checksum. A truncated or altered file raises
:class:`~eandc.storage.CorruptFileError`; :func:`find_run` reports it in the log and returns
``None``, so that the caller recomputes the run instead of using the damaged result.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .mlp import MLP
from .storage import CorruptFileError, array_digest, atomic_write_bytes

__all__ = ["config_hash", "array_hash", "run_folder", "RunRecord", "save_run", "load_run",
           "find_run", "machine", "check_writable", "plain"]

log = logging.getLogger(__name__)

FORMAT = "eandc.run/1"
RESULT = "result.json"
NETWORK = "network.npz"
CHECKPOINT = "checkpoint.npz"


def _canonical(document) -> bytes:
    try:
        return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise TypeError(f"the configuration must be plain JSON (numbers, strings, lists, dicts): "
                        f"{error}") from None


def config_hash(config: dict) -> str:
    """First 16 hex digits of the SHA-256 of ``config`` as canonical JSON."""
    if not isinstance(config, dict):
        raise TypeError(f"a configuration is a dict, got {type(config).__name__}")
    return hashlib.sha256(_canonical(config)).hexdigest()[:16]


def array_hash(array) -> str:
    """SHA-256 of an array's dtype, shape and bytes (to put data into a configuration)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return array_digest(array)


def run_folder(root: str | os.PathLike, kind: str, config: dict) -> Path:
    """``<root>/<kind>/<hash of config>`` (not created)."""
    if not kind or "/" in kind or kind.startswith("."):
        raise ValueError(f"a run kind is a plain folder name, got {kind!r}")
    return Path(root) / kind / config_hash(config)


def check_writable(folder: str | os.PathLike, create: bool = True) -> Path:
    """``folder``, created when its parent exists (``create``), and checked to be writable."""
    folder = Path(folder)
    if not folder.exists():
        if not create or not folder.parent.is_dir():
            raise FileNotFoundError(f"output folder {folder} does not exist"
                                    + (f" (nor its parent {folder.parent})" if create else ""))
        folder.mkdir()
    if not folder.is_dir():
        raise NotADirectoryError(f"output folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {folder} is not writable")
    return folder


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit of the ``eandc`` source in use, with ``+dirty`` when the package's files
    differ from it; ``None`` outside a git checkout."""
    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=folder,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict:
    """Where a result was computed: host, platform, processor, threads, versions, commit."""
    from . import __version__
    return {"host": platform.node(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__, "numpy": np.__version__, "eandc": __version__,
            "commit": source_commit()}


@dataclass
class RunRecord:
    """A finished run read back from its folder."""

    folder: Path
    config: dict
    metrics: dict
    wall_seconds: float
    machine: dict
    finished: str
    network: MLP | None = None
    extra: dict = field(default_factory=dict)


def plain(value):
    """``value`` as plain JSON: numpy and torch scalars and arrays become numbers and lists,
    non-finite floats the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_run(folder: str | os.PathLike, config: dict, metrics: dict,
             network: MLP | dict[str, MLP] | None, wall_seconds: float,
             extra: dict | None = None) -> Path:
    """Store a finished run in ``folder`` (created): networks first, ``result.json`` last.

    ``network``: the run's network (``network.npz``), or a dict of named networks, each stored
    as ``<name>.npz`` (``"network"`` is the one :func:`load_run` loads; others, such as a
    trained teacher, are read with ``MLP.load``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    networks = network if isinstance(network, dict) else {"network": network}
    for name, net in networks.items():
        if net is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"a stored network's name must be an identifier, got {name!r}")
        net.save(folder / f"{name}.npz")
        files[f"{name}.npz"] = _file_hash(folder / f"{name}.npz")
    document = {"format": FORMAT, "hash": config_hash(config), "config": config,
                "metrics": plain(metrics), "wall_seconds": wall_seconds, "machine": machine(),
                "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "files": files, "extra": plain(extra or {})}
    document["checksum"] = hashlib.sha256(_canonical(document)).hexdigest()
    atomic_write_bytes(folder / RESULT, json.dumps(document, indent=1, sort_keys=True,
                                                   allow_nan=False).encode() + b"\n")
    return folder


def load_run(folder: str | os.PathLike, load_network: bool = True) -> RunRecord | None:
    """The finished run in ``folder``, ``None`` if there is none; damage raises CorruptFileError."""
    folder = Path(folder)
    path = folder / RESULT
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text())
        checksum = document.pop("checksum")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError) as error:
        raise CorruptFileError(f"{path} is unreadable or truncated ({error})") from None
    if hashlib.sha256(_canonical(document)).hexdigest() != checksum:
        raise CorruptFileError(f"{path} does not match its checksum")
    if document.get("format") != FORMAT:
        raise CorruptFileError(f"{path} is not an eandc result (format {document.get('format')!r})")
    if document["hash"] != folder.name:
        log.warning("%s: the folder name is not the hash of its configuration (%s)", folder,
                    document["hash"])
    for name, digest in document["files"].items():
        if not (folder / name).is_file():
            raise CorruptFileError(f"{folder / name} is missing")
        if _file_hash(folder / name) != digest:
            raise CorruptFileError(f"{folder / name} does not match the checksum in {RESULT}")
    network = MLP.load(folder / NETWORK) if load_network and NETWORK in document["files"] else None
    return RunRecord(folder, document["config"], document["metrics"], document["wall_seconds"],
                     document["machine"], document["finished"], network, document["extra"])


def find_run(folder: str | os.PathLike, load_network: bool = True) -> RunRecord | None:
    """Like :func:`load_run`, but a damaged result is reported (log warning) and gives ``None``:
    the caller recomputes it."""
    try:
        return load_run(folder, load_network)
    except CorruptFileError as error:
        log.warning("damaged result, recomputing it: %s", error)
        return None
