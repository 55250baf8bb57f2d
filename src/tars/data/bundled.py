"""Data addressable by name: benchmark text that ships inside the package (`tars speak openbookqa`), and
the mini world's seeded sets (`mini:heldout`, `mini:rl_train`; data/mini_sets.py)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED = {"openbookqa": "openbookqa_test.jsonl"}


def resolve_data(arg: str | Path) -> Path:
    """A path as given, or the named set's file when `arg` is a name (`openbookqa`, `mini:heldout`) and
    no such path exists."""
    p = Path(arg)
    name = str(arg)
    if name.startswith("mini:") and not p.exists():
        from tars.data.mini_sets import NAMES, mini_set_file
        from tars.errors import UserError

        if name[5:] not in NAMES:
            raise UserError(f"{name}: unknown data set (named sets: {', '.join('mini:' + n for n in NAMES)})")
        return mini_set_file(name[5:])
    if not p.exists() and name in BUNDLED:
        return Path(str(resources.files("tars.data.benchmarks") / BUNDLED[str(arg)]))
    return p
