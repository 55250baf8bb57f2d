"""Small facts a tiny model can actually know: legs, wheels and sides; everyday common sense; the order
of days and months.

This is the family a 135M model should mostly get right, so a gap between hearing and reading it is a
gap in listening, not in knowledge. Difficulty: 1 is the fact itself; 2 uses it once (legs of 3 dogs,
two days after Monday); 3 combines two facts (legs of 2 dogs and 3 birds) or counts further round the
week or the year.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tars.data.families._options import Item, join_words, with_article, wrong_numbers, wrong_words

LEVELS = "1: one fact; 2: a fact used once; 3: two facts combined, or a longer count of days or months"


@dataclass(frozen=True)
class Thing:
    """Something with a fixed number of parts: "a spider has 8 legs"."""

    one: str
    many: str
    part: str
    count: int


THINGS = (
    Thing("spider", "spiders", "legs", 8),
    Thing("ant", "ants", "legs", 6),
    Thing("bee", "bees", "legs", 6),
    Thing("dog", "dogs", "legs", 4),
    Thing("cat", "cats", "legs", 4),
    Thing("horse", "horses", "legs", 4),
    Thing("cow", "cows", "legs", 4),
    Thing("chair", "chairs", "legs", 4),
    Thing("bird", "birds", "legs", 2),
    Thing("duck", "ducks", "legs", 2),
    Thing("chicken", "chickens", "legs", 2),
    Thing("bicycle", "bicycles", "wheels", 2),
    Thing("tricycle", "tricycles", "wheels", 3),
    Thing("car", "cars", "wheels", 4),
    Thing("triangle", "triangles", "sides", 3),
    Thing("square", "squares", "sides", 4),
    Thing("pentagon", "pentagons", "sides", 5),
    Thing("hexagon", "hexagons", "sides", 6),
    Thing("hand", "hands", "fingers", 5),
    Thing("octopus", "octopuses", "arms", 8),
)

#: (question, answer, distractors, reason): each distractor plainly wrong to an adult, so exactly one is
#: right; the reason is the one-sentence gold chain of thought.
COMMON_SENSE = (
    ("What color is the sky on a clear day?", "blue", ("green", "red", "brown"), "On a clear day the sky is blue."),
    ("What color is grass?", "green", ("blue", "red", "purple"), "Grass is green."),
    ("What color is snow?", "white", ("black", "green", "red"), "Snow is white."),
    ("What color is a ripe banana?", "yellow", ("blue", "purple", "black"), "A ripe banana is yellow."),
    ("Which animal says moo?", "a cow", ("a dog", "a cat", "a duck"), "A cow says moo."),
    ("Which animal barks?", "a dog", ("a cow", "a fish", "a duck"), "A dog barks."),
    ("Which animal says quack?", "a duck", ("a cow", "a horse", "a sheep"), "A duck says quack."),
    ("What do bees make?", "honey", ("milk", "bread", "wool"), "Bees make honey."),
    ("What do hens lay?", "eggs", ("milk", "honey", "apples"), "Hens lay eggs."),
    ("Where do fish live?", "in water", ("in trees", "in the sky", "in the sand"), "Fish live in water."),
    ("What do you use to cut paper?", "scissors", ("a spoon", "a pillow", "a cup"), "Scissors cut paper."),
    ("What do you wear on your feet?", "shoes", ("hats", "gloves", "scarves"), "We wear shoes on our feet."),
    ("What do you wear on your head?", "a hat", ("a shoe", "a sock", "a glove"), "We wear a hat on our head."),
    ("Which season is the coldest?", "winter", ("summer", "spring", "autumn"), "Winter is the coldest season."),
    ("Which season is the hottest?", "summer", ("winter", "spring", "autumn"), "Summer is the hottest season."),
    (
        "Which animal is the biggest?", "an elephant", ("a mouse", "a cat", "a rabbit"),
        "An elephant is much bigger than a mouse, a cat or a rabbit.",
    ),
    (
        "Which animal is the smallest?", "an ant", ("a horse", "a dog", "a cow"),
        "An ant is much smaller than a horse, a dog or a cow.",
    ),
    ("What do birds use to fly?", "wings", ("fins", "wheels", "roots"), "Birds fly with their wings."),
    ("What do fish use to swim?", "fins", ("wings", "wheels", "roots"), "Fish swim with their fins."),
    (
        "What do you drink when you are thirsty?", "water", ("sand", "paper", "stones"),
        "We drink water when we are thirsty.",
    ),
    ("What do you use to see?", "eyes", ("ears", "knees", "feet"), "We see with our eyes."),
    ("What do you use to hear?", "ears", ("eyes", "knees", "feet"), "We hear with our ears."),
    ("Which of these is hot?", "fire", ("ice", "snow", "cold water"), "Fire is hot, and the others are cold."),
    ("Which of these can fly?", "a bird", ("a dog", "a fish", "a cow"), "A bird can fly, and the others cannot."),
    ("Which of these is a fruit?", "an apple", ("a chair", "a shoe", "a car"), "An apple is a fruit."),
)  # fmt: skip

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


def make_item(rng: random.Random, difficulty: int) -> Item:
    roll = rng.random()
    if difficulty == 1:
        if roll < 0.35:
            return _parts(rng)
        return _common_sense(rng) if roll < 0.7 else _calendar(rng, 1)
    if difficulty == 2:
        return _parts_of_many(rng) if roll < 0.6 else _calendar(rng, 2)
    return _parts_of_two_kinds(rng) if roll < 0.6 else _calendar(rng, rng.randint(3, 5))


def _parts(rng: random.Random) -> Item:
    t = rng.choice(THINGS)
    question = f"How many {t.part} does {with_article(t.one)} have?"
    cot = f"{with_article(t.one).capitalize()} has {t.count} {t.part}. So the answer is {t.count}."
    mistakes = [o.count for o in THINGS if o.part == t.part] + [t.count * 2]
    return Item(question, str(t.count), wrong_numbers(t.count, mistakes, rng, lowest=1), cot)


def _parts_of_many(rng: random.Random) -> Item:
    """The fact used once: the slips are adding instead of multiplying and forgetting to multiply."""
    t = rng.choice(THINGS)
    k = rng.randint(2, 5)
    answer = k * t.count
    question = f"How many {t.part} do {k} {t.many} have?"
    fact = f"{with_article(t.one).capitalize()} has {t.count} {t.part}"
    cot = f"{fact}, and {k} times {t.count} is {answer}. So the answer is {answer}."
    mistakes = [k + t.count, t.count, (k + 1) * t.count, (k - 1) * t.count]
    return Item(question, str(answer), wrong_numbers(answer, mistakes, rng, lowest=1), cot)


def _parts_of_two_kinds(rng: random.Random) -> Item:
    """Two facts combined; the two kinds always differ in count, so using one count for both is wrong."""
    a = rng.choice([t for t in THINGS if t.part in ("legs", "wheels", "sides")])
    b = rng.choice([t for t in THINGS if t.part == a.part and t.count != a.count])
    ka, kb = rng.sample(range(1, 5), 2)
    pa, pb = ka * a.count, kb * b.count
    answer = pa + pb
    name_a, name_b = (a.one if ka == 1 else a.many), (b.one if kb == 1 else b.many)
    question = f"How many {a.part} do {ka} {name_a} and {kb} {name_b} have?"
    cot = (
        f"{ka} {name_a} {'has' if ka == 1 else 'have'} {pa} {a.part} and {kb} {name_b} "
        f"{'has' if kb == 1 else 'have'} {pb}. {pa} plus {pb} is {answer}. So the answer is {answer}."
    )
    mistakes = [(ka + kb) * a.count, (ka + kb) * b.count, pa, pb, ka + kb + a.count + b.count]
    return Item(question, str(answer), wrong_numbers(answer, mistakes, rng, lowest=1), cot)


def _common_sense(rng: random.Random) -> Item:
    question, answer, wrong, reason = rng.choice(COMMON_SENSE)
    return Item(question, answer, wrong, f"{reason} So the answer is {answer}.")


def _calendar(rng: random.Random, shift: int) -> Item:
    """Days or months counted round their cycle; the slips are one too many, one too few, or the wrong way."""
    cycle, unit, units = (DAYS, "day", "days") if rng.random() < 0.5 else (MONTHS, "month", "months")
    start = rng.randrange(len(cycle))
    after = rng.random() < 0.5
    sign = 1 if after else -1
    direction = "after" if after else "before"
    path = [cycle[(start + sign * j) % len(cycle)] for j in range(1, shift + 1)]
    answer = path[-1]
    if shift == 1:
        question = f"Which {unit} comes just {direction} {cycle[start]}?"
        cot = f"The {unit} {direction} {cycle[start]} is {answer}."
    else:
        question = f"Which {unit} is {shift} {units} {direction} {cycle[start]}?"
        cot = f"Counting {direction} {cycle[start]} gives {join_words(path)}."
    near = [cycle[(start + sign * s) % len(cycle)] for s in (shift + 1, shift - 1, -shift)]
    return Item(question, answer, wrong_words(answer, near, cycle, rng), f"{cot} So the answer is {answer}.")
