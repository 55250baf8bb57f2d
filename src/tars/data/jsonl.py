"""Our JSONL format: one `Record` per line, UTF-8, written atomically.

Reading collects every problem of the file (see `schema.parse_record`) so `tars data validate` can list
them all; `read_records` raises a `UserError` that carries them, one line each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from tars.atomic import atomic_write_text
from tars.data.audio import DEFAULT_MAX_AUDIO_S, check_audio
from tars.data.schema import Problem, Record, parse_record
from tars.errors import UserError

#: How many problems a `UserError` from `read_records` spells out before summarising the rest.
MAX_LISTED = 20


def load_records(
    path: str | os.PathLike,
    check_audio_files: bool = False,
    max_audio_s: float | None = DEFAULT_MAX_AUDIO_S,
) -> tuple[list[Record], list[Problem]]:
    """Parse and validate a JSONL file; returns the valid records and all problems found.

    `audio` paths resolve against the file's directory; with `check_audio_files` each one is probed
    from its header (exists, reads as audio, non-empty, at most `max_audio_s` seconds; the samples are
    not decoded) and the record's `duration_s` set to the clip's length.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        return [], [Problem(name, "", "file not found")]
    if path.is_dir():
        return [], [Problem(name, "", "is a directory, expected a .jsonl file")]
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return [], [Problem(f"{name}:{line}", "", f"not valid UTF-8 (byte {e.start})")]
    records: list[Record] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    n_lines = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        n_lines += 1
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(where, "", f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        rec, probs = parse_record(obj, where)
        if probs:
            problems.extend(probs)
            continue
        assert rec is not None
        if rec.id in seen:
            problems.append(Problem(where, "id", f"duplicate id {rec.id!r} (first on line {seen[rec.id]})"))
            continue
        seen[rec.id] = lineno
        if check_audio_files and rec.audio is not None:
            try:
                info = check_audio(path.parent / rec.audio, max_s=max_audio_s)
            except UserError as e:
                problems.append(Problem(where, "audio", str(e)))
                continue
            # The clip's own length, not the manifest's claim (optional, possibly stale): the commands
            # leave out clips over a backend's encoder window by it, before the first step.
            rec.duration_s = round(info.duration_s, 3)
        records.append(rec)
    if n_lines == 0:
        problems.append(Problem(name, "", "file is empty (no records)"))
    return records, problems


def read_records(path: str | os.PathLike, **kw) -> list[Record]:
    """Like `load_records` but all-or-nothing: any problem raises a `UserError` listing them."""
    records, problems = load_records(path, **kw)
    if problems:
        raise UserError(format_problems(problems))
    return records


def check_files(paths: Iterable[str | os.PathLike], check_audio_files: bool = True) -> None:
    """Every problem of every file at once (schema and, with `check_audio_files`, each clip exists, its
    header reads as audio and it is non-empty), as one `UserError`: commands call it before loading a
    model, so a bad manifest costs seconds, not a failed step halfway through a run. No length limit
    here: clips over a backend's encoder window are left out by the commands themselves (of both
    modalities)."""
    problems: list[Problem] = []
    for path in paths:
        problems += load_records(path, check_audio_files=check_audio_files, max_audio_s=None)[1]
    if problems:
        raise UserError(format_problems(problems))


def format_problems(problems: list[Problem]) -> str:
    lines = [str(p) for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"... and {len(problems) - MAX_LISTED} more problems")
    return "\n".join(lines)


def dumps_records(records: Iterable[Record]) -> str:
    return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> None:
    atomic_write_text(path, dumps_records(records))
