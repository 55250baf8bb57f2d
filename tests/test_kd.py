"""The soft CTC projector and the KD alignment stage: the distillation loss by hand, what the LLM receives
from every frame, save/load, and short runs on a tiny random Qwen2-Audio (projector only, resumable)."""

import json
import math

import pytest
import torch
from torch import nn

from conftest import needs_espeak
from tars.config import validate
from tars.errors import UserError
from tars.models.loading import load_backend
from tars.models.projector import CTCProjector, SoftCTCProjector
from tars.train import kd
from tars.train.kd import KDConfig, completion_logits, kd_loss, run
from tiny_models import tiny_qwen2_audio


def test_kd_loss_by_hand():
    # Teacher p = (0.5, 0.5), student q = (0.8, 0.2): KL(p‖q) = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2).
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.8, 0.2]]))
    want = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert kd_loss(student, teacher).item() == pytest.approx(want, abs=1e-6)
    # Two tokens: the mean; identical distributions cost nothing.
    both = kd_loss(torch.cat([student, teacher]), torch.cat([teacher, teacher]))
    assert both.item() == pytest.approx(want / 2, abs=1e-6)


def test_kd_loss_temperature_softens_and_rescales():
    # τ = 2 on logits (0, 2 ln 2) vs (0, 0): teacher softmax(0, ln 2) = (1/3, 2/3), student (1/2, 1/2);
    # loss = τ² · KL = 4 · (1/3 ln(2/3) + 2/3 ln(4/3)).
    teacher = torch.tensor([[0.0, 2 * math.log(2)]])
    student = torch.zeros(1, 2)
    want = 4 * (1 / 3 * math.log(2 / 3) + 2 / 3 * math.log(4 / 3))
    assert kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(student, teacher, temperature=0.0)


def soft_from_ctc(seed: int = 0, vocab: int = 9, d_model: int = 4) -> tuple[CTCProjector, SoftCTCProjector]:
    torch.manual_seed(seed)
    ctc = CTCProjector(d_audio=3, d_model=d_model, embedding=nn.Embedding(vocab, d_model), stack=2)
    return ctc, SoftCTCProjector.from_ctc(ctc)


def test_soft_projector_keeps_every_frame_as_the_posterior_mix_at_init():
    ctc, soft = soft_from_ctc()
    frames = torch.randn(7, 3)
    out = soft(frames)
    assert out.shape == (4, 4)  # ceil(7 / 2) stacked frames, none dropped (the CTC projector keeps fewer)
    logits = ctc.logits(frames)  # the CTC stage's logits, unchanged by the conversion
    torch.testing.assert_close(soft.logits(frames), logits)
    p = logits.softmax(-1)
    table = torch.cat([ctc.embedding.weight, ctc.embedding.weight.mean(0, keepdim=True)])  # blank = mean row
    torch.testing.assert_close(out, p @ table, atol=1e-6, rtol=0)


