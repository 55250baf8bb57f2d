"""What the training step keeps for its backward (issue 13): activation checkpointing of the decoder
blocks, log-probs in chunks, one modality's graph at a time. Memory is checked by what autograd saves
(bytes of saved tensors, exact and machine-independent), never by timing or RSS."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_espeak
from tars.models.backend import token_logprobs
from tars.models.loading import load_backend
from tiny_models import tiny_qwen2_audio


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_qwen2_audio(tmp_path_factory.mktemp("m") / "model", window_s=20.0)


class SavedBytes:
    """Bytes of the distinct tensors autograd saves for the backward inside the block."""

    def __init__(self):
        self.seen: dict[int, int] = {}

    def pack(self, t):
        self.seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def test_chunked_logprobs_equal_the_full_log_softmax_with_gradients():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    full = torch.log_softmax(head(h).float() / 0.7, -1)
    want_lp = full.gather(-1, y[:, None]).squeeze(-1)
    want_ent = -(full.exp() * full).sum(-1)
    (want_grad,) = torch.autograd.grad(want_lp.sum() * 2, h)
    # chunks of 4 rows (4 · 50 · 4 bytes): 10 chunks, the last one short
    lp, ent = token_logprobs(head, h, y, 0.7, entropy=True, chunk_bytes=4 * 50 * 4)
    torch.testing.assert_close(lp, want_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=0)
    assert not ent.requires_grad
    (grad,) = torch.autograd.grad(lp.sum() * 2, h)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=0)


def test_chunked_logprobs_keep_no_vocabulary_sized_tensor_for_the_backward():
    head = torch.nn.Linear(16, 5000, bias=False)
    h = torch.randn(64, 16, requires_grad=True)
    y = torch.randint(0, 5000, (64,))
    with SavedBytes() as saved:
        lp, _ = token_logprobs(head, h, y, chunk_bytes=8 * 5000 * 4)
    logits_bytes = 64 * 5000 * 4
    assert saved.total < logits_bytes / 4, saved.total  # the hidden states (and targets), not logits
    with SavedBytes() as full:
        torch.log_softmax(head(h).float(), -1).gather(-1, y[:, None])
    assert full.total >= logits_bytes  # what the unchunked path keeps


def _score(be, recs, grad=True):
    inputs = be.build_inputs(recs, "text")
    comps = [[5, 9, 14, 22, 31, 2] * 3, [7, 8, 3, 40] * 4]
    return be.score(inputs, comps, [0, 1], layers=[1, 2], grad=grad, entropy=True)


def test_activation_checkpointing_keeps_less_and_scores_and_grads_the_same(tiny):
    from tars.data.schema import Record
    from tars.models.lora import LoraSettings, add_lora

    recs = [Record(id="a", question="What is 2 plus 2 plus 2?", options=["3", "6"], answer="B"),
            Record(id="b", question="Two?", options=["1", "2"], answer="B")]
    out = {}
    for on in (False, True):
        be = load_backend(tiny)
        torch.manual_seed(0)
        params = add_lora(be, LoraSettings(r=4, dropout=0.1))
        be.checkpoint_blocks(on)
        be.train()
        torch.manual_seed(1)  # the same dropout masks in both runs
        with SavedBytes() as saved:
            sc = _score(be, recs)
        be.eval()  # as the trainer does between its forward and the backward: the recompute keeps dropout on
        sc.logprobs.sum().backward()
        out[on] = (sc, {k: p.grad.clone() for k, p in params.items()}, saved.total)
    (a, ga, bytes_off), (b, gb, bytes_on) = out[False], out[True]
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.pooled["mean"], b.pooled["mean"], atol=1e-6, rtol=0)  # hooks fired once
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-6, rtol=0)
    for k in ga:  # dropout replayed in the recompute: the same gradient
        torch.testing.assert_close(ga[k], gb[k], atol=1e-6, rtol=0)
    assert bytes_on < bytes_off / 2, (bytes_on, bytes_off)
    be.checkpoint_blocks(False)  # undone: a plain forward again
    assert "_tars_plain_forward" not in be.decoder_layers()[0].__dict__


@needs_espeak
def test_a_step_with_every_memory_saving_equals_one_without(tiny, tmp_path, monkeypatch):
    """activation_checkpointing changes what is kept, never the numbers: the same metrics and update.
    And the text-first order keeps one modality's graph at a time: the speech forward starts after the
    text backward (joint_groups: after both forwards).

    Both steps score one forward per row (`share_prompt=False`, the path checkpointing implies): the
    step without checkpointing would otherwise run each prompt once for its rows, which draws other
    LoRA dropout masks and sums in another order (tests/test_shared_prompt.py compares the paths)."""
    from lively import make_lively

    from tars.config import validate
    from tars.data.sources import load_data
    from tars.rewards.alignment import SentenceEmbedder
    from tars.rl import tars as tars_mod
    from tars.rl.tars import TarsConfig, TarsTrainer

    make_lively(monkeypatch.setattr)
    emb = SentenceEmbedder()
    monkeypatch.setattr(tars_mod, "SentenceEmbedder", lambda *a, **k: emb)
    got = {}
    for on in (False, True):
        c = validate(TarsConfig, dict(model=str(tiny), out=str(tmp_path / str(on)), steps=2, questions_per_step=2,
                                      speech_rollouts=2, text_rollouts=2, max_new_tokens=6, lr=1e-2,
                                      warmup_frac=0.0, seed=3, activation_checkpointing=on,
                                      data={"families": ["facts", "comparison"], "n": 4, "seed": 5}))
        records, base_dir = load_data(c.data, "speech")
        tr = TarsTrainer(c, c.steps)
        events = []
        real_score, real_backward = tr.backend.score, tr.parallel.backward
        monkeypatch.setattr(tr.backend, "score", lambda inp, *a, **k: events.append(("score", inp.modality))
                            or real_score(inp, *a, share_prompt=False, **k))
        monkeypatch.setattr(tr.parallel, "backward", lambda loss, last: events.append(("backward", last))
                            or real_backward(loss, last))
        rows = [tr.step(records[:2], base_dir, s) for s in range(2)]
        got[on] = ([{k: v for k, v in r.items() if not k.startswith("time")} for r in rows],
                   {k: v.detach().clone() for k, v in tr.lora.items()}, events)
    (ra, la, ea), (rb, lb, eb) = got[False], got[True]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=1e-5), k
    for k in la:
        torch.testing.assert_close(la[k], lb[k], atol=1e-6, rtol=0)
    step1 = ea[: len(ea) // 2]
    assert step1 == [("score", "text"), ("backward", False), ("score", "speech"), ("backward", True)]
    assert eb == ea  # checkpointing changes what is kept, not the order of the work


def test_lora_runs_in_the_models_dtype_with_float32_master_weights(tiny):
    """Under a bf16 model no float32 copy of an adapted layer's [tokens × hidden] input is kept for the
    backward (peft's own path casts every adapted layer's input to the adapter's float32: one such
    copy per adapted layer); the LoRA parameters stay float32 and get float32 gradients as close to a
    float32 run's as peft's float32 adapter path gets."""
    from tars.data.schema import Record
    from tars.models.lora import LoraSettings, _tuner_layers, add_lora

    recs = [Record(id="a", question="What is 2 plus 2 plus 2?", options=["3", "6"], answer="B")]
    grads, big_fp32 = {}, {}
    for name, dtype, peft_cast in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                   ("bf16-peft", torch.bfloat16, True)):
        be = load_backend(tiny, dtype=dtype)
        torch.manual_seed(0)
        params = add_lora(be, LoraSettings(r=4, dropout=0.0))
        adapted = _tuner_layers(be)
        if peft_cast:  # peft's own behaviour, for comparison
            for m in adapted:
                m.cast_input_dtype_enabled = True
                for lin in (*m.lora_A.values(), *m.lora_B.values()):
                    del lin.forward
        with torch.no_grad():  # B starts at 0: give it values so A's gradient is not 0
            for k, p in params.items():
                if "lora_B" in k:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        inputs = be.build_inputs(recs, "text")
        tokens, H = inputs.embeds.shape[1] + 12, inputs.embeds.shape[-1]
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            sc = be.score(inputs, [[5, 9, 14, 22] * 3], [0], grad=True)
        sc.logprobs.sum().backward()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params.values())
        grads[name] = {k: p.grad.clone() for k, p in params.items()}
        # float32 [tokens × ≥hidden] tensors kept (the model's own RMSNorms keep some in any case)
        big_fp32[name] = sum(t.dtype == torch.float32 and t.numel() >= tokens * H for t in kept)
    assert big_fp32["bf16-peft"] - big_fp32["bf16"] >= len(adapted), big_fp32
    # Against the float32 run, the bf16 gradients of tars's path are about as close as peft's (whose
    # adapter matmuls run in float32 on the same bf16 model): bf16's own rounding dominates.
    def err(name):
        diff = sum(((grads[name][k] - g) ** 2).sum() for k, g in grads["fp32"].items()) ** 0.5
        return float(diff / sum((g ** 2).sum() for g in grads["fp32"].values()) ** 0.5)

    assert err("bf16") < 1.5 * err("bf16-peft") and err("bf16") < 0.2, (err("bf16"), err("bf16-peft"))
