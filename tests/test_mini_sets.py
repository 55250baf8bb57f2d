"""The mini world's named sets (`mini:heldout`, `mini:rl_train`, `mini:ctc_train`, `mini:test`): every command that
takes a data file can name them on a fresh machine, and they never share a question with the held-out set."""

import pytest

from tars.data.bundled import resolve_data
from tars.data.jsonl import read_records
from tars.data.mini_sets import mini_sets
from tars.errors import UserError


def test_named_sets_are_written_once_and_disjoint_from_heldout(tmp_path, monkeypatch):
    heldout_path = resolve_data("mini:heldout")
    assert heldout_path.exists() and heldout_path.parent.parent == tmp_path / "tars_home"
    heldout = read_records(heldout_path)
    rl = read_records(resolve_data("mini:rl_train"))
    ctc = read_records(resolve_data("mini:ctc_train"))
    assert (len(heldout), len(rl), len(ctc)) == (200, 400, 2400)
    held_q = {r.question for r in heldout}
    assert not held_q & {r.question for r in rl} and not held_q & {r.question for r in ctc}
    # the files hold exactly the seeded draws the demo uses
    want_heldout, want_rl = mini_sets()
    assert [r.id for r in heldout] == [r.id for r in want_heldout]
    assert [r.id for r in rl] == [r.id for r in want_rl]
    # mini:test shares no question with any set a mini stage or RL row trains on, nor with mini:heldout
    from tars.data.families import FAMILIES, make_mixture
    from tars.data.mini_sets import STAGE_SETS

    test = read_records(resolve_data("mini:test"))
    assert len(test) == 500
    stages = {r.question for n, seed in STAGE_SETS for r in make_mixture(list(FAMILIES), n, seed)}
    assert not {r.question for r in test} & (held_q | {r.question for r in rl + ctc} | stages)
    mtime = heldout_path.stat().st_mtime_ns
    assert resolve_data("mini:heldout").stat().st_mtime_ns == mtime  # not rewritten


def test_unknown_names_are_refused():
    with pytest.raises(UserError, match="mini:nope: unknown data set"):
        resolve_data("mini:nope")
