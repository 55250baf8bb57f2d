"""`tars demo` on a tiny random model: every stage runs, the report renders, a rerun resumes.

The real run (the shipped pack on the mini model) is the slow test in test_mini_e2e.py.
"""

import json
import re

import pytest

import tars.experiment.demo as demo
from conftest import needs_espeak, run_cli
from tars.config import validate
from tars.data.jsonl import read_records
from tiny_models import tiny_adapter, tiny_qwen2_audio


def test_demo_questions_are_the_docs_sets_and_disjoint():
    heldout, train = demo.demo_questions(30, 12)
    assert len(heldout) == 30 and len(train) == 12
    assert not {r.question for r in heldout} & {r.question for r in train}
    # the same draws as `tars data make ... --seed 1000` with the stages' sets excluded (docs/results.md)
    again, _ = demo.demo_questions(5, 1)
    assert [r.id for r in again] == [r.id for r in heldout[:5]]


@needs_espeak
def test_demo_runs_every_stage_and_resumes(tmp_path, monkeypatch):
    model = tiny_qwen2_audio(tmp_path / "tiny", window_s=20.0)
    adapter = tmp_path / "adapter"
    tiny_adapter(model, adapter, r=2, alpha=4.0, seed=1)
    named = {"mini:tiny": model, "mini:tiny-tars": adapter}
    monkeypatch.setattr(demo, "shipped_model", lambda spec, log=print: named[spec])
    cfg = validate(demo.DemoConfig, {"out": str(tmp_path / "demo"), "model": "mini:tiny", "adapter": "mini:tiny-tars",
                                     "questions": 3, "steps": 1, "questions_per_step": 1, "rollouts": 2,
                                     "max_new_tokens": 16, "eval_max_new_tokens": 16})
    lines = []
    report = demo.run_demo(cfg, log=lines.append, progress=False)
    out = tmp_path / "demo"
    assert report == out / "report" / "report.md"
    md = report.read_text()
    assert "| base |" in md and "| tars_adapter |" in md and "Paired differences against `base`" in md
    for png in sorted((out / "report").glob("*.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (out / "report").glob("*.png")} == {"training_tars.png", "layers_layers.png", "paired.png"}
    assert list(json.loads((out / "layers" / "layers.json").read_text())["curves"]) == ["base", "TARS adapter"]
    assert len(read_records(out / "data" / "heldout.jsonl")) == 3
    for folder in ("base", "tars_adapter"):
        metrics = json.loads((out / folder / "metrics.json").read_text())
        assert metrics["datasets"]["heldout"]["speech"]["n"] == 3
    # the evaluations ran two different models: the adapter's answers are its own
    assert (json.loads((out / "base" / "metrics.json").read_text())["model"]
            != json.loads((out / "tars_adapter" / "metrics.json").read_text())["model"])
    assert (out / "demo.yaml").exists() and (out / "tars" / "config.yaml").exists()
    assert (out / "tars" / "adapter").exists() and not (out / "tars" / "model").exists()
    assert any("speech:" in l and "→" in l and "[" in l for l in lines) and "done:" in lines[-1]
    assert re.match(r"\[ *\d+\.\d min, peak \d+\.\d\d GB\] done:", lines[-1])  # where time and memory went
    # a rerun finds every piece done: no step is trained again
    steps = (out / "tars" / "metrics.jsonl").read_text()
    demo.run_demo(cfg, log=lines.append, progress=False)
    assert (out / "tars" / "metrics.jsonl").read_text() == steps
    # other settings in the same folder would silently mix two demos: refused, naming the setting
    from tars.errors import UserError

    with pytest.raises(UserError, match="questions=3 \\(now 4\\)"):
        demo.run_demo(cfg.model_copy(update={"questions": 4}), log=lines.append, progress=False)


def test_demo_summary_pairs_the_answers_with_an_interval(tmp_path):
    """Hand-made predictions: 4 questions; the adapter fixes two speech answers and breaks none, so the
    paired difference is +50 points; text is unchanged, a difference of exactly 0 with a [0, 0] interval."""
    def write(folder, speech_right):
        folder.mkdir()
        rows = [{"id": f"q{i}", "dataset": "heldout", "modality": m, "answer": "A",
                 "pred": "A" if (m == "text" or i < speech_right) else "B"} for m in ("speech", "text") for i in range(4)]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        acc = {"speech": {"accuracy": 25.0 * speech_right, "n": 4}, "text": {"accuracy": 100.0, "n": 4}}
        return {"datasets": {"heldout": acc}}

    base, adapter = write(tmp_path / "b", 1), write(tmp_path / "a", 3)
    text = demo.summary(tmp_path / "b", base, tmp_path / "a", adapter)
    speech_line = next(l for l in text.splitlines() if l.strip().startswith("speech:"))
    assert "25.0 % →  75.0 %" in speech_line and "+50.0 points" in speech_line
    assert "[+0.0, +0.0]" in next(l for l in text.splitlines() if l.strip().startswith("text:"))
    assert "+75.0   → +25.0" in text


def test_demo_bad_override_and_missing_model_are_one_line_errors(tmp_path):
    r = run_cli("demo", "questions=0")
    assert r.returncode != 0 and "questions" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("demo", f"model={tmp_path / 'none'}", "adapter=null", f"out={tmp_path / 'o'}")
    assert r.returncode != 0 and "none" in r.stderr and "not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start
    r = run_cli("mini", "unpack", "--pack", tmp_path / "none.safetensors")
    assert r.returncode == 2 and "stage pack not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("key", ["steps=0", "rollouts=0", "colour=red"])
def test_demo_config_is_validated(key):
    from tars.config import load_config
    from tars.errors import UserError

    with pytest.raises(UserError, match=key.split("=")[0]):
        load_config(demo.DemoConfig, None, [key])
