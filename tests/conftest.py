import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

def pytest_configure(config):
    """Module-scoped fixtures run outside the per-test $TARS_HOME: give the session its own too."""
    import os
    import tempfile

    os.environ["TARS_HOME"] = tempfile.mkdtemp(prefix="tars-test-home-")


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own $TARS_HOME, so caches never leak between tests or into ~/.cache."""
    monkeypatch.setenv("TARS_HOME", str(tmp_path / "tars_home"))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def good_row(i=0, **kw):
    row = {"id": f"q{i}", "question": "What is 2 plus 2?", "options": ["3", "4", "5", "6"],
           "answer": "B", "subject": "math", "source": "test"}
    row.update(kw)
    return row


def tone(seconds=1.0, sr=16000, channels=1, freq=440.0):
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write_wav(path: Path, seconds=1.0, sr=16000, channels=1) -> Path:
    sf.write(str(path), tone(seconds, sr, channels), sr, subtype="PCM_16")
    return path


def run_cli(*args, env=None, cwd=None):
    """Run the real `tars` entry point in a subprocess (exit codes and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "tars.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd or REPO)
