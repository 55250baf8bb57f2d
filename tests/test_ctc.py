"""The CTC-guided projector and its training stage: greedy decoding by hand, what the LLM receives,
save/load, and a short run on a tiny random Qwen2-Audio."""

import json

import pytest
import torch
from torch import nn

from conftest import needs_espeak
from tars.config import validate
from tars.errors import UserError
from tars.models.loading import load_backend
from tars.models.projector import CTCProjector, ctc_keep
from tars.train import ctc
from tars.train.ctc import CTCConfig, edit_distance, greedy_decode, run
from tiny_models import tiny_qwen2_audio

B = 9  # the blank, one past a vocabulary of 9


def test_ctc_keep_drops_blanks_and_repeats_but_not_repeats_across_a_blank():
    ids = torch.tensor([B, 5, 5, B, 5, 7, 7, B, 2])
    assert ctc_keep(ids, B).tolist() == [1, 4, 5, 8]
    assert ctc_keep(torch.tensor([B, B]), B).tolist() == []


@pytest.mark.parametrize("a,b,d", [([1, 2, 3], [1, 3], 1), ([], [1, 2], 2), ([1, 2], [2, 1], 2),
                                   ([4, 4, 4], [4, 4, 4], 0), ([1, 2, 3], [7, 8], 3)])
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_greedy_decode_reads_the_argmax_path():
    path = [B, 3, 3, B, 3, 1]
    logits = torch.full((len(path), B + 1), -5.0)
    logits[torch.arange(len(path)), torch.tensor(path)] = 5.0
    assert greedy_decode(logits, B) == [3, 3, 1]


def projector_with(logits: torch.Tensor) -> CTCProjector:
    emb = nn.Embedding(B, 4)
    proj = CTCProjector(d_audio=2, d_model=4, embedding=emb, stack=1)
    proj.logits = lambda frames, lengths=None, vocab_dtype=None: logits
    return proj


def test_the_llm_receives_one_embedding_per_recognised_token():
    logits = torch.full((5, B + 1), -30.0)
    for t, i in enumerate([B, 4, 4, B, 6]):
        logits[t, i] = 30.0
    proj = projector_with(logits)
    out = proj(torch.zeros(5, 2))
    assert out.shape == (2, 4)
    torch.testing.assert_close(out, proj.embedding.weight[[4, 6]], atol=1e-5, rtol=0)


def test_soft_embedding_mixes_rows_by_probability_without_the_blank():
    logits = torch.zeros(1, B + 1)
    logits[0, 2] = logits[0, 3] = 1.0  # two tokens tie above the rest; the blank's share is dropped
    logits[0, B] = 0.5
    proj = projector_with(logits)
    p = torch.zeros(B)
    p[:] = 1.0
    p[2] = p[3] = torch.e
    p = p / p.sum()
    torch.testing.assert_close(proj(torch.zeros(1, 2)), (p @ proj.embedding.weight)[None], atol=1e-6, rtol=0)


def test_all_blank_still_gives_the_llm_one_token():
    logits = torch.full((3, B + 1), -1.0)
    logits[:, B] = 10.0
    logits[1, 7] = 2.0  # the frame most sure of a token
    out = projector_with(logits)(torch.zeros(3, 2))
    assert out.shape == (1, 4)


def test_logits_of_a_padded_batch_equal_one_by_one():
    torch.manual_seed(0)
    proj = CTCProjector(d_audio=3, d_model=4, embedding=nn.Embedding(B, 4), stack=2)
    a, b = torch.randn(5, 3), torch.randn(3, 3)
    x = torch.zeros(2, 5, 3)
    x[0], x[1, :3] = a, b
    x[1, 3:] = 7.0  # padding content must not leak into the last stacked frame
    both = proj.logits(x, torch.tensor([5, 3]))
    torch.testing.assert_close(both[0], proj.logits(a), atol=1e-6, rtol=0)
    torch.testing.assert_close(both[1, :2], proj.logits(b), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_qwen2_audio(tmp_path_factory.mktemp("m") / "model", window_s=20.0)


def test_ctc_projector_survives_save_and_load(tiny, tmp_path):
    backend = load_backend(tiny)
    emb = backend.decoder().get_input_embeddings()
    torch.manual_seed(1)
    backend.model.model.multi_modal_projector = CTCProjector(32, emb.embedding_dim, emb, stack=2)
    backend.save_pretrained(tmp_path / "saved")
    again = load_backend(tmp_path / "saved")
    assert isinstance(again.projector, CTCProjector)
    assert again.projector.embedding is again.decoder().get_input_embeddings()
    frames = torch.randn(9, 32)
    torch.testing.assert_close(again.projector(frames), backend.projector(frames), atol=1e-6, rtol=0)
    assert "embedding.weight" not in again.projector.state_dict()


def test_unknown_projector_type_is_a_clear_error(tiny, tmp_path):
    backend = load_backend(tiny)
    emb = backend.decoder().get_input_embeddings()
    backend.model.model.multi_modal_projector = CTCProjector(32, emb.embedding_dim, emb)
    backend.save_pretrained(tmp_path / "saved")
    spec = tmp_path / "saved" / "tars_projector.json"
    spec.write_text(spec.read_text().replace('"ctc"', '"conv"'))
    with pytest.raises(UserError, match="unknown projector type 'conv'"):
        load_backend(tmp_path / "saved")


def cfg(tiny, out, **kw):
    base = dict(model=str(tiny), out=str(out), data={"families": ["facts", "comparison"], "n": 12, "seed": 5},
                batch_size=4, lr=3e-3, max_steps=6, save_every=3, warmup_frac=0.0, val_n=4, stack=1)
    base.update(kw)
    return validate(CTCConfig, base)


@needs_espeak
def test_ctc_stage_trains_the_projector_only_and_lowers_the_loss(tiny, tmp_path):
    out = run(cfg(tiny, tmp_path / "run", max_steps=8), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["ctc_loss"] < rows[0]["ctc_loss"]
    assert 0.0 <= rows[-1]["val_token_error"] and "val_token_error" in rows[2]
    before, after = load_backend(tiny), load_backend(out)
    assert isinstance(after.projector, CTCProjector)
    for a, b in zip(before.model.model.language_model.parameters(), after.model.model.language_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(before.model.model.audio_tower.parameters(), after.model.model.audio_tower.parameters()):
        assert torch.equal(a, b)


@needs_espeak
def test_killed_ctc_stage_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    straight = run(cfg(tiny, tmp_path / "a"), progress=False)
    real = ctc.save_checkpoint

    def checkpoint_then_die(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # stands in for a SIGKILL right after the step-3 checkpoint

    monkeypatch.setattr(ctc, "save_checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tiny, tmp_path / "b"), progress=False)
    monkeypatch.setattr(ctc, "save_checkpoint", real)
    resumed = run(cfg(tiny, tmp_path / "b"), progress=False)
    a, b = load_backend(straight).projector.state_dict(), load_backend(resumed).projector.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    la = [json.loads(l)["ctc_loss"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["ctc_loss"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-6)


@needs_espeak
def test_too_little_data_for_the_validation_split_is_refused(tiny, tmp_path):
    with pytest.raises(UserError, match="not more than val_n=12"):
        run(cfg(tiny, tmp_path / "r", val_n=12), progress=False)
