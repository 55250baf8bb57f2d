"""The mini table's assembly from finished rows (the rows themselves are `tars train` + `tars eval`,
tested in their own files)."""

import json

from conftest import run_cli
from tars.experiment.mini_table import row_minutes, write_table


def eval_dir(folder, speech=None, text=None, cascade=None, seconds=60.0):
    folder.mkdir(parents=True)
    d = {}
    for mod, acc in (("speech", speech), ("text", text), ("cascade", cascade)):
        if acc is not None:
            d[mod] = {"accuracy": acc, "unparseable": 1.5}
    (folder / "metrics.json").write_text(json.dumps({"datasets": {"heldout": d}, "seconds": {"heldout/x": seconds}}))


def test_table_from_finished_rows(tmp_path):
    eval_dir(tmp_path / "base" / "eval", speech=56.5, text=66.5, seconds=300)
    eval_dir(tmp_path / "cascade" / "eval", cascade=60.0, seconds=120)
    eval_dir(tmp_path / "tars" / "eval", speech=58.0, text=66.0, seconds=300)
    eval_dir(tmp_path / "tars" / "eval_obqa", speech=25.0, text=26.0, seconds=60)
    (tmp_path / "tars" / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "time/step": 30.0}) + "\n"
                                                             for i in range(1, 21)))
    assert row_minutes(tmp_path / "tars") == (20 * 30 + 300 + 60) / 60
    lines = write_table(tmp_path).read_text().splitlines()
    assert "| base | 56.5 | 66.5 | +10.0 | 1.5 | – | – | 5.0 |" in lines
    assert "| cascade | 60.0 | – |  | 1.5 | – | – | 2.0 |" in lines
    assert "| tars | 58.0 | 66.0 | +8.0 | 1.5 | 25.0 | 26.0 | 16.0 |" in lines
    assert "| grpo | not run | | | | | | |" in lines


def test_unknown_row_is_a_one_line_error(tmp_path):
    r = run_cli("experiment", "mini-table", "--rows", "tars,ppo", "--out", tmp_path)
    assert r.returncode == 2 and "unknown row(s) ppo" in r.stderr and "Traceback" not in r.stderr
