"""Arithmetic word problems: someone's pile of things changes one, two or three times.

Difficulty is the number of operations, so a model's accuracy by level shows how far it can carry a
running total. Numbers stay small (starting piles under 16, changes under 10) because the point is
holding the steps together after hearing them, not long arithmetic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tars.data.families._options import NAMES, Item, wrong_numbers

LEVELS = "number of operations (1, 2 or 3)"

OBJECTS = (
    "apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells", "balloons", "coins",
)  # fmt: skip

_ADD_SENTENCES = ("{P} buys {k} more.", "{P} finds {k} more.", "{Other} gives {o} {k} more.")
_SUB_SENTENCES = ("{P} gives {k} to {Other}.", "{P} loses {k}.")
_OBJECT_PRONOUN = {"he": "him", "she": "her"}


@dataclass(frozen=True)
class Step:
    """One change to the pile: `op` is "plus" or "minus", the word the chain of thought says."""

    op: str
    k: int

    def apply(self, total: int) -> int:
        return total + self.k if self.op == "plus" else total - self.k

    def flipped(self) -> Step:
        """The wrong-operation mistake: adding what should be taken away, or the reverse."""
        return Step("minus" if self.op == "plus" else "plus", self.k)


def make_item(rng: random.Random, difficulty: int) -> Item:
    if difficulty == 1 and rng.random() < 0.25:
        return _sharing(rng)
    return _changes(rng, difficulty)


def _changes(rng: random.Random, difficulty: int) -> Item:
    """A pile that changes by adding and taking away; a grouped start ("3 bags of 4") counts as a step."""
    (name, pron), (other, _) = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    grouped = rng.random() < 0.35
    if grouped:
        bags, each = rng.randint(2, 5), rng.randint(2, 6)
        start = bags * each
        opening = f"{name} has {bags} bags with {each} {obj} in each."
        work = [f"{bags} times {each} is {start}"]
    else:
        start = rng.randint(3, 15)
        opening = f"{name} has {start} {obj}."
        work = []
    steps = _random_steps(rng, start, difficulty - len(work))
    sentences = [opening]
    total = start
    for j, step in enumerate(steps):
        sentences.append(_say_step(rng, step, pron, other, then=j > 0 or grouped))
        work.append(f"{total} {step.op} {step.k} is {step.apply(total)}")
        total = step.apply(total)
    question = " ".join(sentences) + f" How many {obj} does {name} have{' now' if steps else ''}?"
    cot = _capital(", then ".join(work)) + f". So the answer is {total}."
    mistakes = _mistakes(start, steps)
    if grouped:
        mistakes += [_run(bags + each, steps), _run(start - each, steps), _run(start + each, steps)]
    return Item(question, str(total), wrong_numbers(total, mistakes, rng, lowest=1), cot)


def _sharing(rng: random.Random) -> Item:
    """The one-step division problem: a pile put into equal bags."""
    name, pron = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    bags, each = rng.randint(2, 5), rng.randint(2, 6)
    total = bags * each
    question = (
        f"{name} has {total} {obj}. {_capital(pron)} puts them into {bags} equal bags. "
        f"How many {obj} are in each bag?"
    )
    cot = f"{total} divided by {bags} is {each}. So the answer is {each}."
    mistakes = [total - bags, total + bags, bags, total]
    return Item(question, str(each), wrong_numbers(each, mistakes, rng, lowest=1), cot)


def _random_steps(rng: random.Random, start: int, count: int) -> list[Step]:
    """Add or take away small amounts, never letting the pile drop below 1."""
    steps: list[Step] = []
    total = start
    for _ in range(count):
        if total >= 3 and rng.random() < 0.5:
            step = Step("minus", rng.randint(1, min(9, total - 1)))
        else:
            step = Step("plus", rng.randint(2, 9))
        steps.append(step)
        total = step.apply(total)
    return steps


def _say_step(rng: random.Random, step: Step, pron: str, other: str, then: bool) -> str:
    template = rng.choice(_ADD_SENTENCES if step.op == "plus" else _SUB_SENTENCES)
    if then:
        template = "Then " + template.replace("{P}", "{p}")
    return template.format(P=_capital(pron), p=pron, k=step.k, Other=other, o=_OBJECT_PRONOUN[pron])


def _run(start: int, steps: list[Step]) -> int:
    total = start
    for step in steps:
        total = step.apply(total)
    return total


def _mistakes(start: int, steps: list[Step]) -> list[int]:
    """The slips a listener makes: wrong operation on a step, a step forgotten, every number added up."""
    out = [_run(start, steps[:-1])] if steps else []
    for j in range(len(steps)):
        out.append(_run(start, steps[:j] + [steps[j].flipped()] + steps[j + 1 :]))
    out.append(start + sum(s.k for s in steps))
    return out


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
