"""Supervised stages on a tiny random Qwen2-Audio: what trains, what is saved, resume after a kill."""

import json

import pytest
import torch

from conftest import needs_espeak
from tars.config import validate
from tars.errors import UserError
from tars.models.loading import load_backend
from tars.train import supervised
from tars.train.supervised import SupervisedConfig, run, sft_target
from tiny_models import tiny_qwen2_audio


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_qwen2_audio(tmp_path_factory.mktemp("m") / "model", window_s=20.0)


def cfg(tiny, out, **kw):
    base = dict(model=str(tiny), out=str(out), data={"families": ["facts", "comparison"], "n": 12, "seed": 5},
                batch_size=4, lr=1e-3, max_steps=4, save_every=2, warmup_frac=0.0)
    base.update(kw)
    return validate(SupervisedConfig, base)


def params(path, which):
    b = load_backend(path)
    mod = b.projector if which == "projector" else b.decoder()
    return {k: v.clone() for k, v in mod.state_dict().items()}


def test_sft_target_letter_styles():
    from tars.data.schema import Record
    r = Record(id="x", question="q", options=["1", "2", "3"], answer="B", cot="One plus one is 2.")
    assert sft_target(r, "name") == "<think>One plus one is 2. That is option B.</think><answer>The answer is B.</answer>"
    assert sft_target(r, "none") == "<think>One plus one is 2.</think><answer>The answer is B.</answer>"
    assert sft_target(r, "scan") == ("<think>One plus one is 2. Checking the options: A is 1, no. B is 2, yes. "
                                     "That is option B.</think><answer>The answer is B.</answer>")


def test_text_sft_trains_the_llm_only_and_lowers_the_loss(tiny, tmp_path):
    out = run(cfg(tiny, tmp_path / "run", max_steps=6, lr=3e-3), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    before, after = params(tiny, "llm"), params(out, "llm")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    pb, pa = params(tiny, "projector"), params(out, "projector")
    assert all(torch.equal(pb[k], pa[k]) for k in pb)
    assert (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


@needs_espeak
def test_projector_alignment_trains_the_projector_only(tiny, tmp_path):
    out = run(cfg(tiny, tmp_path / "run", modality="speech", train="projector", max_steps=2,
                  transcript_weight=1.0), progress=False)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"completion_nll", "transcript_nll"} <= set(row)
    lb, la = params(tiny, "llm"), params(out, "llm")
    assert all(torch.equal(lb[k], la[k]) for k in lb)
    pb, pa = params(tiny, "projector"), params(out, "projector")
    assert any(not torch.equal(pb[k], pa[k]) for k in pb)


def test_killed_run_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    straight = run(cfg(tiny, tmp_path / "a"), progress=False)

    calls = {"n": 0}
    real = supervised.save_checkpoint

    def checkpoint_then_die(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        raise KeyboardInterrupt  # stands in for a SIGKILL right after the step-2 checkpoint

    monkeypatch.setattr(supervised, "save_checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tiny, tmp_path / "b"), progress=False)
    assert (tmp_path / "b" / "checkpoint.pt").exists() and calls["n"] == 1
    # A line cut short by the kill must not break the resume.
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    monkeypatch.setattr(supervised, "save_checkpoint", real)
    resumed = run(cfg(tiny, tmp_path / "b"), progress=False)
    a, b = params(straight, "llm"), params(resumed, "llm")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    la = [json.loads(l)["loss"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-6)


def test_projector_on_text_is_refused(tiny, tmp_path):
    with pytest.raises(UserError, match="train=projector needs modality=speech"):
        run(cfg(tiny, tmp_path / "r", train="projector"), progress=False)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        run(validate(SupervisedConfig, {"model": str(tmp_path / "nope"), "out": str(tmp_path / "o"),
                                        "data": {"families": ["facts"], "n": 2}}), progress=False)
