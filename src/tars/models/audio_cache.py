"""Per-clip cache of frozen speech-encoder outputs.

The encoder is frozen in every tars stage, and on a CPU it dominates the cost of a speech prompt
(Whisper tiny on a 30 s window ≈ 0.4 s per clip; a 7B model's Whisper-large encoder is heavier still).
A clip is encoded once; every later prompt built from it (8 rollouts, scoring, each epoch) reuses the
result. Keys include the file's size and modification time, so an edited clip is re-encoded.
Entries live in memory and, when a folder is given, on disk (atomically written `.pt` files), so a
second process or a resumed run skips the encoder too.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from tars.atomic import atomic_write_bytes


class AudioCache:
    def __init__(self, namespace: str, folder: Path | None = None, max_items: int = 20_000):
        self.namespace = namespace
        self.folder = Path(folder) / namespace if folder else None
        self.max_items = max_items
        self._mem: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def key(self, path: Path) -> str:
        st = os.stat(path)
        raw = f"{self.namespace}|{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
        return hashlib.sha1(raw.encode()).hexdigest()

    def get_many(self, paths: Sequence[Path], compute: Callable[[list[Path]], list[Tensor]]) -> list[Tensor]:
        """Cached values for `paths`, computing the missing ones in one call of `compute`."""
        keys = [self.key(p) for p in paths]
        found: dict[str, Tensor] = {}
        todo: list[int] = []
        for i, k in enumerate(keys):
            v = self._lookup(k)
            if v is None:
                if k not in {keys[j] for j in todo}:
                    todo.append(i)
            else:
                found[k] = v
        self.hits += len(paths) - len(todo)
        self.misses += len(todo)
        if todo:
            for i, v in zip(todo, compute([paths[i] for i in todo])):
                self._store(keys[i], v.detach().cpu())
                found[keys[i]] = self._mem[keys[i]]
        return [found[k] for k in keys]

    def _lookup(self, k: str) -> Tensor | None:
        if k in self._mem:
            self._mem.move_to_end(k)
            return self._mem[k]
        if self.folder and (self.folder / f"{k}.pt").exists():
            v = torch.load(self.folder / f"{k}.pt", map_location="cpu", weights_only=True)
            self._remember(k, v)
            return v
        return None

    def _store(self, k: str, v: Tensor) -> None:
        self._remember(k, v)
        if self.folder:
            buf = io.BytesIO()
            torch.save(v.clone(), buf)
            atomic_write_bytes(self.folder / f"{k}.pt", buf.getvalue())

    def _remember(self, k: str, v: Tensor) -> None:
        self._mem[k] = v
        while len(self._mem) > self.max_items:
            self._mem.popitem(last=False)
