"""Score how well a completion keeps the `<think>…</think><answer>The answer is X.</answer>` format.

The format reward is a shaping term next to correctness: it teaches the policy the layout that makes
answers *readable*, so that correctness can be judged at all. It is graded, not all-or-nothing, so
that a policy drifting from the format gets a gradient back towards it rather than a cliff, and it is
pure and strict where it pays in full, so it cannot be gamed by text that only looks right.

* 1.0, strict: the stripped text is exactly `<think>R</think>`, optional whitespace, then
  `<answer>The answer is X.</answer>`, where R is non-empty and holds no other think/answer tag, X is
  one capital letter A-J (tars questions have at most 10 options), optionally in parentheses, the
  final period is optional, and whitespace may pad the answer content (the system prompt itself
  writes `<answer> </answer>`). The wording is exact, capital T included.
* 0.5, loose: a closed `<think>…</think>` followed later by a closed `<answer>…</answer>` with
  non-empty content, but not strict: extra text around or between the pairs, other answer wording,
  an empty think, nested or repeated tags (the pairs still exist in order). Or: no think tag at all,
  and an `<answer>…</answer>` whose content states one letter (`B`, `(B)`, `The answer is B`, any
  case of the words).
* 0.0 otherwise: no answer tags, an unclosed tag (a `</answer>` removed as a stop string included:
  keep the stop string in the output), the answer before the think, an empty answer, or a think tag
  present without a well-ordered pair.

Tags are matched case-sensitively: the format being taught is the exact one.

`format_score(text, levels="binary")` is the paper's R_fmt: 1.0 for the strict format, 0.0 for
everything else (a loose layout earns nothing). The graded 1 / 0.5 / 0 scale above is the public
reference code's (`TarsConfig.format_levels`, docs/fidelity.md). These patterns are tars's own, written
for the system prompt's exact template; the reference code's strict / loose regexes are not reproduced.
"""

from __future__ import annotations

import re
from typing import Literal

STRICT = 1.0
LOOSE = 0.5
NONE = 0.0
FormatLevels = Literal["binary", "graded"]
FORMAT_LEVELS: tuple[str, ...] = ("binary", "graded")

_STRICT = re.compile(
    r"<think>(?P<think>(?:(?!</?think>|</?answer>).)*)</think>\s*"
    r"<answer>\s*The answer is (?:\([A-J]\)|[A-J])\.?\s*</answer>",
    re.S,
)
_THINK_PAIR = re.compile(r"<think>.*?</think>", re.S)
_ANSWER_PAIR = re.compile(r"<answer>(?P<answer>.*?)</answer>", re.S)
_THINK_TAG = re.compile(r"</?think>")
#: Answer content that states one letter, loosely: `B`, `(B).`, `**B**`, `the answer is B`.
_LETTER_STATEMENT = re.compile(
    r"\s*(?i:(?:the\s+)?(?:final\s+)?answer(?:\s+is|\s*:)\s*)?[(\[*]*[A-J][)\]*]*\s*[.!]?\s*"
)


def _is_strict(text: str) -> bool:
    m = _STRICT.fullmatch(text)
    return m is not None and bool(m.group("think").strip())


def _is_loose(text: str) -> bool:
    think = _THINK_PAIR.search(text)
    if think is not None:
        return any(m.group("answer").strip() for m in _ANSWER_PAIR.finditer(text, think.end()))
    if _THINK_TAG.search(text):
        return False
    return any(_LETTER_STATEMENT.fullmatch(m.group("answer")) for m in _ANSWER_PAIR.finditer(text))


def format_score(text: str, levels: FormatLevels = "graded") -> float:
    """`graded` (default): 1.0 for the exact target format, 0.5 for a recognisable but loose one, 0.0
    otherwise. `binary` (the paper's R_fmt): 1.0 for the exact format, else 0.0.

    Only the layout is judged, never whether the answer is right: `extract_choice` does that.
    """
    if levels not in FORMAT_LEVELS:
        raise ValueError(f"format levels must be one of {FORMAT_LEVELS}, got {levels!r}")
    stripped = text.strip()
    if _is_strict(stripped):
        return STRICT
    if levels == "binary":
        return NONE
    return LOOSE if _is_loose(stripped) else NONE
