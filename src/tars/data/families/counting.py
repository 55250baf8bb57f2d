"""Counting and ordering: neighbours of a number, counting a category in a list, skip counting, and
alphabetical order.

Difficulty: 1 is one look (the number after 17, a category in four words); 2 needs a rule (counting by
twos, fives or tens, six words, first letters); 3 needs a harder rule (counting back or by threes and
fours, eight words, words that share their first letter).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tars.data.families._options import Item, join_words, with_article, wrong_numbers

LEVELS = "1: one look; 2: a simple rule or a longer list; 3: a harder rule or a long list"


@dataclass(frozen=True)
class Category:
    singular: str
    plural: str
    words: tuple[str, ...]


#: Disjoint on purpose (no "orange", "plum" or "cherry", which are colours too): exactly one count is right.
CATEGORIES = (
    Category("fruit", "fruits", ("apple", "pear", "banana", "grape", "lemon", "mango", "melon", "kiwi")),
    Category("animal", "animals", ("dog", "cat", "horse", "cow", "lion", "tiger", "rabbit", "duck", "sheep")),
    Category("color", "colors", ("red", "blue", "green", "yellow", "purple", "pink", "brown", "white")),
    Category("vehicle", "vehicles", ("car", "bus", "train", "bike", "boat", "plane", "truck")),
)
#: Things in none of the categories, to pad the lists.
FILLERS = (
    "chair", "table", "spoon", "shoe", "book", "lamp", "door", "cup", "hat", "bed", "pencil", "sock", "clock",
)  # fmt: skip

#: Words grouped by first letter, each group with distinct second letters, for the level-3 ordering.
SAME_START = (
    ("bag", "bed", "bird", "boat", "bus", "brush"),
    ("cat", "chair", "city", "cow", "cup", "clock"),
    ("sand", "seal", "ship", "sink", "sock", "sun", "star", "snow"),
    ("pan", "pen", "pig", "pot", "plate", "purse"),
    ("table", "tent", "tiger", "toy", "tree", "tub"),
    ("map", "melon", "milk", "moon", "mug"),
)
#: Simple nouns with many different first letters, for the level-2 ordering.
ORDER_WORDS = (
    "apple", "ball", "cake", "dog", "egg", "fish", "goat", "hat", "ink", "jam", "kite", "lamp", "moon",
    "nest", "owl", "pig", "queen", "rain", "sun", "tree", "van", "wolf", "yarn", "zoo",
)  # fmt: skip

_STEP_WORDS = {2: "twos", 3: "threes", 4: "fours", 5: "fives", 10: "tens"}


def make_item(rng: random.Random, difficulty: int) -> Item:
    kind = rng.randrange(3)
    if kind == 0:
        return _category_count(rng, length=2 + 2 * difficulty)
    if kind == 1:
        return _neighbour(rng) if difficulty == 1 else _skip_count(rng, difficulty)
    if difficulty == 1:
        return _category_count(rng, length=4)
    return _alphabetical(rng, same_start=difficulty == 3)


def _category_count(rng: random.Random, length: int) -> Item:
    """Counting members, with the slips of counting the others or the whole list as distractors."""
    cat = rng.choice(CATEGORIES)
    k = rng.randint(1, length - 1)
    others = [w for c in CATEGORIES if c is not cat for w in c.words] + list(FILLERS)
    members = rng.sample(cat.words, k)
    words = members + rng.sample(others, length - k)
    rng.shuffle(words)
    members = [w for w in words if w in members]
    question = f"How many of these are {cat.plural}: {', '.join(words)}?"
    if k == 1:
        found = f"Only {members[0]} is {with_article(cat.singular)}"
    else:
        found = f"The {cat.plural} are {join_words(members)}"
    cot = f"{found}. That makes {k}, so the answer is {k}."
    return Item(question, str(k), wrong_numbers(k, [length - k, length, k + 1], rng, lowest=0), cot)


def _neighbour(rng: random.Random) -> Item:
    n = rng.randint(5, 98)
    shape = rng.randrange(3)
    if shape == 0:
        question, answer, mistakes = f"What number comes just after {n}?", n + 1, [n - 1, n + 10, n + 2]
        cot = f"One more than {n} is {n + 1}. So the answer is {n + 1}."
    elif shape == 1:
        question, answer, mistakes = f"What number comes just before {n}?", n - 1, [n + 1, n - 10, n - 2]
        cot = f"One less than {n} is {n - 1}. So the answer is {n - 1}."
    else:
        question, answer, mistakes = f"What number comes between {n - 1} and {n + 1}?", n, [n - 1, n + 1]
        cot = f"{n - 1}, then {n}, then {n + 1}. So the answer is {n}."
    return Item(question, str(answer), wrong_numbers(answer, mistakes, rng), cot)


def _skip_count(rng: random.Random, difficulty: int) -> Item:
    """Three terms of a count and the next; level 3 counts back, or by the less familiar threes and fours."""
    if difficulty == 2:
        step, back = rng.choice((2, 5, 10)), False
    else:
        step, back = rng.choice((2, 3, 4, 5)), True
        if step in (3, 4) and rng.random() < 0.5:
            back = False
    sign = -1 if back else 1
    offset = 0 if rng.random() < 0.7 else rng.randint(1, step - 1)
    first = step * (rng.randint(4, 12) if back else rng.randint(0, 10)) + offset
    terms = [first + sign * step * j for j in range(3)]
    answer = terms[-1] + sign * step
    how = f"Count {'back ' if back else ''}by {_STEP_WORDS[step]}"
    question = f"{how}: {', '.join(map(str, terms))}. What number comes next?"
    rule = f"Each number is {step} {'less' if back else 'more'} than the one before."
    cot = f"{rule} {terms[-1]} {'minus' if back else 'plus'} {step} is {answer}. So the answer is {answer}."
    mistakes = [terms[-1] + sign, answer + sign * step, terms[-1] - sign * step, answer + sign]
    return Item(question, str(answer), wrong_numbers(answer, mistakes, rng), cot)


def _alphabetical(rng: random.Random, same_start: bool) -> Item:
    """Which word is first or last; with a shared first letter the second letter decides."""
    group = rng.choice(SAME_START) if same_start else ORDER_WORDS
    words = rng.sample(group, 4)
    first = rng.random() < 0.5
    pick = min(words) if first else max(words)
    question = f"Which word comes {'first' if first else 'last'} in alphabetical order?"
    order = "before" if first else "after"
    if same_start:
        reason = (
            f"They all start with {pick[0]}. "
            f"The second letter of {pick} is {pick[1]}, which comes {order} the others."
        )
    else:
        reason = f"The first letter of {pick} is {pick[0]}, which comes {order} the others."
    cot = f"{reason} So the answer is {pick}."
    return Item(question, pick, tuple(w for w in words if w != pick), cot)
