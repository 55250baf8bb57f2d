"""What every family builds its items from: the cast of names, wrong-but-plausible options, the layout.

These live in one place so the families agree on the things a model could otherwise exploit: every
family puts the right option at a uniformly random letter, and every numeric family mixes its named
mistakes with near misses on either side, so "pick the middle number" is no shortcut.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tars.data.schema import LETTERS, Record

N_OPTIONS = 4

#: Short names espeak-ng says clearly, each with its subject pronoun. A small closed cast keeps the
#: questions about reasoning, not about recognising unusual names.
NAMES: tuple[tuple[str, str], ...] = (
    ("Tom", "he"),
    ("Ann", "she"),
    ("Sam", "he"),
    ("Mia", "she"),
    ("Ben", "he"),
    ("Lily", "she"),
    ("Max", "he"),
    ("Emma", "she"),
    ("Jack", "he"),
    ("Lucy", "she"),
    ("Leo", "he"),
    ("Sara", "she"),
    ("Dan", "he"),
    ("Kate", "she"),
    ("Nick", "he"),
    ("Rose", "she"),
)

#: Near misses tried, in a shuffled order, when the named mistakes give fewer than three wrong numbers.
_NEAR_OFFSETS = (-3, -2, -1, 1, 2, 3)


@dataclass(frozen=True)
class Item:
    """A question before its options are lettered: the family writes the content, `to_record` the layout."""

    question: str
    answer: str
    distractors: tuple[str, ...]
    cot: str


def count_phrase(n: int, singular: str, plural: str) -> str:
    """`1 hour`, `3 hours`: read aloud, "1 hours" is the kind of slip a listener notices."""
    return f"{n} {singular if n == 1 else plural}"


def with_article(noun: str) -> str:
    """`a dog`, `an ant`."""
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def join_words(words: Sequence[str]) -> str:
    """`a`, `a and b`, `a, b and c`: how a list is said aloud."""
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} and {words[-1]}"


def wrong_numbers(
    answer: int, mistakes: Iterable[int], rng: random.Random, lowest: int = 0, step: int = 1
) -> tuple[str, ...]:
    """Three wrong numbers: two or three of the named `mistakes`, topped up with near misses.

    Named mistakes (wrong operation, skipped step, wrong unit factor) are what make a distractor
    plausible; near misses fill the gaps and, being on a random side, keep the answer off the centre.
    Near misses are whole multiples of `step`, so an answer of 300 grams is not next to a give-away 298.
    """

    def usable(v: int) -> bool:
        return v >= lowest and v != answer

    pool = list(dict.fromkeys(m for m in mistakes if usable(m)))
    chosen = rng.sample(pool, min(len(pool), rng.choice((2, 3))))
    offsets = list(_NEAR_OFFSETS)
    rng.shuffle(offsets)
    for d in offsets:
        if len(chosen) == N_OPTIONS - 1:
            break
        v = answer + d * step
        if usable(v) and v not in chosen:
            chosen.append(v)
    return tuple(str(v) for v in chosen)


def wrong_words(
    answer: str, preferred: Iterable[str], pool: Iterable[str], rng: random.Random
) -> tuple[str, ...]:
    """Three wrong words: the `preferred` near misses first, then random picks from `pool`."""
    chosen = [w for w in dict.fromkeys(preferred) if w != answer][: N_OPTIONS - 1]
    rest = [w for w in dict.fromkeys(pool) if w != answer and w not in chosen]
    chosen += rng.sample(rest, N_OPTIONS - 1 - len(chosen))
    return tuple(chosen)


def to_record(
    item: Item, rng: random.Random, *, record_id: str, family: str, seed: int, difficulty: int
) -> Record:
    """Letter the options with the answer at a uniformly random position, and stamp id and provenance."""
    _check_item(item)
    wrong = list(item.distractors)
    rng.shuffle(wrong)
    pos = rng.randrange(N_OPTIONS)
    return Record(
        id=record_id,
        question=item.question,
        options=wrong[:pos] + [item.answer] + wrong[pos:],
        answer=LETTERS[pos],
        subject=family,
        source=f"tars synthetic {family} (seed {seed})",
        cot=item.cot,
        difficulty=difficulty,
    )


def _check_item(item: Item) -> None:
    """A malformed item is a bug in a family, so it fails loudly rather than reaching a dataset."""
    options = [item.answer, *item.distractors]
    if len(options) != N_OPTIONS or len({o.casefold() for o in options}) != N_OPTIONS:
        raise ValueError(f"item needs {N_OPTIONS} distinct options, got {options!r} for {item.question!r}")
    if not item.cot.endswith(f"{item.answer}."):
        raise ValueError(f"cot must end with the answer {item.answer!r}: {item.cot!r}")
