"""The mini table's assembly from finished rows (the rows themselves are `tars train` + `tars eval`,
tested in their own files)."""

import json

import pytest

from conftest import run_cli
from tars.experiment.mini_table import report_evals, row_cpu_minutes, row_minutes, write_report, write_table


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
    assert row_cpu_minutes(tmp_path / "tars") is None  # logged before tars measured CPU time
    lines = write_table(tmp_path).read_text().splitlines()
    assert "| base | 56.5 | 66.5 | +10.0 | 85.0 | 1.5 | – | – | 5.0 | – |" in lines
    assert "| cascade | 60.0 | – |  | 90.2 | 1.5 | – | – | 2.0 | – |" in lines
    assert "| tars | 58.0 | 66.0 | +8.0 | 87.2 | 1.5 | 25.0 | 26.0 | 16.0 | – |" in lines
    assert "| grpo | not run | | | | | | | | |" in lines


def test_cpu_minutes_sum_steps_and_evaluations_and_ignore_pauses(tmp_path):
    """A step paused for 10 minutes: its wall time says so, its CPU time does not."""
    eval_dir(tmp_path / "grpo" / "eval", speech=50.0, text=60.0, seconds=300)
    m = tmp_path / "grpo" / "eval" / "metrics.json"
    m.write_text(json.dumps(json.loads(m.read_text()) | {"cpu_seconds": {"heldout/speech": 480.0, "heldout/text": 120.0}}))
    steps = [{"step": 1, "time/step": 50.0, "time/cpu": 95.0}, {"step": 2, "time/step": 650.0, "time/cpu": 97.0}]
    (tmp_path / "grpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    assert row_minutes(tmp_path / "grpo") == (50 + 650 + 300) / 60
    assert row_cpu_minutes(tmp_path / "grpo") == (95 + 97 + 480 + 120) / 60
    eval_dir(tmp_path / "base" / "eval", speech=40.0, text=60.0)
    assert "| grpo | 50.0 | 60.0 | +10.0 | 83.3 | 1.5 | – | – | 16.7 | 13.2 |" in write_table(tmp_path).read_text()


def test_unknown_row_is_a_one_line_error(tmp_path):
    r = run_cli("experiment", "mini-table", "--rows", "tars,ppo", "--out", tmp_path)
    assert r.returncode == 2 and "unknown row(s) ppo" in r.stderr and "Traceback" not in r.stderr


def predictions(folder, correct_ids, ids=("q0", "q1", "q2", "q3"), modality="speech"):
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "dataset": "heldout", "modality": modality, "answer": "A",
             "pred": "A" if i in correct_ids else "B"} for i in ids]
    with open(folder / "eval" / "predictions.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    acc = 100 * len(correct_ids) / len(ids)
    m = folder / "eval" / "metrics.json"
    d = json.loads(m.read_text()) if m.exists() else {"datasets": {"heldout": {}}, "average": {}, "seconds": {}}
    d["datasets"]["heldout"][modality] = {"accuracy": acc, "unparseable": 0.0}
    d["average"][modality] = acc
    m.write_text(json.dumps(d))


def test_seeded_rows_and_paired_differences_averaged_over_seeds(tmp_path):
    """TARS seeds 0 and 1 against GRPO seeds 0 and 1: each question's correctness is averaged over a
    row's seeds before pairing. Speech by hand: tars per question (1, 1, .5, 0), grpo (.5, 0, 0, 0):
    differences (.5, 1, .5, 0), mean 50 points; the bootstrap interval holds the mean."""
    predictions(tmp_path / "base", {"q0"})
    predictions(tmp_path / "base", {"q0", "q1", "q2"}, modality="text")
    predictions(tmp_path / "tars", {"q0", "q1", "q2"})
    predictions(tmp_path / "tars_s1", {"q0", "q1"})
    predictions(tmp_path / "grpo", {"q0"})
    predictions(tmp_path / "grpo_s1", set())
    lines = write_table(tmp_path).read_text().splitlines()
    assert any(l.startswith("| tars_s1 | 50.0 | – |  | 66.7 |") for l in lines)  # MRR: 50 / 75 (base's text)
    assert any(l.startswith("| grpo_s1 | 0.0 |") for l in lines)
    # the row averaged over its seeds, what the paired lines compare: (75 + 50) / 2, MRR 62.5 / 75
    assert any(l.startswith("| tars (mean of 2 seeds) | 62.5 | – |  | 83.3 | 0.0 |") for l in lines)
    assert any(l.startswith("| grpo (mean of 2 seeds) | 12.5 |") for l in lines)
    assert not any(l.startswith("| base (mean") for l in lines)
    row = next(l for l in lines if l.startswith("| tars − grpo |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:5] == ["2 vs 2", "speech", "4", "+50.0"]
    lo, hi = (float(x) for x in cells[5].strip("[]").split(","))
    assert 0.0 <= lo <= 50.0 <= hi <= 100.0
    base_row = next(l for l in lines if l.startswith("| tars − base |"))
    assert "| 2 vs 1 | speech | 4 | +37.5 |" in base_row  # tars (1, 1, .5, 0) − base (1, 0, 0, 0)
    # seed to seed: tars_s1 (1, 1, 0, 0) − tars (1, 1, 1, 0), grpo_s1 (0, 0, 0, 0) − grpo (1, 0, 0, 0)
    assert any(l.startswith("| tars_s1 − tars | 1 vs 1 | speech | 4 | -25.0 |") for l in lines)
    assert any(l.startswith("| grpo_s1 − grpo | 1 vs 1 | speech | 4 | -25.0 |") for l in lines)
    assert lines.index(next(l for l in lines if l.startswith("Seed to seed"))) > lines.index(base_row)
    # the report: every seed, then the row pooled over its seeds
    ev = [str(e) for e in report_evals(tmp_path)]
    assert ev[:3] == [str(tmp_path / r / "eval") for r in ("base", "grpo", "grpo_s1")]
    assert ev[3] == f"grpo={tmp_path / 'grpo' / 'eval'},{tmp_path / 'grpo_s1' / 'eval'}"
    assert ev[-1].startswith("tars=") and len(ev) == 7
    # ... and its MRR, like table.md's, against base's text accuracy (75): tars_s1 50 / 75
    md = write_report(tmp_path).read_text()
    assert "| tars_s1 | 50.0 | – | 50.0 | – | – | 66.7 |" in md and "(75.0 %, given to the report)" in md


def test_layer_plot_waits_for_grpo_and_tars_then_runs_once(tmp_path, monkeypatch):
    """The layer analysis itself is tested in test_layers.py; here, which models it gets and when."""
    import tars.eval.layers as layers
    from tars.experiment.mini_table import LAYER_QUESTIONS, layer_plot

    calls = []

    def fake_run_layers(models, data, out, limit, completion, progress, names):
        calls.append((list(models), data, limit, completion, list(names)))
        out.mkdir(parents=True)
        (out / "layers.json").write_text("{}")

    monkeypatch.setattr(layers, "run_layers", fake_run_layers)
    for row in ("grpo", "tars_s1"):
        (tmp_path / row).mkdir()
        (tmp_path / row / "DONE").write_text("")
    assert layer_plot(tmp_path, "mini:test", "mini:soft") is None  # seed 0 of TARS not finished
    (tmp_path / "tars").mkdir()
    assert layer_plot(tmp_path, "mini:test", "mini:soft") is None
    (tmp_path / "tars" / "DONE").write_text("")
    assert layer_plot(tmp_path, "mini:test", "mini:soft") == tmp_path / "layers"
    assert layer_plot(tmp_path, "mini:test", "mini:soft") == tmp_path / "layers"
    assert calls == [(["mini:soft", str(tmp_path / "grpo" / "model"), str(tmp_path / "tars" / "model")],
                      "mini:test", LAYER_QUESTIONS, "gold", ["base", "grpo", "tars"])]


def test_seed_mean_correct_names_a_row_without_predictions(tmp_path):
    from tars.errors import UserError
    from tars.experiment.mini_table import seed_mean_correct

    (tmp_path / "grpo" / "eval").mkdir(parents=True)
    with pytest.raises(UserError, match="grpo/eval: no predictions.jsonl"):
        seed_mean_correct([tmp_path / "grpo"])


def test_every_other_trained_row_against_grpo_and_base(tmp_path):
    """The ablation block, between the headline comparisons and seed to seed. Speech by hand: base
    (1, 0, 0, 0), grpo over its seeds (.5, 0, 0, 0), sft (1, 1, 1, 1): sft − grpo = mean(.5, 1, 1, 1) =
    87.5 points, sft − base = 75.0, grpo − base = −12.5; dpo has no predictions and no line."""
    predictions(tmp_path / "base", {"q0"})
    predictions(tmp_path / "grpo", {"q0"})
    predictions(tmp_path / "grpo_s1", set())
    predictions(tmp_path / "tars", {"q0", "q1"})
    predictions(tmp_path / "sft", {"q0", "q1", "q2", "q3"})
    lines = write_table(tmp_path).read_text().splitlines()
    at = {k: next(i for i, l in enumerate(lines) if l.startswith(k))
          for k in ("| tars − base |", "Every other", "| grpo − base |", "| sft − grpo |", "| sft − base |",
                    "Seed to seed")}
    assert list(at.values()) == sorted(at.values())
    assert "| 2 vs 1 | speech | 4 | -12.5 |" in lines[at["| grpo − base |"]]
    assert "| 1 vs 2 | speech | 4 | +87.5 |" in lines[at["| sft − grpo |"]]
    assert "| 1 vs 1 | speech | 4 | +75.0 |" in lines[at["| sft − base |"]]
    assert not any(l.startswith("| dpo −") for l in lines)
    assert sum(l.startswith("| tars − grpo |") for l in lines) == 1  # TARS is a headline, not an ablation
