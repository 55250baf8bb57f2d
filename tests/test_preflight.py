"""A manifest with bad audio is refused before any work starts, by every command that reads speech:
every problem listed as `file:line: audio: message`, exit 2, no traceback, no model step taken."""

import numpy as np
import pytest
import soundfile as sf

from conftest import good_row, run_cli, write_jsonl
from tiny_models import tiny_qwen2_audio


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_qwen2_audio(tmp_path_factory.mktemp("tiny") / "m")


def bad_manifest(tmp_path):
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "ok.wav", np.zeros(8000, dtype=np.float32), 16000)
    (tmp_path / "audio" / "garbage.wav").write_bytes(b"this is not a wav file at all")
    rows = [good_row(0, audio="audio/ok.wav"), good_row(1, audio="audio/missing.wav"),
            good_row(2, audio="audio/ok.wav"), good_row(3, audio="audio/garbage.wav")]
    return write_jsonl(tmp_path / "manifest.jsonl", rows)


def assert_refused(res, manifest):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert any(f"{manifest}:2: audio: " in l and "not found" in l for l in lines), res.stderr
    assert any(f"{manifest}:4: audio: " in l for l in lines), res.stderr


def test_eval_refuses_bad_audio_before_loading(tmp_path, model):
    m = bad_manifest(tmp_path)
    res = run_cli("eval", "--model", model, "--data", m, "--out", tmp_path / "ev")
    assert_refused(res, m)
    assert not (tmp_path / "ev" / "predictions.jsonl").exists()


def test_analyze_layers_refuses_bad_audio(tmp_path, model):
    m = bad_manifest(tmp_path)
    assert_refused(run_cli("analyze", "layers", "--model", model, "--data", m, "--out", tmp_path / "lay"), m)


def test_train_refuses_bad_audio_before_the_first_step(tmp_path, model):
    m = bad_manifest(tmp_path)
    out = tmp_path / "run"
    res = run_cli("train", "--config", "configs/mini.yaml", f"model={model}", f"out={out}", f"data.file={m}", "steps=1", "questions_per_step=1",
                  "max_new_tokens=4", "method=grpo")
    assert_refused(res, m)
    assert not (out / "metrics.jsonl").exists()


def test_text_only_eval_does_not_need_the_audio(tmp_path, model):
    m = bad_manifest(tmp_path)
    res = run_cli("eval", "--model", model, "--data", m, "--modality", "text", "--out", tmp_path / "ev",
                  "--max-new-tokens", "2")
    assert res.returncode == 0, res.stderr


def long_clip_manifest(tmp_path, **long_row):
    """One clip inside the tiny model's 1 s window, one over it whose row does not say so (no
    `duration_s`, or a stale one): the length must come from the file."""
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "ok.wav", np.zeros(8000, dtype=np.float32), 16000)
    sf.write(tmp_path / "audio" / "long.wav", np.zeros(32000, dtype=np.float32), 16000)
    rows = [good_row(0, audio="audio/ok.wav"), good_row(1, audio="audio/long.wav", **long_row)]
    return write_jsonl(tmp_path / "manifest.jsonl", rows)


@pytest.mark.parametrize("claim", [{}, {"duration_s": 0.5}])
def test_a_clip_s_length_is_read_from_the_file(tmp_path, claim):
    from tars.data.jsonl import load_records

    records, problems = load_records(long_clip_manifest(tmp_path, **claim), check_audio_files=True, max_audio_s=None)
    assert not problems and [r.duration_s for r in records] == [0.5, 2.0]


def test_eval_leaves_out_a_clip_over_the_window_that_its_row_does_not_date(tmp_path, model):
    from tars.config import validate
    from tars.eval.evaluate import EvalConfig, run_eval

    m = long_clip_manifest(tmp_path)
    cfg = validate(EvalConfig, dict(model=str(model), data=[str(m)], out=str(tmp_path / "ev"), max_new_tokens=2))
    got = run_eval(cfg, progress=False)  # used to stop at the long clip, after the model had loaded
    name = m.parent.name  # a manifest.jsonl is named after its folder
    assert got["excluded_too_long"] == {name: ["q1"]}
    assert got["datasets"][name]["speech"]["n"] == 1 == got["datasets"][name]["text"]["n"]


def test_train_leaves_out_a_clip_over_the_window_before_the_first_step(tmp_path, model):
    m = long_clip_manifest(tmp_path, duration_s=0.5)
    out = tmp_path / "run"
    # Two steps of one question: with the long clip kept, one of them would draw it and stop the run.
    res = run_cli("train", "--config", "configs/mini.yaml", f"model={model}", f"out={out}", f"data.file={m}",
                  "steps=2", "questions_per_step=1", "max_new_tokens=4", "method=grpo")
    assert res.returncode == 0, res.stderr
    assert "1 question(s) left out: audio over the 1 s encoder window" in res.stdout + res.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
