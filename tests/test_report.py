"""`tars report` from fixture folders: the table's numbers, valid PNGs, self-contained HTML."""

import json

import pytest

from conftest import run_cli
from tars.errors import UserError
from tars.eval.report import build_report, results_table


def eval_metrics(sa, ta, mrr=None):
    m = {"datasets": {"heldout": {"speech": {"accuracy": sa}, "text": {"accuracy": ta}, "gap": ta - sa}},
         "average": {"speech": sa, "text": ta}, "gap": ta - sa}
    if mrr is not None:
        m["mrr"] = mrr
    return m


def make_fixture(tmp_path):
    ev = tmp_path / "eval_base"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps(eval_metrics(56.5, 66.5, 85.0)))
    run = tmp_path / "run_tars"
    run.mkdir()
    rows = [{"step": i + 1, "speech/acc": 0.5 + 0.01 * i, "text/acc": 0.6, "speech/base": 0.7, "speech/rep": 0.9,
             "speech/beh": 0.8, "text/base": 0.9, "loss": 0.1} for i in range(30)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ev, run


def test_results_table_in_the_papers_layout():
    lines = results_table({"base": eval_metrics(56.5, 66.5, 85.0), "tars": eval_metrics(60.0, 66.0)})
    assert lines[0] == "| model | heldout A | heldout T | Avg(A) | Avg(T) | Gap | MRR |"
    assert lines[2] == "| base | 56.5 | 66.5 | 56.5 | 66.5 | 10.0 | 85.0 |"
    assert lines[3] == "| tars | 60.0 | 66.0 | 60.0 | 66.0 | 6.0 | – |"


def test_a_backbone_given_to_the_report_is_every_row_s_mrr_denominator():
    # 56.5 / 80 = 70.625 (its stored 85.0 came from another backbone figure); 60 / 80 = 75.
    lines = results_table({"base": eval_metrics(56.5, 66.5, 85.0), "tars": eval_metrics(60.0, 66.0)},
                          backbone_text=80.0)
    assert lines[2] == "| base | 56.5 | 66.5 | 56.5 | 66.5 | 10.0 | 70.6 |"
    assert lines[3] == "| tars | 60.0 | 66.0 | 60.0 | 66.0 | 6.0 | 75.0 |"


def test_report_backbone_text_from_an_eval_folder_and_a_bad_one(tmp_path):
    ev, _ = make_fixture(tmp_path)
    backbone = tmp_path / "backbone_eval"
    backbone.mkdir()
    (backbone / "metrics.json").write_text(json.dumps(eval_metrics(30.0, 80.0)))
    r = run_cli("report", ev, "--out", tmp_path / "rep", "--backbone-text", backbone)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| eval_base | 56.5 | 66.5 | 56.5 | 66.5 | 10.0 | 70.6 |" in md  # 56.5 / 80, not its stored 85.0
    assert "(80.0 %, given to the report)" in md
    r = run_cli("report", ev, "--out", tmp_path / "rep2", "--backbone-text", "0")
    assert r.returncode != 0 and "--backbone-text: 0.0 is not an accuracy" in r.stderr
    assert "Traceback" not in r.stderr


def test_report_from_an_eval_and_a_run(tmp_path):
    ev, run = make_fixture(tmp_path)
    r = run_cli("report", ev, run, "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| eval_base | 56.5 | 66.5 | 56.5 | 66.5 | 10.0 | 85.0 |" in md
    png = tmp_path / "rep" / "training_run_tars.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "![" in md and "training_run_tars.png" in md
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64," in page and "<td>eval_base</td>" in page


def test_training_curves_say_they_are_rollouts_not_the_table_s_greedy_accuracy(tmp_path):
    # Seen in headless Chromium: a reader put the curves' 0.05-0.45 beside the table's 41.7 %.
    from tars.eval.report import TRAINING_NOTE

    ev, run = make_fixture(tmp_path)
    md = build_report([ev, run], tmp_path / "rep").read_text()
    after = md.split("](training_run_tars.png)", 1)[1]
    assert after.lstrip().startswith(TRAINING_NOTE) and "greedy decoding, in %" in TRAINING_NOTE
    import html

    assert f"<p>{html.escape(TRAINING_NOTE)}</p>" in (tmp_path / "rep" / "report.html").read_text()


def test_report_refuses_a_folder_it_cannot_read(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no metrics.json"):
        build_report([tmp_path / "empty"], tmp_path / "rep")
    r = run_cli("report", tmp_path / "missing", "--out", tmp_path / "rep")
    assert r.returncode == 2 and "not a folder" in r.stderr and "Traceback" not in r.stderr


def test_row_names_of_the_mini_table_layout(tmp_path):
    for row, (sa, ta) in {"grpo": (50.0, 60.0), "tars": (55.0, 60.0)}.items():
        (tmp_path / row / "eval").mkdir(parents=True)
        (tmp_path / row / "eval" / "metrics.json").write_text(json.dumps(eval_metrics(sa, ta)))
    casc = {"datasets": {"heldout": {"cascade": {"accuracy": 58.0}}}, "average": {"cascade": 58.0}}
    (tmp_path / "cascade" / "eval").mkdir(parents=True)
    (tmp_path / "cascade" / "eval" / "metrics.json").write_text(json.dumps(casc))
    md = build_report([tmp_path / r / "eval" for r in ("grpo", "tars", "cascade")], tmp_path / "rep").read_text()
    assert "| grpo | 50.0 | 60.0 |" in md and "| tars | 55.0 | 60.0 |" in md
    assert "| cascade | 58.0 | – | 58.0 | – |" in md


def test_html_shows_code_spans_and_right_aligns_numbers():
    from tars.eval.report import _inline, _td

    assert _inline("curves of `run<1>` (2 steps)") == "curves of <code>run&lt;1&gt;</code> (2 steps)"
    assert _inline("an odd ` backtick") == "an odd ` backtick"
    assert _td("+12.5") == "<td class='n'>+12.5</td>" and _td("ev1") == "<td>ev1</td>"


def test_report_prints_paired_intervals_against_the_first_eval(tmp_path):
    def folder(name, preds):
        f = tmp_path / name
        f.mkdir()
        (f / "metrics.json").write_text(json.dumps(eval_metrics(50.0, 60.0)))
        rows = [{"dataset": "heldout", "modality": "speech", "id": f"q{i}", "answer": "A", "pred": p}
                for i, p in enumerate(preds)]
        (f / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return f

    base = folder("base", ["A", "B", None, "A"])
    same = folder("same", ["A", "B", None, "A"])
    better = folder("better", ["A", "A", "A", "A"])
    md = build_report([base, same, better], tmp_path / "rep").read_text()
    assert "### Paired differences against `base`" in md
    assert "| same | heldout | speech | 4 | +0.0 | [+0.0, +0.0] |" in md
    assert "| better | heldout | speech | 4 | +50.0 | [" in md
    assert "<h3>Paired differences against <code>base</code></h3>" in (tmp_path / "rep" / "report.html").read_text()
    # and as a forest plot, embedded in the page like the other figures
    png = tmp_path / "rep" / "paired.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](paired.png)" in md
    assert (tmp_path / "rep" / "report.html").read_text().count("data:image/png;base64,") == 1


def test_report_without_predictions_has_no_paired_section(tmp_path):
    f = tmp_path / "base"
    f.mkdir()
    (f / "metrics.json").write_text(json.dumps(eval_metrics(50.0, 60.0)))
    g = tmp_path / "other"
    g.mkdir()
    (g / "metrics.json").write_text(json.dumps(eval_metrics(40.0, 60.0)))
    md = build_report([f, g], tmp_path / "rep").read_text()
    assert "Paired differences" not in md and not (tmp_path / "rep" / "paired.png").exists()


def test_forest_plot_puts_each_difference_on_its_own_line(monkeypatch):
    import tars.eval.report as report

    figs = []
    monkeypatch.setattr(report, "figure_png", lambda fig: figs.append(fig) or b"")
    d = lambda diff: {"n": 10, "diff": diff, "lo": diff - 1.0, "hi": diff + 2.0}  # noqa: E731
    diffs = [("grpo", "mini:test", "speech", d(1.0)), ("grpo", "mini:test", "text", d(-2.0)),
             ("tars", "mini:test", "speech", d(3.0)), ("tars", "mini:test", "text", d(4.0)),
             ("cascade", "mini:test", "cascade", d(5.0))]
    report.plot_paired("base", diffs)
    ax = figs[0].axes[0]
    # first label on top: tick j (from the bottom) names labels[n − 1 − j]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cascade · mini:test", "tars · mini:test", "grpo · mini:test"]
    got = {}
    for line, mod in zip([c.lines[0] for c in ax.containers], ["speech", "text", "cascade"]):
        for x, y in zip(line.get_xdata(), line.get_ydata()):
            got[(mod, float(x))] = round(float(y), 2)
    # three modalities: offsets +0.12, 0, −0.12 around each line (grpo at 2, tars at 1, cascade at 0)
    assert got == {("speech", 1.0): 2.12, ("text", -2.0): 2.0, ("speech", 3.0): 1.12, ("text", 4.0): 1.0,
                   ("cascade", 5.0): -0.12}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["speech", "text", "cascade"]


def test_a_group_of_seeds_is_one_row_and_one_side_of_the_paired_comparison(tmp_path):
    """tars=s0,s1 against base. Speech by hand: base (1, 0, 0, 0); tars s0 (1, 1, 1, 0), s1 (1, 1, 0, 0):
    per question (1, 1, ½, 0), so tars − base = mean(0, 1, ½, 0) = 37.5 points; the row shows the two
    seeds' mean accuracy (75 + 50) / 2 and the mean of their MRRs."""
    def folder(name, correct, sa, mrr):
        f = tmp_path / name
        f.mkdir()
        (f / "metrics.json").write_text(json.dumps(eval_metrics(sa, 60.0, mrr) | {"model": name}))
        rows = [{"dataset": "heldout", "modality": "speech", "id": f"q{i}", "answer": "A", "pred": "A" if c else "B"}
                for i, c in enumerate(correct)]
        (f / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return f

    base = folder("base", (1, 0, 0, 0), 25.0, 40.0)
    s0, s1 = folder("s0", (1, 1, 1, 0), 75.0, 120.0), folder("s1", (1, 1, 0, 0), 50.0, 80.0)
    r = run_cli("report", base, f"tars={s0},{s1}", f"one={s1}", "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| tars (mean of 2) | 62.5 | 60.0 | 62.5 | 60.0 | -2.5 | 100.0 |" in md
    assert "| one | 50.0 | 60.0 |" in md
    row = next(l for l in md.splitlines() if l.startswith("| tars (mean of 2) | heldout | speech |"))
    assert "| 4 | +37.5 | [" in row
    assert "| one | heldout | speech | 4 | +25.0 | [" in md  # s1 (1, 1, 0, 0) − base (1, 0, 0, 0)


def test_mean_metrics_averages_numbers_and_drops_what_differs():
    from tars.eval.report import mean_metrics

    a = {"datasets": {"x": {"speech": {"accuracy": 40.0, "n": 10}}}, "gap": 5.0, "model": "a", "data": ["x"]}
    b = {"datasets": {"x": {"speech": {"accuracy": 50.0, "n": 10}}}, "gap": 7.0, "model": "b", "data": ["x"]}
    assert mean_metrics([a, b]) == {"datasets": {"x": {"speech": {"accuracy": 45.0, "n": 10.0}}}, "gap": 6.0,
                                    "data": ["x"]}


def test_a_bad_group_is_a_one_line_error(tmp_path):
    f = tmp_path / "ev"
    f.mkdir()
    (f / "metrics.json").write_text(json.dumps(eval_metrics(50.0, 60.0)))
    (f / "predictions.jsonl").write_text(json.dumps({"dataset": "heldout", "modality": "speech", "id": "q0",
                                                     "answer": "A", "pred": "A"}) + "\n")
    g = tmp_path / "no_preds"
    g.mkdir()
    (g / "metrics.json").write_text(json.dumps(eval_metrics(50.0, 60.0)))
    for spec, message in ((f"tars={f},{tmp_path / 'nope'}", "nope: not an evaluation folder (no metrics.json), "
                                                              "in the group tars"),
                          ("tars=", "a group needs NAME=DIR,DIR"),
                          (f"tars={f},{g}", "no_preds: no predictions.jsonl, which the other runs of its group have")):
        r = run_cli("report", f, spec, "--out", tmp_path / "rep")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
