"""Where a benchmark's raw numbers go: ``benchmarks/results/<name>-<date>-<time>.json``."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from eandc.storage import atomic_write_bytes

RESULTS = Path(__file__).parent / "results"


def write_record(name: str, record: dict) -> Path:
    """Write ``record`` (JSON-serialisable) atomically under a dated name; print and return its path."""
    stamp = datetime.datetime.now()
    path = RESULTS / f"{name}-{stamp:%Y-%m-%d-%H%M%S}.json"
    RESULTS.mkdir(exist_ok=True)
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    print(f"wrote {path}")
    return path