def test_soft_projector_all_blank_frame_is_the_blank_embedding_plus_its_residual():
    _, soft = soft_from_ctc()
    with torch.no_grad():
        soft.blank.bias.fill_(1e4)  # every frame's posterior is the blank's
        soft.blank_embedding.copy_(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    frames = torch.randn(4, 3)
    torch.testing.assert_close(soft(frames), soft.blank_embedding.detach().expand(2, 4), atol=1e-5, rtol=0)
    with torch.no_grad():
        soft.residual.weight.copy_(torch.eye(4))
    _, h = soft.logits(frames, features=True)
    torch.testing.assert_close(soft(frames), soft.blank_embedding.detach() + h, atol=1e-4, rtol=0)


def test_from_ctc_refuses_another_projector():
    torch.manual_seed(0)
    emb = nn.Embedding(9, 4)
    _, soft = soft_from_ctc()
    with pytest.raises(ValueError, match="not a CTC projector"):
        SoftCTCProjector.from_ctc(soft)
    assert isinstance(SoftCTCProjector.from_ctc(CTCProjector(3, 4, emb)), SoftCTCProjector)


@pytest.fixture(scope="module")
def tiny_ctc(tmp_path_factory):
    """A tiny random Qwen2-Audio with a CTC projector: the input the KD stage expects."""
    d = tmp_path_factory.mktemp("kd")
    backend = load_backend(tiny_qwen2_audio(d / "raw", window_s=20.0))
    emb = backend.decoder().get_input_embeddings()
    torch.manual_seed(3)
    backend.model.model.multi_modal_projector = CTCProjector(32, emb.embedding_dim, emb, stack=2)
    backend.save_pretrained(d / "ctc")
    return d / "ctc"


def test_soft_projector_survives_save_and_load(tiny_ctc, tmp_path):
    backend = load_backend(tiny_ctc)
    kd.prepare_projector(backend, "soft_ctc")
    with torch.no_grad():
        backend.projector.residual.weight.normal_()
    backend.save_pretrained(tmp_path / "saved")
    again = load_backend(tmp_path / "saved")
    assert isinstance(again.projector, SoftCTCProjector)
    assert again.projector.embedding is again.decoder().get_input_embeddings()
    frames = torch.randn(9, 32)
    torch.testing.assert_close(again.projector(frames), backend.projector(frames), atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="soft already"):
        kd.prepare_projector(again, "soft_ctc")
    kd.prepare_projector(again, "keep")  # accepted as it is


def test_completion_logits_match_the_scorers_logprobs(tiny_ctc):
    """The stage's forward reads the same positions `Backend.score` does: log-softmax of its logits at
    each completion token equals score's token log-prob."""
    from tars.data.families import make_mixture

    backend = load_backend(tiny_ctc)
    recs = make_mixture(["facts", "comparison"], 2, 1)
    inputs = backend.build_inputs(recs, "text")
    comps = [[5, 6, 7], [8, 9]]
    with torch.no_grad():
        logits = completion_logits(backend, inputs, comps)
    s = backend.score(inputs, comps, [0, 1])
    flat = torch.tensor([t for c in comps for t in c])
    got = logits.float().log_softmax(-1)[torch.arange(len(flat)), flat]
    want = torch.cat([s.logprobs[0, :3], s.logprobs[1, :2]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def cfg(tiny, out, **kw):
    base = dict(model=str(tiny), out=str(out), data={"families": ["facts", "comparison"], "n": 12, "seed": 5},
                batch_size=4, lr=3e-3, max_steps=6, save_every=3, val_every=3, warmup_frac=0.0, val_n=4)
    base.update(kw)
    return validate(KDConfig, base)


@needs_espeak
def test_kd_stage_trains_the_projector_only_and_lowers_the_loss(tiny_ctc, tmp_path):
    out = run(cfg(tiny_ctc, tmp_path / "run", max_steps=8, val_every=8), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "kd" in r]
    val = [r for r in rows if "val/kd" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["step"] for r in val] == [0, 8]
    assert val[-1]["val/kd"] < val[0]["val/kd"]
    before, after = load_backend(tiny_ctc), load_backend(out)
    assert isinstance(after.projector, SoftCTCProjector)
    for a, b in zip(before.model.model.language_model.parameters(), after.model.model.language_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(before.model.model.audio_tower.parameters(), after.model.model.audio_tower.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(after.projector.residual.weight, torch.zeros_like(after.projector.residual.weight))


@needs_espeak
def test_killed_kd_stage_resumes_to_the_same_result(tiny_ctc, tmp_path, monkeypatch):
    straight = run(cfg(tiny_ctc, tmp_path / "a"), progress=False)
    real = kd.save_checkpoint

    def checkpoint_then_die(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # stands in for a SIGKILL right after the step-3 checkpoint

    monkeypatch.setattr(kd, "save_checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tiny_ctc, tmp_path / "b"), progress=False)
    monkeypatch.setattr(kd, "save_checkpoint", real)
    resumed = run(cfg(tiny_ctc, tmp_path / "b"), progress=False)
    a, b = load_backend(straight).projector.state_dict(), load_backend(resumed).projector.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    la = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [r.get("kd", r.get("val/kd")) for r in la] == pytest.approx([r.get("kd", r.get("val/kd")) for r in lb],
                                                                       abs=1e-6)


@needs_espeak
def test_kd_stage_refuses_a_model_without_a_ctc_projector(tmp_path):
    raw = tiny_qwen2_audio(tmp_path / "raw", window_s=20.0)
    with pytest.raises(UserError, match="needs a model with a CTC projector"):
        run(cfg(raw, tmp_path / "r", data={"families": ["facts"], "n": 6, "seed": 1}, val_n=2), progress=False)


@needs_espeak
def test_kd_with_a_speech_lora_merges_it_and_keeps_the_teacher_the_original_llm(tiny_ctc, tmp_path, monkeypatch):
    """With `lora`, the LLM changes (the LoRA is merged into its weights at the end) while every teacher
    forward ran with the adapters off: the teacher's logits are those of the untouched model."""
    original = load_backend(tiny_ctc)
    teachers = []
    real = kd.completion_logits

    def spy(backend, inputs, completions):
        out = real(backend, inputs, completions)
        if inputs.modality == "text":
            teachers.append((inputs, completions, out.detach()))
        return out

    monkeypatch.setattr(kd, "completion_logits", spy)
    out = run(cfg(tiny_ctc, tmp_path / "run", max_steps=4, val_every=4, lr=1e-2,
                  lora={"r": 2, "alpha": 4, "dropout": 0.0}), progress=False)
    trained = load_backend(out)
    changed = [not torch.equal(a, b) for a, b in zip(original.model.model.language_model.parameters(),
                                                      trained.model.model.language_model.parameters())]
    assert any(changed)  # merged: a plain checkpoint whose LLM weights moved
    assert not any("lora" in k for k in trained.state_dict())
    with torch.no_grad():
        for inputs, completions, logits in teachers[-2:]:  # the last teachers ran beside a trained LoRA
            torch.testing.assert_close(completion_logits(original, inputs, completions), logits, atol=1e-5, rtol=0)


@needs_espeak
def test_stop_after_ends_early_on_the_longer_schedule(tiny_ctc, tmp_path):
    run(cfg(tiny_ctc, tmp_path / "full", max_steps=6, save_every=10, val_every=10), progress=False)
    run(cfg(tiny_ctc, tmp_path / "cut", max_steps=6, stop_after=3, save_every=10, val_every=10), progress=False)
    full = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut if "kd" in r] == [1, 2, 3] and cut[-1] == {**cut[-1], "step": 3}
    assert "val/kd" in cut[-1]  # the stopped run validates at its last step
    assert [r["lr"] for r in cut if "kd" in r] == [r["lr"] for r in full if "kd" in r][:3]
    assert [r["kd"] for r in cut if "kd" in r] == pytest.approx([r["kd"] for r in full if "kd" in r][:3], abs=1e-6)
    assert (tmp_path / "cut" / "model" / "config.json").exists()
