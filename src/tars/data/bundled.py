"""Benchmark text that ships inside the package, addressable by name (`tars speak openbookqa`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED = {"openbookqa": "openbookqa_test.jsonl"}


def resolve_data(arg: str | Path) -> Path:
    """A path as given, or the bundled file when `arg` is a bundled name and no such path exists."""
    p = Path(arg)
    if not p.exists() and str(arg) in BUNDLED:
        return Path(str(resources.files("tars.data.benchmarks") / BUNDLED[str(arg)]))
    return p
