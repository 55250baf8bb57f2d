"""The mini world's named question sets, regenerated from seeds so that no file has to ship.

`mini:heldout` (200 questions, seed 1000) shares no question with any mini stage's training sets;
`mini:rl_train` (400, seed 4) and `mini:ctc_train` (2,400, seed 5) share none with `mini:heldout`.
`mini:test` (500, seed 2000) shares none with any of them: the set that measures the soft-CTC mini model
and the RL rows trained on `mini:rl_train` (a test set large enough for paired intervals of a few points).
"Shares none" is by question text: templates whose text is the same for every item (the options carry
the numbers) and the finite facts mostly stay out of the later sets, so mini:test's subject mix is not
mini:rl_train's (docs/results.md: facts 6 % against 22 %, arithmetic 33 % against 20 %).
They are the sets docs/results.md, `tars demo` and configs/mini*.yaml use; `resolve_data("mini:NAME")` writes them once to
`$TARS_HOME/sets/NAME.jsonl`, so every command that names a file can name them.
"""

from __future__ import annotations

from pathlib import Path

from tars.data.schema import Record
from tars.paths import tars_home

#: (n, seed) of the synthetic sets the mini stages trained on (configs/mini_sft*.yaml, mini_align*.yaml):
#: the held-out set excludes their questions.
STAGE_SETS = ((1600, 1), (800, 3), (640, 2))
HELDOUT = (200, 1000)
RL_SET = (400, 4)
CTC_SET = (2400, 5)
TEST = (500, 2000)
NAMES = ("heldout", "rl_train", "ctc_train", "test")


def mini_sets() -> tuple[list[Record], list[Record]]:
    """(held-out, RL training) records, the same on every machine."""
    from tars.data.families import FAMILIES, make_excluding, make_mixture

    names = list(FAMILIES)
    trained = {r.question for n, seed in STAGE_SETS for r in make_mixture(names, n, seed)}
    heldout = make_excluding(names, *HELDOUT, trained)
    train = make_excluding(names, *RL_SET, {r.question for r in heldout})
    return heldout, train


def mini_set_file(name: str) -> Path:
    """`$TARS_HOME/sets/NAME.jsonl`, written on first use."""
    from tars.data.jsonl import write_records

    from tars.data.families import FAMILIES, make_excluding, make_mixture

    path = tars_home() / "sets" / f"{name}.jsonl"
    if not path.exists():
        heldout, train = mini_sets()
        if name == "heldout":
            records = heldout
        elif name == "rl_train":
            records = train
        else:
            ctc = make_excluding(list(FAMILIES), *CTC_SET, {r.question for r in heldout})
            records = ctc
            if name == "test":
                seen = {r.question for n, seed in STAGE_SETS for r in make_mixture(list(FAMILIES), n, seed)}
                seen |= {r.question for r in heldout + train + ctc}
                records = make_excluding(list(FAMILIES), *TEST, seen)
        write_records(path, records)
    return path
