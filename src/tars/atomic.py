"""Atomic file writes: a killed job never leaves a half-written file behind.

Every file tars writes whole goes to a temporary file in the same directory first and is renamed over
the target (rename is atomic on POSIX within one filesystem). Logs that grow a row at a time
(`metrics.jsonl`, `predictions.jsonl`, `groups.jsonl`) are appended instead, and resuming drops a last
line that a kill cut short.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes it 0600; written files get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _current_umask() -> int:
    try:  # Linux: read it without the process-wide (thread-unsafe) set-and-restore
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp dir beside `out_dir`; on success it replaces `out_dir` by rename, on error it is removed.

    A killed job leaves at worst a hidden `.name.*` directory, never a half-written `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        umask = _current_umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the final dir gets the usual permissions
        yield tmp
        for f in tmp.rglob("*"):  # some writers create 0600 temp files and rename them into place
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~umask)
        old = None
        if out_dir.exists() or out_dir.is_symlink():
            old = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{time.monotonic_ns()}.old"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
