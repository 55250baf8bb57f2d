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
