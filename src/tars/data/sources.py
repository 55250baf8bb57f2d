"""Where a stage's questions come from: a JSONL / manifest file, or a seeded synthetic mixture.

Speech stages need audio: records without it are synthesised once into a content-addressed folder under
`$TARS_HOME/speech-sets/`, so every stage and every rerun that asks for the same questions and voice
seed reuses the same clips.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tars.config import Config
from tars.data.jsonl import read_records
from tars.data.schema import Record
from tars.paths import tars_home


class DataConfig(Config):
    """Either `file` (a JSONL file or manifest), or a synthetic mixture of `families`."""

    file: str | None = None
    families: list[str] = ["arithmetic", "comparison", "counting", "units", "facts"]
    n: int = Field(1000, ge=1)
    seed: int = 1
    difficulty: int | None = Field(None, ge=1, le=3)
    voice_seed: int = 0
    limit: int | None = Field(None, ge=1)

    @field_validator("families")
    @classmethod
    def _known_families(cls, names: list[str]) -> list[str]:
        from tars.data.families import FAMILIES

        unknown = [n for n in names if n not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
        if not names:
            raise ValueError("at least one family")
        return names


def load_data(cfg: DataConfig, modality: Literal["text", "speech"]) -> tuple[list[Record], Path | None]:
    """Records, and the folder their `audio` paths are relative to (None for text)."""
    from tars.data.families import make_mixture

    if cfg.file:
        from tars.data.bundled import resolve_data

        path = resolve_data(cfg.file)
        records = read_records(path, check_audio_files=modality == "speech", max_audio_s=None)
        base = path.parent
    else:
        records = make_mixture(cfg.families, cfg.n, cfg.seed, cfg.difficulty)
        base = None
    if cfg.limit:
        records = records[: cfg.limit]
    if modality == "text":
        return records, base
    if all(r.audio for r in records) and base is not None:
        return records, base
    return spoken(records, cfg.voice_seed)


def check_data(cfg: DataConfig, modality: Literal["text", "speech"]) -> None:
    """Refuse a bad data file (every problem listed, audio probed for speech) before any work starts."""
    if cfg.file:
        from tars.data.bundled import resolve_data
        from tars.data.jsonl import check_files

        check_files([resolve_data(cfg.file)], check_audio_files=modality == "speech")


def spoken(records: list[Record], voice_seed: int = 0) -> tuple[list[Record], Path]:
    """Synthesise `records` (cached by content) and return the manifest records and their folder."""
    from tars.data.speech import EspeakEngine, speak

    h = hashlib.sha1()
    for r in records:
        h.update(f"{r.id}|{r.question}|{'|'.join(r.options)}\n".encode())
    h.update(f"voice_seed={voice_seed}".encode())
    folder = tars_home() / "speech-sets" / h.hexdigest()[:16]
    manifest = folder / "manifest.jsonl"
    if manifest.exists():
        got = read_records(manifest)
        if [r.id for r in got] == [r.id for r in records]:
            return got, folder
    out, _ = speak(records, folder, EspeakEngine(), seed=voice_seed, cache_dir=tars_home() / "speech")
    return out, folder
