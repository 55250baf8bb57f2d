"""Unit conversion: hours and minutes, meters and centimeters, kilograms and grams, dozens and eggs.

Difficulty: 1 converts a whole number of the big unit into the small one; 2 goes back the other way or
adds a remainder ("2 hours and 15 minutes"); 3 converts and then takes an amount away in a short story.
The distractors are the mistakes people make with units: the wrong factor (100 minutes in an hour),
adding the factor instead of multiplying, forgetting to convert or to add the remainder.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tars.data.families._options import NAMES, Item, count_phrase, wrong_numbers

LEVELS = "1: big unit to small; 2: small to big, or big plus a remainder; 3: convert, then subtract"


@dataclass(frozen=True)
class Unit:
    """A pair of units, `factor` small ones to one big one, and the factors people confuse it with."""

    big: str
    bigs: str
    small: str
    smalls: str
    factor: int
    wrong_factors: tuple[int, ...]
    remainder_step: int  # remainders in level 2 and amounts used in level 3 are multiples of this
    story: str | None = None  # level 3: "{n} has {amount}. {P} uses {used}. How many {smalls} are left?"


UNITS = (
    Unit(
        "hour", "hours", "minute", "minutes", 60, (100, 10, 24), 5,
        "{n} has {amount} of free time. {P} spends {used} reading. How many minutes are left?",
    ),
    Unit("minute", "minutes", "second", "seconds", 60, (100, 10), 5),
    Unit("day", "days", "hour", "hours", 24, (12, 60, 10), 1),
    Unit(
        "week", "weeks", "day", "days", 7, (5, 10, 12), 1,
        "{n} has a holiday of {amount}. {P} has used {used}. How many days are left?",
    ),
    Unit("year", "years", "month", "months", 12, (10, 52), 1),
    Unit(
        "meter", "meters", "centimeter", "centimeters", 100, (10, 1000), 10,
        "{n} has a rope {amount} long. {P} cuts off {used}. How many centimeters are left?",
    ),
    Unit(
        "kilogram", "kilograms", "gram", "grams", 1000, (100, 10), 100,
        "{n} has {amount} of flour. {P} uses {used}. How many grams are left?",
    ),
    Unit("kilometer", "kilometers", "meter", "meters", 1000, (100, 10), 100),
    Unit(
        "liter", "liters", "milliliter", "milliliters", 1000, (100, 10), 100,
        "{n} has {amount} of juice. {P} drinks {used}. How many milliliters are left?",
    ),
    Unit(
        "dozen", "dozen", "egg", "eggs", 12, (10, 6, 24), 1,
        "{n} buys {amount} eggs. {P} uses {used}. How many eggs are left?",
    ),
)  # fmt: skip


def make_item(rng: random.Random, difficulty: int) -> Item:
    if difficulty == 1:
        return _to_small(rng)
    if difficulty == 2:
        return _to_big(rng) if rng.random() < 0.5 else _with_remainder(rng)
    return _story(rng)


def _big(u: Unit, k: int) -> str:
    return count_phrase(k, u.big, u.bigs)


def _small(u: Unit, k: int) -> str:
    return count_phrase(k, u.small, u.smalls)


def _rule(u: Unit) -> str:
    return f"There are {_small(u, u.factor)} in 1 {u.big}"


def _to_small(rng: random.Random) -> Item:
    u = rng.choice(UNITS)
    k = rng.randint(1, 6)
    answer = k * u.factor
    question = f"How many {u.smalls} are in {_big(u, k)}?"
    work = "" if k == 1 else f", and {k} times {u.factor} is {answer}"
    cot = f"{_rule(u)}{work}. So the answer is {answer}."
    mistakes = [k * w for w in u.wrong_factors] + [k + u.factor, (k + 1) * u.factor, (k - 1) * u.factor]
    return Item(question, str(answer), wrong_numbers(answer, mistakes, rng, lowest=1, step=u.factor), cot)


def _to_big(rng: random.Random) -> Item:
    u = rng.choice(UNITS)
    k = rng.randint(2, 6)
    amount = k * u.factor
    question = f"How many {u.bigs} are in {_small(u, amount)}?"
    cot = f"{_rule(u)}, and {amount} divided by {u.factor} is {k}. So the answer is {k}."
    mistakes = [amount // w for w in u.wrong_factors if amount % w == 0] + [amount - u.factor, k * 2]
    return Item(question, str(k), wrong_numbers(k, mistakes, rng, lowest=1), cot)


def _with_remainder(rng: random.Random) -> Item:
    u = rng.choice(UNITS)
    k = rng.randint(1, 4)
    rest = u.remainder_step * rng.randint(1, u.factor // u.remainder_step - 1)
    whole = k * u.factor
    answer = whole + rest
    question = f"How many {u.smalls} are in {_big(u, k)} and {_small(u, rest)}?"
    converted = f"{_big(u, k)} is {_small(u, whole)}"
    cot = f"{converted}, and {whole} plus {rest} is {answer}. So the answer is {answer}."
    mistakes = [whole, k + rest, whole - rest, k * u.wrong_factors[0] + rest]
    wrong = wrong_numbers(answer, mistakes, rng, lowest=1, step=u.remainder_step)
    return Item(question, str(answer), wrong, cot)


def _story(rng: random.Random) -> Item:
    u = rng.choice([u for u in UNITS if u.story])
    name, pron = rng.choice(NAMES)
    k = rng.randint(1, 4)
    whole = k * u.factor
    used = u.remainder_step * rng.randint(1, whole // u.remainder_step - 1)
    answer = whole - used
    amount = f"{k} dozen" if u.big == "dozen" else _big(u, k)
    question = u.story.format(n=name, P=pron.capitalize(), amount=amount, used=_used(u, used))
    cot = f"{amount} is {_small(u, whole)}, and {whole} minus {used} is {answer}. So the answer is {answer}."
    mistakes = [whole + used, k * u.wrong_factors[0] - used, whole]
    wrong = wrong_numbers(answer, mistakes, rng, lowest=1, step=u.remainder_step)
    return Item(question, str(answer), wrong, cot)


def _used(u: Unit, used: int) -> str:
    """Eggs used are just "5"; everything else keeps its unit so the story says what was taken away."""
    return str(used) if u.big == "dozen" else _small(u, used)
