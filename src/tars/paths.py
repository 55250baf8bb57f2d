"""Where tars keeps converted weights, caches and speech clips: `$TARS_HOME` (default ~/.cache/tars)."""

from __future__ import annotations

import os
from pathlib import Path


def tars_home() -> Path:
    return Path(os.environ.get("TARS_HOME") or Path.home() / ".cache" / "tars")
