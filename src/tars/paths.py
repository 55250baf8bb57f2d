"""Where tars keeps converted weights, caches and speech clips: `$TARS_HOME` (default ~/.cache/tars)."""

from __future__ import annotations

import os
from pathlib import Path


def tars_home() -> Path:
    return Path(os.environ.get("TARS_HOME") or Path.home() / ".cache" / "tars")


def resolve(path: str | Path) -> Path:
    """`mini:NAME` → `$TARS_HOME/mini/NAME` (where the mini model's stages live); other paths as given."""
    s = str(path)
    if s.startswith("mini:"):
        return tars_home() / "mini" / s[len("mini:"):]
    return Path(path)
