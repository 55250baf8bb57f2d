"""VoiceBench-style spoken multiple choice (`mmsu`, `openbookqa`) from a local copy.

Users who have VoiceBench downloaded hold it as a parquet file or a Hugging Face `save_to_disk` folder:
rows with an `audio` column (a struct of `bytes` and/or `path`) and a `prompt` column with the question
and lettered options as one text, plus `reference` (the gold letter). We read both layouts with pyarrow
alone (no `datasets` dependency), split the prompt into question and options, write the audio out as
files and return our `Record`s with `audio` relative to the output manifest.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from tars.atomic import atomic_write_bytes
from tars.data.jsonl import format_problems, write_records
from tars.data.schema import LETTERS, Problem, Record, parse_record
from tars.errors import UserError

# "A. text", "A) text", "(A) text" at a line start or after whitespace; letters must run A, B, C… in order.
_OPTION = re.compile(r"(?:^|\s)\(?([A-J])[.)]\s+")
_QUESTION_KEYS = ("question", "prompt", "text", "instruction")
_ANSWER_KEYS = ("answer", "reference", "label", "gt")


def split_prompt(prompt: str) -> tuple[str, list[str]]:
    """`"Q? A. x B. y C. z"` (inline or one option per line) → (`"Q?"`, `["x", "y", "z"]`).

    Finds the first run of markers A, B, C, … in order; text before `A` is the question. Raises
    ValueError when fewer than two ordered options are found.
    """
    marks = [(m.start(1) - (1 if prompt[m.start(1) - 1 : m.start(1)] == "(" else 0), m.end(), m.group(1))
             for m in _OPTION.finditer(prompt)]
    want, picked = 0, []
    for start, end, letter in marks:
        if letter == LETTERS[want]:
            picked.append((start, end))
            want += 1
        elif letter == "A":  # a new run starts: an earlier "A." was part of the question
            picked, want = [(start, end)], 1
    if len(picked) < 2:
        raise ValueError("could not find lettered options (A. … B. …) in the prompt")
    question = prompt[: picked[0][0]].strip()
    options = []
    for i, (_, end) in enumerate(picked):
        stop = picked[i + 1][0] if i + 1 < len(picked) else len(prompt)
        options.append(prompt[end:stop].strip())
    return question, options


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except pa.ArrowInvalid as e:  # e.g. a Git LFS pointer: a clone made without git-lfs
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:120]}; a Git LFS pointer "
                        "if the dataset was cloned without git-lfs)") from None


def _read_table(path: Path) -> pa.Table:
    if path.is_file():
        if path.suffix != ".parquet":
            raise UserError(f"{path}: expected a .parquet file or a save_to_disk folder")
        return _read_parquet(path)
    if not path.is_dir():
        raise UserError(f"{path}: not found")
    arrows = sorted(path.glob("data-*.arrow")) or sorted(path.glob("*.arrow"))
    parquets = sorted(path.glob("*.parquet"))
    if arrows:
        tables = []
        for f in arrows:
            with pa.memory_map(str(f)) as src:
                try:
                    tables.append(pa.ipc.open_stream(src).read_all())
                except pa.ArrowInvalid:
                    try:
                        tables.append(pa.ipc.open_file(src).read_all())
                    except pa.ArrowInvalid as e:
                        raise UserError(f"{f}: not a readable Arrow file ({str(e).splitlines()[0][:120]})") from None
        return pa.concat_tables(tables)
    if parquets:
        return pa.concat_tables([_read_parquet(f) for f in parquets])
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        raise UserError(f"{path}: a DatasetDict; pass one split folder, one of: {', '.join(splits)}")
    raise UserError(f"{path}: no .arrow or .parquet files (expected a save_to_disk folder or parquet)")


def _first(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if row.get(k) is not None:
            return row[k]
    return None


def _audio_bytes(audio: Any, base: Path, where: str) -> tuple[bytes, str]:
    if isinstance(audio, dict):
        if audio.get("bytes"):
            name = audio.get("path") or ""
            return audio["bytes"], (Path(name).suffix or ".wav")
        if audio.get("path"):
            audio = audio["path"]
    if isinstance(audio, str) and audio:
        p = Path(audio) if Path(audio).is_absolute() else base / audio
        if not p.exists():
            raise UserError(f"{where}: audio: file not found: {p}")
        return p.read_bytes(), p.suffix or ".wav"
    raise UserError(f"{where}: audio: expected bytes or a path, got {type(audio).__name__}")


def import_voicebench(
    path: str | Path, out_dir: str | Path, name: str | None = None
) -> list[Record]:
    """Convert a local VoiceBench split into `out_dir/manifest.jsonl` + `out_dir/audio/*`.

    `name` prefixes ids and is the `source` (default: the folder or file stem).
    """
    path, out_dir = Path(path), Path(out_dir)
    table = _read_table(path)
    if "audio" not in table.column_names:
        raise UserError(f"{path}: no `audio` column (columns: {', '.join(table.column_names)})")
    name = name or path.stem
    base = path if path.is_dir() else path.parent
    records, problems = [], []
    for i, row in enumerate(table.to_pylist()):
        where = f"{path}:row {i}"
        text = _first(row, _QUESTION_KEYS)
        options = row.get("options") or row.get("choices")
        if not isinstance(text, str):
            problems.append(Problem(where, "prompt", "missing question text"))
            continue
        if options is None:
            try:
                text, options = split_prompt(text)
            except ValueError as e:
                problems.append(Problem(where, "prompt", str(e)))
                continue
        answer = _first(row, _ANSWER_KEYS)
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = LETTERS[answer] if 0 <= answer < len(LETTERS) else str(answer)
        if isinstance(answer, str):
            answer = answer.strip().strip("().").upper()
        rid = str(row.get("id", f"{name}-{i:05d}"))
        data, suffix = _audio_bytes(row["audio"], base, where)
        rel = f"audio/{rid.replace('/', '_')}{suffix}"
        obj = {
            "id": rid, "question": text, "options": options, "answer": answer,
            "subject": row.get("subject") or row.get("category"), "source": f"VoiceBench {name}",
            "audio": rel,
        }
        rec, probs = parse_record(obj, where)
        if probs:
            problems.extend(probs)
            continue
        try:
            rec.duration_s = round(sf.info(io.BytesIO(data)).duration, 3)
        except (sf.LibsndfileError, RuntimeError):
            problems.append(Problem(where, "audio", "not a readable audio file"))
            continue
        atomic_write_bytes(out_dir / rel, data)
        records.append(rec)
    if problems:
        raise UserError(format_problems(problems))
    write_records(out_dir / "manifest.jsonl", records)
    return records
