"""Synthetic multiple-choice families for the mini world: questions a 135M model can learn to answer,
short enough to be read aloud by espeak-ng.

Each item is drawn from its own generator, seeded by (family, seed, index), so a dataset is the same on
every machine and the first k items of a longer set are exactly a shorter set: prefixes can be reused
and a run can be extended without changing what was already trained or evaluated on.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tars.data.families import arithmetic, comparison, counting, facts, units
from tars.data.families._options import Item, to_record
from tars.data.schema import Record
from tars.errors import UserError

DIFFICULTIES = (1, 2, 3)
#: Fresh draws (from the item's own generator) before a repeated question is accepted: small families
#: such as the level-1 facts run out of new questions, and a repeat beats failing.
MAX_TRIES = 8


@dataclass(frozen=True)
class Family:
    """A named question generator; `levels` says what difficulty 1 to 3 means for it."""

    name: str
    id_prefix: str
    levels: str
    make_item: Callable[[random.Random, int], Item]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("arithmetic", "arith", arithmetic.LEVELS, arithmetic.make_item),
        Family("comparison", "cmp", comparison.LEVELS, comparison.make_item),
        Family("counting", "count", counting.LEVELS, counting.make_item),
        Family("units", "units", units.LEVELS, units.make_item),
        Family("facts", "facts", facts.LEVELS, facts.make_item),
    )
}


def family_names() -> list[str]:
    return list(FAMILIES)


def make_family(name: str, n: int, seed: int, difficulty: int | None = None) -> list[Record]:
    """`n` records of family `name`; `difficulty` None draws a level from 1 to 3 for each item.

    The level is drawn from one generator and the item from another seeded with that level, so a
    single-level set holds the mixed set's questions wherever that drew the same level (repeats aside), and
    sets of different levels are unrelated (one seed shared across levels gives no look-alike items).
    A single-level set's ids carry the level (`arith-s0-d2-00000`) so sets of different levels can be
    pooled without clashing ids.
    """
    family = _lookup(name)
    _check_args(n, difficulty)
    seen: set[tuple[str, ...]] = set()
    records = []
    for i in range(n):
        level = difficulty or random.Random(f"{name}:{seed}:{i}").choice(DIFFICULTIES)
        rng = random.Random(f"{name}:{seed}:{i}:{level}")
        item = _fresh_item(family, rng, level, seen)
        seen.add(_key(item))
        level_tag = "" if difficulty is None else f"d{level}-"
        rid = f"{family.id_prefix}-s{seed}-{level_tag}{i:05d}"
        records.append(to_record(item, rng, record_id=rid, family=name, seed=seed, difficulty=level))
    return records


def _fresh_item(family: Family, rng: random.Random, level: int, seen: set[tuple[str, ...]]) -> Item:
    item = family.make_item(rng, level)
    for _ in range(MAX_TRIES - 1):
        if _key(item) not in seen:
            break
        item = family.make_item(rng, level)
    return item


def _key(item: Item) -> tuple[str, ...]:
    """Question plus option set: "Which of these numbers is the largest?" differs only in its options."""
    return (item.question, *sorted((item.answer, *item.distractors)))


def _lookup(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown family {name!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _check_args(n: int, difficulty: int | None) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"number of items must be a whole number of at least 1, got {n!r}")
    if difficulty is not None and (
        isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty not in DIFFICULTIES
    ):
        raise UserError(f"difficulty must be 1, 2 or 3 (or left out for a mix), got {difficulty!r}")


def make_mixture(names: list[str], n: int, seed: int, difficulty: int | None = None) -> list[Record]:
    """`n` items spread evenly over families `names`, interleaved in a seeded order.

    Each family's items are a prefix of `make_family(name, ·, seed)`, so a larger mixture with the same
    seed contains the smaller one's items (train and eval sets use different seeds).
    """
    if not names:
        raise UserError("a mixture needs at least one family")
    _check_args(n, difficulty)  # before n is split over the families, so the error names the n given
    for name in names:
        _lookup(name)
    per = [n // len(names) + (1 if i < n % len(names) else 0) for i in range(len(names))]
    records = [r for name, k in zip(names, per) if k for r in make_family(name, k, seed, difficulty)]
    random.Random(f"mixture:{seed}").shuffle(records)
    return records


def make_excluding(names: list[str], n: int, seed: int, exclude: set[str], difficulty: int | None = None) -> list[Record]:
    """`n` items whose question text is not in `exclude` (held-out sets), drawing twice as many items
    until enough survive."""
    _check_args(n, difficulty)

    def draw(k: int) -> list[Record]:
        return make_family(names[0], k, seed, difficulty) if len(names) == 1 else make_mixture(names, k, seed, difficulty)

    k = n
    records = [r for r in draw(k) if r.question not in exclude]
    while len(records) < n and k < 16 * n:
        k *= 2
        records = [r for r in draw(k) if r.question not in exclude]
    if len(records) < n:
        raise UserError(f"only {len(records)} questions of {', '.join(names)} are not in the excluded sets")
    return records[:n]
