"""Comparisons: who has more, which number is largest, who is tallest given a chain of facts.

Difficulty grows with what must be held in mind: two values (or four numbers read as the options),
then four people's values or a difference, then an order that is only implied by three relations
given in a shuffled order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tars.data.families._options import NAMES, Item, join_words, wrong_numbers

LEVELS = "1: two people or four numbers; 2: four people or a difference; 3: an order implied by relations"

#: Option for the two-person questions: wrong here by construction, since the two values always differ.
SAME = "They have the same"


@dataclass(frozen=True)
class Measure:
    """A numeric trait of a person, with the words each question shape needs."""

    full: str  # "{n} has {v} apples": the first mention, with the unit
    short: str  # "{n} has {v}": later mentions
    more: str  # "Who has more apples?"
    less: str
    most: str  # "Who has the most apples?"
    least: str
    by_how_much: str  # "How many more apples does {a} have than {b}?"
    low: int
    high: int


def _apples(obj: str) -> Measure:
    return Measure(
        full=f"{{n}} has {{v}} {obj}",
        short="{n} has {v}",
        more=f"Who has more {obj}?",
        less=f"Who has fewer {obj}?",
        most=f"Who has the most {obj}?",
        least=f"Who has the fewest {obj}?",
        by_how_much=f"How many more {obj} does {{a}} have than {{b}}?",
        low=2,
        high=20,
    )


MEASURES = (
    _apples("apples"),
    _apples("marbles"),
    _apples("stickers"),
    Measure(
        full="{n} is {v} years old",
        short="{n} is {v}",
        more="Who is older?",
        less="Who is younger?",
        most="Who is the oldest?",
        least="Who is the youngest?",
        by_how_much="How many years older is {a} than {b}?",
        low=4,
        high=15,
    ),
    Measure(
        full="{n} is {v} centimeters tall",
        short="{n} is {v}",
        more="Who is taller?",
        less="Who is shorter?",
        most="Who is the tallest?",
        least="Who is the shortest?",
        by_how_much="How many centimeters taller is {a} than {b}?",
        low=100,
        high=160,
    ),
    Measure(
        full="{n} weighs {v} kilograms",
        short="{n} weighs {v}",
        more="Who is heavier?",
        less="Who is lighter?",
        most="Who is the heaviest?",
        least="Who is the lightest?",
        by_how_much="How many kilograms heavier is {a} than {b}?",
        low=20,
        high=50,
    ),
)

#: (comparative, its opposite, superlative, opposite superlative) for the implied-order questions.
RELATIONS = (
    ("taller", "shorter", "tallest", "shortest"),
    ("older", "younger", "oldest", "youngest"),
    ("faster", "slower", "fastest", "slowest"),
    ("heavier", "lighter", "heaviest", "lightest"),
)


def make_item(rng: random.Random, difficulty: int) -> Item:
    if difficulty == 1:
        return _two_people(rng) if rng.random() < 0.6 else _four_numbers(rng)
    if difficulty == 2:
        return _four_people(rng) if rng.random() < 0.6 else _difference(rng)
    return _implied_order(rng)


def _two_people(rng: random.Random) -> Item:
    """The plain case; the extra name (never mentioned) catches a listener who lost track of who was named."""
    (a, _), (b, _), (stranger, _) = rng.sample(NAMES, 3)
    m = rng.choice(MEASURES)
    va, vb = rng.sample(range(m.low, m.high + 1), 2)
    ask_more = rng.random() < 0.5
    question = f"{m.full.format(n=a, v=va)}. {m.full.format(n=b, v=vb)}. {m.more if ask_more else m.less}"
    winner, loser = (a, b) if (va > vb) == ask_more else (b, a)
    hi, lo = max(va, vb), min(va, vb)
    said = f"{m.short.format(n=a, v=va)} and {m.short.format(n=b, v=vb)}"
    compared = f"{hi} is more than {lo}" if ask_more else f"{lo} is less than {hi}"
    cot = f"{said}. {compared}, so the answer is {winner}."
    return Item(question, winner, (loser, SAME, stranger), cot)


def _four_numbers(rng: random.Random) -> Item:
    """The options are the numbers, so the question itself stays short."""
    values = rng.sample(range(1, 51), 4)
    largest = rng.random() < 0.5
    pick = max(values) if largest else min(values)
    word = "largest" if largest else "smallest"
    question = f"Which of these numbers is the {word}?"
    rest = [v for v in values if v != pick]
    beats = f"{pick} is {'larger' if largest else 'smaller'} than {join_words([str(v) for v in rest])}"
    cot = f"{beats}. So the answer is {pick}."
    return Item(question, str(pick), tuple(str(v) for v in rest), cot)


def _four_people(rng: random.Random) -> Item:
    people = [n for n, _ in rng.sample(NAMES, 4)]
    m = rng.choice(MEASURES)
    values = rng.sample(range(m.low, m.high + 1), 4)
    ask_most = rng.random() < 0.5
    facts = [m.full.format(n=people[0], v=values[0])] + [
        m.short.format(n=p, v=v) for p, v in zip(people[1:], values[1:])
    ]
    question = f"{', '.join(facts[:-1])}, and {facts[-1]}. {m.most if ask_most else m.least}"
    pick = max(values) if ask_most else min(values)
    winner = people[values.index(pick)]
    extreme = "largest" if ask_most else "smallest"
    cot = f"The {extreme} number is {pick}, which is {winner}'s. So the answer is {winner}."
    return Item(question, winner, tuple(p for p in people if p != winner), cot)


def _difference(rng: random.Random) -> Item:
    """How much more: the wrong-operation slip (adding) is the distractor that matters."""
    (a, _), (b, _) = rng.sample(NAMES, 2)
    m = rng.choice(MEASURES)
    lo = rng.randint(m.low, m.high - 2)
    hi = rng.randint(lo + 2, min(m.high, lo + 15))
    question = f"{m.full.format(n=a, v=hi)}. {m.full.format(n=b, v=lo)}. {m.by_how_much.format(a=a, b=b)}"
    diff = hi - lo
    cot = f"{hi} minus {lo} is {diff}. So the answer is {diff}."
    return Item(question, str(diff), wrong_numbers(diff, [hi + lo, hi, lo], rng, lowest=1), cot)


def _implied_order(rng: random.Random) -> Item:
    """Three relations in a shuffled order, some said backwards, so the order must be rebuilt."""
    order = [n for n, _ in rng.sample(NAMES, 4)]
    more, less, most, least = rng.choice(RELATIONS)
    facts = []
    for top, below in zip(order, order[1:]):
        if rng.random() < 0.5:
            facts.append(f"{top} is {more} than {below}.")
        else:
            facts.append(f"{below} is {less} than {top}.")
    rng.shuffle(facts)
    ask_most = rng.random() < 0.5
    winner = order[0] if ask_most else order[-1]
    question = " ".join(facts) + f" Who is the {most if ask_most else least}?"
    cot = f"From {most} to {least} the order is {join_words(order)}. So the answer is {winner}."
    return Item(question, winner, tuple(n for n in order if n != winner), cot)
