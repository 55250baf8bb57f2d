"""The one record type for spoken multiple choice, and its validation.

Every stage of tars (synthesis, training, evaluation) reads and writes these records, so validation
lives here once and reports *every* problem of a file with its line and field, rather than stopping at
the first: a user fixing a 10 k-line file wants the whole list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

LETTERS = "ABCDEFGHIJ"
MIN_OPTIONS, MAX_OPTIONS = 2, 10

#: Keys the schema knows. Any other key is kept verbatim in `Record.extra` and written back.
CORE_KEYS = ("id", "question", "options", "answer", "subject", "source")
OPTIONAL_KEYS = ("audio", "duration_s", "voice", "cot", "difficulty")


@dataclass
class Record:
    """One spoken (or to-be-spoken) multiple-choice question.

    `answer` is a letter: `A` = `options[0]`. `audio` is a path relative to the file that holds the
    record, so a manifest and its wavs can be moved together.
    """

    id: str
    question: str
    options: list[str]
    answer: str
    subject: str | None = None
    source: str = ""
    audio: str | None = None
    duration_s: float | None = None
    voice: str | None = None
    cot: str | None = None
    difficulty: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)

    @property
    def answer_text(self) -> str:
        return self.options[self.answer_index]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in CORE_KEYS}
        for k in OPTIONAL_KEYS:
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record: printed as `file:line: field: message`."""

    where: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.message}" if self.field else f"{self.where}: {self.message}"


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def parse_record(obj: Any, where: str) -> tuple[Record | None, list[Problem]]:
    """Check one decoded JSON value against the schema.

    Returns the record (None when any problem was found) and the list of problems.
    """
    if not isinstance(obj, dict):
        return None, [Problem(where, "", f"expected a JSON object, got {type(obj).__name__}")]
    probs: list[Problem] = []

    def bad(key: str, msg: str) -> None:
        probs.append(Problem(where, key, msg))

    for key in ("id", "question", "options", "answer"):
        if key not in obj:
            bad(key, "missing")
    rid = obj.get("id")
    if "id" in obj and (not _is_str(rid) or not rid.strip()):
        bad("id", f"must be a non-empty string, got {rid!r}")
    q = obj.get("question")
    if "question" in obj:
        if not _is_str(q):
            bad("question", f"must be a string, got {type(q).__name__}")
        elif not q.strip():
            bad("question", "is empty")
    opts = obj.get("options")
    n_opts = None
    if "options" in obj:
        if not isinstance(opts, list):
            bad("options", f"must be a list of strings, got {type(opts).__name__}")
        elif not MIN_OPTIONS <= len(opts) <= MAX_OPTIONS:
            bad("options", f"must hold {MIN_OPTIONS} to {MAX_OPTIONS} options, got {len(opts)}")
        else:
            for i, o in enumerate(opts):
                if not _is_str(o):
                    bad(f"options[{i}]", f"must be a string, got {type(o).__name__}")
                elif not o.strip():
                    bad(f"options[{i}]", "is empty")
            n_opts = len(opts)
    ans = obj.get("answer")
    if "answer" in obj:
        if not _is_str(ans) or len(ans) != 1 or ans not in LETTERS:
            bad("answer", f"must be one capital letter A-{LETTERS[-1]}, got {ans!r}")
        elif n_opts is not None and LETTERS.index(ans) >= n_opts:
            bad("answer", f"{ans!r} is outside the {n_opts} options (A-{LETTERS[n_opts - 1]})")
    subj = obj.get("subject")
    if subj is not None and not _is_str(subj):
        bad("subject", f"must be a string or null, got {type(subj).__name__}")
    src = obj.get("source", "")
    if not _is_str(src):
        bad("source", f"must be a string, got {type(src).__name__}")
    audio = obj.get("audio")
    if audio is not None and (not _is_str(audio) or not audio.strip()):
        bad("audio", f"must be a non-empty path string, got {audio!r}")
    dur = obj.get("duration_s")
    if dur is not None and (
        isinstance(dur, bool) or not isinstance(dur, (int, float)) or not math.isfinite(dur) or dur <= 0
    ):
        bad("duration_s", f"must be a positive number, got {dur!r}")
    for key in ("voice", "cot"):
        v = obj.get(key)
        if v is not None and not _is_str(v):
            bad(key, f"must be a string, got {type(v).__name__}")
    diff = obj.get("difficulty")
    if diff is not None and (isinstance(diff, bool) or not isinstance(diff, int)):
        bad("difficulty", f"must be an integer, got {diff!r}")
    if probs:
        return None, probs
    known = set(CORE_KEYS) | set(OPTIONAL_KEYS)
    rec = Record(
        id=rid,
        question=q.strip(),
        options=[o.strip() for o in opts],
        answer=ans,
        subject=subj,
        source=src,
        audio=audio,
        duration_s=float(dur) if dur is not None else None,
        voice=obj.get("voice"),
        cot=obj.get("cot"),
        difficulty=diff,
        extra={k: v for k, v in obj.items() if k not in known},
    )
    return rec, []
