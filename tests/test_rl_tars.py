"""The TARS trainer (DESIGN §2) on a tiny random Qwen2-Audio: a run end to end, what each method asks of
the model, one forward for log-probs and hidden states, the asymmetry, micro-batching, KL, resume."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_espeak
from tars.config import validate
from tars.data.sources import load_data
from tars.errors import UserError
from tars.rl import tars as tars_mod
from tars.rl.advantages import within_group_spread
from tars.models.lora import load_adapter
from tars.rl.tars import TarsConfig, TarsTrainer, compose_rewards, modality_advantages, run
from tiny_models import tiny_qwen2_audio

DATA = {"families": ["facts", "comparison"], "n": 4, "seed": 5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_qwen2_audio(tmp_path_factory.mktemp("m") / "model", window_s=20.0)


@pytest.fixture(scope="module")
def embedder():
    from tars.rewards.alignment import SentenceEmbedder

    return SentenceEmbedder()


def cfg(tiny, out, **kw):
    base = dict(model=str(tiny), out=str(out), data=DATA, steps=3, questions_per_step=2, speech_rollouts=2,
                text_rollouts=2, max_new_tokens=6, lr=1e-2, warmup_frac=0.0, save_every=1, seed=3)
    base.update(kw)
    return validate(TarsConfig, base)


@pytest.fixture
def lively(monkeypatch, embedder):
    """Rollouts that stop and get answers right or wrong (see `lively.make_lively`)."""
    from lively import make_lively

    make_lively(monkeypatch.setattr)
    # One sentence embedder for the whole file: loading it is most of a tiny run's time.
    monkeypatch.setattr(tars_mod, "SentenceEmbedder", lambda *a, **k: embedder)


def trainer(tiny, tmp_path, **kw):
    c = cfg(tiny, tmp_path / "run", **kw)
    records, base_dir = load_data(c.data, "speech")
    return TarsTrainer(c, c.steps), records[: c.questions_per_step], base_dir


def lora_of(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


KEYS = {"step", "epoch", "loss", "grad_norm", "lr", "speech/reward", "speech/base", "speech/acc", "speech/format",
        "speech/rep", "speech/beh", "text/reward", "text/base", "text/acc", "text/format", "text/align", "gap",
        "no_reference", "clip_fraction", "speech/length", "text/length", "truncated", "time/generate",
        "time/score", "time/rewards", "time/update", "time/step", "time/cpu", "speech/entropy", "text/entropy", "sampler/kl",
        "speech/rep_spread", "speech/beh_spread"}


@needs_espeak
def test_tars_run_trains_the_lora_only_and_saves_adapter_and_merged_model(tiny, tmp_path, lively):
    from safetensors.torch import load_file

    out = run(cfg(tiny, tmp_path / "run"), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(set(r) == KEYS for r in rows)
    assert all(torch.isfinite(torch.tensor([v for v in r.values()])).all() for r in rows)
    assert any(r["speech/rep"] != 0 for r in rows) and any(r["speech/beh"] != 0 for r in rows)
    assert (tmp_path / "run" / "DONE").exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert all(0 < r["speech/entropy"] <= torch.log(torch.tensor(400.0)) for r in rows)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0

    adapter = lora_of(tmp_path / "run" / "adapter")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0
    meta = json.loads((tmp_path / "run" / "adapter" / "tars_adapter.json").read_text())
    assert meta["base_model"] == str(tiny) and meta["r"] == 8
    # The merged model is the base model plus (α/r)·B·A on the adapted layers, and nothing else moved:
    # the encoder, projector, embeddings, norms and LM head are exactly as they were.
    before, after = load_file(str(tiny / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    # (checkpoint keys of the LLM are `<llm prefix><decoder-relative name>`, the prefix `language_model.model.`
    # as transformers 5.24 writes it, `language_model.model.model.` as 5.17 does; either loads in both)
    llm = next(k for k in before if k.endswith("embed_tokens.weight"))[: -len("embed_tokens.weight")]
    adapted = {f"{llm}{k.rsplit('.lora_', 1)[0]}.weight" for k in adapter}
    assert len(adapted) == 4 * 7 and adapted <= set(before)
    for k in before:
        if k in adapted:
            name = k[len(llm):-len(".weight")]
            delta = (32 / 8) * adapter[f"{name}.lora_B.weight"] @ adapter[f"{name}.lora_A.weight"]
            torch.testing.assert_close(after[k], before[k] + delta, atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(before[k], after[k]), k
    # The adapter re-attached to the base model scores like the merged model.
    from tars.models.loading import load_backend

    records, base_dir = load_data(cfg(tiny, tmp_path).data, "speech")
    ids = [[5, 9, 14, 2]]
    a, m = load_adapter(tmp_path / "run" / "adapter"), load_backend(out)
    la = a.score(a.build_inputs(records[:1], "speech", base_dir), ids, [0]).logprobs
    lm = m.score(m.build_inputs(records[:1], "speech", base_dir), ids, [0]).logprobs
    torch.testing.assert_close(la, lm, atol=1e-5, rtol=0)
    # ... and so does the adapter folder given where a model folder goes (`tars eval --model run/adapter`):
    # the base model with the LoRA merged, no peft layer left.
    f = load_backend(tmp_path / "run" / "adapter")
    assert not any("lora" in n for n, _ in f.decoder().named_parameters())
    lf = f.score(f.build_inputs(records[:1], "speech", base_dir), ids, [0]).logprobs
    torch.testing.assert_close(lf, lm, atol=1e-5, rtol=0)


def spy_scores(backend, monkeypatch):
    calls = []
    real = backend.score

    def score(inputs, completions, prompt_index, layers=None, grad=False, **kw):
        calls.append({"layers": list(layers or []), "grad": grad, "modality": inputs.modality,
                      "completions": [list(c) for c in completions]})
        return real(inputs, completions, prompt_index, layers, grad, **kw)

    monkeypatch.setattr(backend, "score", score)
    return calls


@needs_espeak
def test_grpo_asks_no_hidden_states_and_pays_the_base_reward_only(tiny, tmp_path, lively, monkeypatch):
    tr, batch, base_dir = trainer(tiny, tmp_path, method="grpo")
    assert tr.embedder is None
    calls = spy_scores(tr.backend, monkeypatch)
    row = tr.step(batch, base_dir, 0)
    assert [c["layers"] for c in calls] == [[], []] and all(c["grad"] for c in calls)
    rec = tr.last
    assert torch.equal(rec.speech_reward, rec.speech_base) and not rec.rep.any() and not rec.beh.any()
    assert row["speech/reward"] == row["speech/base"] and row["speech/rep"] == row["speech/beh"] == 0

    tr, batch, base_dir = trainer(tiny, tmp_path, method="tars", layers="last-2")
    calls = spy_scores(tr.backend, monkeypatch)
    row = tr.step(batch, base_dir, 0)
    assert [(c["layers"], c["modality"]) for c in calls] == [([3, 4], "text"), ([3, 4], "speech")]
    rec = tr.last
    assert rec.rep.any() and rec.beh.any()  # some text rollout was right, so references existed
    torch.testing.assert_close(rec.speech_reward, rec.speech_base + rec.rep + rec.beh)
    # The spreads are over the questions with a reference (a correct text rollout: R_acc 1, so base ≥ 1).
    has_ref = (rec.text_base >= 1).any(1)
    assert row["speech/rep_spread"] == pytest.approx(within_group_spread(rec.rep, has_ref))
    assert row["speech/beh_spread"] == pytest.approx(within_group_spread(rec.beh, has_ref))
    assert row["speech/beh_spread"] > 0  # the completions differ, so do their embeddings
    assert row["no_reference"] == pytest.approx((~has_ref).float().mean().item())
    # The single-term ablations ask for exactly their own term's inputs.
    for method, layers, embeds in (("grpo_rep", [1, 2, 3, 4], False), ("grpo_beh", [], True)):
        tr, _, _ = trainer(tiny, tmp_path, method=method)
        assert tr.layers == layers and (tr.embedder is not None) == embeds


@needs_espeak
@pytest.mark.parametrize("scored_under", ["text", "speech"])
def test_hidden_states_come_from_the_log_prob_forward(tiny, tmp_path, lively, monkeypatch, scored_under):
    """Per step the decoder runs once per prompt batch (the prefills), once per decoded token for speech
    and text rows together, and twice per `score` (its prompts once, then every row's completion
    against the prompt's KV cache): asking for hidden states (tars) adds no pass over grpo, which asks
    for none."""
    counts = {}
    for method in ("grpo", "tars"):
        tr, batch, base_dir = trainer(tiny, tmp_path / method, method=method, text_scored_under=scored_under)
        be = tr.backend
        forwards, gens = [], []
        be.decoder().register_forward_pre_hook(lambda *_: forwards.append(1))
        real_generate = be.generate_paired

        def generate_paired(*a, **k):
            # the decoder calls of one paired generation: a prefill per modality, then the longest
            # row's sampled tokens (its last token is sampled from the previous pass: longest - 1 steps)
            before = len(forwards)
            g = real_generate(*a, **k)
            gens.append(len(forwards) - before)
            return g

        monkeypatch.setattr(be, "generate_paired", generate_paired)
        calls = spy_scores(be, monkeypatch)
        tr.step(batch, base_dir, 0)
        # a random model never stops within 6 tokens: 2 prefills + 5 decode steps, speech and text together
        assert gens == [2 + 5]
        assert len(calls) == 2
        assert [c["modality"] for c in calls] == [scored_under, "speech"]
        counts[method] = len(forwards)
    assert counts["tars"] == counts["grpo"] == 7 + 2 * 2  # one paired generation, one score per modality


def test_text_alignment_constant_cancels_in_text_advantages():
    g = torch.Generator().manual_seed(0)
    Q, Gs, Gt = 3, 4, 4
    sb, tb = torch.rand(Q, Gs, generator=g), torch.rand(Q, Gt, generator=g)
    rep, beh = torch.rand(Q, Gs, generator=g), torch.rand(Q, Gs, generator=g)
    out = {m: compose_rewards(sb, tb, rep, beh, 1.0, 0.5, m) for m in ("speech_mean", "zero", "none")}
    torch.testing.assert_close(out["speech_mean"][2], (rep + 0.5 * beh).mean(1))
    assert not out["zero"][2].any() and torch.equal(out["zero"][1], out["none"][1])
    torch.testing.assert_close(out["speech_mean"][1], tb + out["speech_mean"][2][:, None])
    torch.testing.assert_close(out["speech_mean"][0], sb + rep + 0.5 * beh)
    adv = {m: modality_advantages(s, t) for m, (s, t, _) in out.items()}
    for std in (False, True):
        a, b = modality_advantages(*out["speech_mean"][:2], std), modality_advantages(*out["zero"][:2], std)
        torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=0)  # text: the constant cancels
        torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)  # speech: untouched
    torch.testing.assert_close(adv["speech_mean"][1].sum(1), torch.zeros(Q), atol=1e-6, rtol=0)
    # Where the two modalities share a group (joint), the constant is what keeps them comparable.
    j1, j2 = modality_advantages(*out["speech_mean"][:2], joint=True), modality_advantages(*out["zero"][:2], joint=True)
    assert not torch.allclose(j1[1], j2[1])


@pytest.mark.parametrize("schedule, want", [
    # 10 steps, warm-up ceil(0.2 · 10) = 2: (s + 1) / 2, then the fraction left of the 8 others
    ("linear", [0.5, 1.0, 1.0, 0.875, 0.75]),
    # cosine of what is left: 0.5 · (1 − cos(π · left)); left 0.875 → 0.5 · (1 + 0.923880), 0.75 → 0.5 · (1 + 0.707107)
    ("cosine", [0.5, 1.0, 1.0, 0.961940, 0.853553]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
])
def test_learning_rate_schedule_by_hand(tiny, tmp_path, schedule, want):
    tr = TarsTrainer(cfg(tiny, tmp_path, warmup_frac=0.2, schedule=schedule), 10)
    got = [tr.sched.lr_lambdas[0](s) for s in range(5)]
    assert got == pytest.approx(want, abs=1e-6)


def test_batch_indices_cover_an_epoch_once_then_reshuffle():
    from tars.rl.tars import batch_indices

    steps = [batch_indices(5, s, 2, seed=7) for s in range(4)]
    assert [e for e, _ in steps] == [0, 0, 0, 1]
    assert [len(i) for _, i in steps] == [2, 2, 1, 2]  # the last batch of an epoch is smaller
    assert sorted(i for _, idx in steps[:3] for i in idx) == [0, 1, 2, 3, 4]
    assert batch_indices(5, 1, 2, seed=7) == steps[1]  # a resumed run sees the same questions


def test_modality_advantages_by_hand_with_unequal_group_sizes():
    # speech [[1, 0], [2, 2]] (means .5, 2), text [[1, 1, 0], [0, 0, 3]] (means 2/3, 1)
    s, t = torch.tensor([[1.0, 0.0], [2.0, 2.0]]), torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    a_s, a_t = modality_advantages(s, t)
    torch.testing.assert_close(a_s, torch.tensor([[0.5, -0.5], [0.0, 0.0]]))
    torch.testing.assert_close(a_t, torch.tensor([[1 / 3, 1 / 3, -2 / 3], [-1.0, -1.0, 2.0]]))
    # joint: one group per question over its 5 rollouts, means 3/5 = .6 and 7/5 = 1.4
    j_s, j_t = modality_advantages(s, t, joint=True)
    torch.testing.assert_close(j_s, torch.tensor([[0.4, -0.6], [0.6, 0.6]]))
    torch.testing.assert_close(j_t, torch.tensor([[0.4, 0.4, -0.6], [-1.4, -1.4, 1.6]]))


@needs_espeak
@pytest.mark.parametrize("joint", [False, True])
def test_a_steps_rewards_advantages_and_loss_are_wired_as_the_equations_say(tiny, tmp_path, lively, monkeypatch,
                                                                             joint):
    """With unequal group sizes (2 speech, 3 text rollouts) and unequal weights, so that swapping
    modalities or weights cannot pass: r_s = R_base + 0.5·R_rep + 2·R_beh; the text term is their mean
    per question; A = r − its group's mean (per modality, or per question with joint_groups); and the
    surrogate gets each modality's own advantages, one per rollout, so that at ratio 1 the loss is
    −Σ A_i·n_i / N over the kept tokens."""
    got = []
    real = tars_mod.clipped_surrogate

    def surrogate(logprobs, old, adv, mask, *a, **k):
        keep = k.get("keep")
        kept = (mask & (keep[:, None] if keep is not None else True)).sum(1).float()
        got.append((adv.detach().clone(), kept))
        return real(logprobs, old, adv, mask, *a, **k)

    monkeypatch.setattr(tars_mod, "clipped_surrogate", surrogate)
    tr, batch, base_dir = trainer(tiny, tmp_path, method="tars", layers="last-2", speech_rollouts=2, text_rollouts=3,
                                  w_rep=0.5, w_beh=2.0, joint_groups=joint, max_new_tokens=5)
    row = tr.step(batch, base_dir, 0)
    rec = tr.last
    assert rec.rep.any() and rec.beh.any()
    torch.testing.assert_close(rec.speech_reward, rec.speech_base + 0.5 * rec.rep + 2.0 * rec.beh)
    torch.testing.assert_close(rec.text_term, (0.5 * rec.rep + 2.0 * rec.beh).mean(1))
    torch.testing.assert_close(rec.text_reward, rec.text_base + rec.text_term[:, None])
    if joint:
        mean = torch.cat([rec.speech_reward, rec.text_reward], 1).mean(1, keepdim=True)
        want_s, want_t = rec.speech_reward - mean, rec.text_reward - mean
    else:
        want_s = rec.speech_reward - rec.speech_reward.mean(1, keepdim=True)
        want_t = rec.text_base - rec.text_base.mean(1, keepdim=True)  # the per-question text term cancels
    torch.testing.assert_close(rec.speech_adv, want_s)
    torch.testing.assert_close(rec.text_adv, want_t, atol=1e-6, rtol=0)
    assert rec.speech_adv.any() and rec.text_adv.any()
    by_size = {len(a): (a, n) for a, n in got}  # 2 questions × 2 speech = 4 rows, × 3 text = 6
    assert sorted(by_size) == [4, 6]
    torch.testing.assert_close(by_size[4][0], rec.speech_adv.flatten().to(by_size[4][0].dtype))
    torch.testing.assert_close(by_size[6][0], rec.text_adv.flatten().to(by_size[6][0].dtype), atol=1e-6, rtol=0)
    total = sum(n.sum() for _, n in got)
    want_loss = -sum(float((a * n).sum()) for a, n in got) / float(total)
    assert row["loss"] == pytest.approx(want_loss, abs=1e-5)


@needs_espeak
def test_text_alignment_modes_give_the_same_text_advantages_in_a_step(tiny, tmp_path, lively):
    got = {}
    for mode in ("speech_mean", "zero"):
        tr, batch, base_dir = trainer(tiny, tmp_path / mode, text_alignment=mode)
        tr.step(batch, base_dir, 0)
        got[mode] = tr.last
    a, b = got["speech_mean"], got["zero"]
    assert a.text_texts == b.text_texts and a.text_term.any() and not b.text_term.any()
    torch.testing.assert_close(a.text_adv, b.text_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.speech_adv, b.speech_adv, atol=0, rtol=0)


@needs_espeak
def test_a_step_with_the_static_decode_cache_equals_the_dynamic_one(tiny, tmp_path, lively, monkeypatch):
    """decode_cache=static reaches the rollouts and changes nothing of the step: texts, rewards, update."""
    from tars.models.backend import DecodeOptions

    got = {}
    for mode in ("dynamic", "static"):
        tr, batch, base_dir = trainer(tiny, tmp_path / mode, decode_cache=mode)
        seen, real = [], tr.backend.generate_paired
        monkeypatch.setattr(tr.backend, "generate_paired", lambda *a, **k: seen.append(k["decode"]) or real(*a, **k))
        m = tr.step(batch, base_dir, 0)
        assert seen == [DecodeOptions(mode)]
        got[mode] = ({k: v for k, v in m.items() if not k.startswith("time/")}, tr.last,
                     {k: v.detach().clone() for k, v in tr.lora.items()})
    (ma, la, wa), (mb, lb, wb) = got["dynamic"], got["static"]
    assert la.speech_texts == lb.speech_texts and la.text_texts == lb.text_texts
    assert ma.keys() == mb.keys() and all(ma[k] == pytest.approx(mb[k], abs=1e-5) for k in ma)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_compile_decode_needs_the_static_cache(tiny, tmp_path):
    with pytest.raises(UserError, match="compile_decode needs decode_cache=static"):
        cfg(tiny, tmp_path, compile_decode=True)
    with pytest.raises(UserError, match="decode_cache"):
        cfg(tiny, tmp_path, decode_cache="paged")
    c = cfg(tiny, tmp_path, decode_cache="static", compile_decode=True)
    assert (c.decode_cache, c.compile_decode) == ("static", True)


def test_prompt_batch_select_trims_padding_and_scores_the_same(tiny):
    from tars.data.schema import Record
    from tars.models.loading import load_backend

    be = load_backend(tiny)
    recs = [Record(id="a", question="What is 2 plus 2 plus 2 plus 2?", options=["3", "8"], answer="B"),
            Record(id="b", question="Two?", options=["1", "2"], answer="B")]
    full = be.build_inputs(recs, "text")
    one = full.select([1])
    assert one.record_ids == ["b"] and one.attention_mask.all() and one.embeds.shape[1] == full.lengths[1]
    ids = [[5, 9, 14, 2], [7, 8, 3]]
    a = be.score(full, ids, [0, 1]).logprobs[1]
    b = be.score(one, ids[1:], [0]).logprobs[0]
    torch.testing.assert_close(a[:3], b, atol=1e-5, rtol=0)


@needs_espeak
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batches_add_up_to_the_whole_batch_update(tiny, tmp_path, lively, loss_type):
    """DAPO (the default) normalises by the whole batch's kept tokens, grpo per sequence, dr_grpo by a
    constant: under each, micro-batches' summed gradients must be the whole batch's."""
    lora = {}
    for mb in (None, 1):
        tr, batch, base_dir = trainer(tiny, tmp_path / str(mb), micro_batch_questions=mb, speech_rollouts=4,
                                      text_rollouts=4, lora={"dropout": 0.0}, loss_type=loss_type, lr=1e-4)
        row = tr.step(batch, base_dir, 0)
        assert row["grad_norm"] > 0 and row["truncated"] < 1  # something was learned from kept rollouts
        lora[mb] = ({k: v.detach().clone() for k, v in tr.lora.items()}, row["loss"], row["grad_norm"])
    (a, la, ga), (b, lb, gb) = lora[None], lora[1]
    assert la == pytest.approx(lb, abs=1e-6) and ga == pytest.approx(gb, rel=1e-5)
    # One Adam step moves every weight by ~lr whatever its gradient's size, so summation-order noise
    # on a near-zero gradient shows up at up to ~lr: a small lr keeps the check about the gradients.
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@needs_espeak
@pytest.mark.parametrize("dropout,rep_dropout", [(0.0, True), (0.3, False)])
def test_a_steps_r_rep_is_the_cosine_of_independently_scored_states(tiny, tmp_path, lively, monkeypatch,
                                                                      dropout, rep_dropout):
    """R_rep of each speech rollout = the mean over the chosen layers of the cosine between its pooled
    states and those of its (round-robin) correct text reference, both scored again here, apart from
    the step, by the policy as it was before the update. Without LoRA dropout the loss's forward gives
    exactly those states; with dropout, `rep_dropout=false` must give the dropout-free ones."""
    import torch.nn.functional as F

    tr, batch, base_dir = trainer(tiny, tmp_path, method="grpo_rep", layers="2-4", reference="round_robin",
                                  lora={"dropout": dropout}, rep_dropout=rep_dropout, max_new_tokens=8,
                                  speech_rollouts=3, text_rollouts=3)
    before = {k: v.detach().clone() for k, v in tr.lora.items()}
    calls = spy_scores(tr.backend, monkeypatch)
    tr.step(batch, base_dir, 0)
    rec = tr.last
    with torch.no_grad():  # back to the weights the step scored with
        for k, p in tr.lora.items():
            p.copy_(before[k])
    be = tr.backend.eval()
    comps = {c["modality"]: c["completions"] for c in calls if c["grad"]}
    Q, G = len(batch), 3
    states = {}
    for modality in ("speech", "text"):
        prompts = be.build_inputs(batch, modality, base_dir=base_dir)
        with torch.no_grad():
            states[modality] = be.score(prompts, comps[modality], [q for q in range(Q) for _ in range(G)],
                                        [2, 3, 4]).pooled["mean"].view(Q, G, 3, -1)
    pairs = round_robin_pairs(rec, Q, G)
    for q, j, ref in pairs:
        if ref is None:
            assert rec.rep[q, j] == 0
            continue
        want = F.cosine_similarity(states["speech"][q, j], states["text"][q, ref], dim=-1).mean()
        torch.testing.assert_close(rec.rep[q, j], want, atol=1e-5, rtol=0)
    assert any(ref is not None for *_, ref in pairs)  # some question had a correct text reference


def round_robin_pairs(rec, Q: int, G: int) -> list[tuple[int, int, int | None]]:
    """(question, speech rollout, its round-robin reference among the correct text rollouts, or None),
    by the lively accuracy, for checking a step's alignment rewards by hand."""
    out = []
    for q in range(Q):
        correct = [g for g in range(G) if tars_mod.accuracy_reward([rec.text_texts[q * G + g]], [None], [None])[0] == 1]
        out += [(q, j, correct[j % len(correct)] if correct else None) for j in range(G)]
    return out


@needs_espeak
def test_a_steps_r_beh_is_the_cosine_of_the_completions_sentence_embeddings(tiny, tmp_path, lively, embedder):
    """R_beh of each speech rollout = the cosine between the sentence embeddings of its text and of its
    (round-robin) correct text reference's, embedded as generated (beh_strip_tags off)."""
    import torch.nn.functional as F

    tr, batch, base_dir = trainer(tiny, tmp_path, method="grpo_beh", reference="round_robin", max_new_tokens=8,
                                  speech_rollouts=3, text_rollouts=3)
    tr.step(batch, base_dir, 0)
    rec, G = tr.last, 3
    emb_s = embedder.embed_completions(rec.speech_texts, False).float()
    emb_t = embedder.embed_completions(rec.text_texts, False).float()
    pairs = round_robin_pairs(rec, len(batch), G)
    for q, j, ref in pairs:
        if ref is None:
            assert rec.beh[q, j] == 0
            continue
        want = F.cosine_similarity(emb_s[q * G + j], emb_t[q * G + ref], dim=-1)
        torch.testing.assert_close(rec.beh[q, j].float(), want, atol=1e-5, rtol=0)
    assert any(ref is not None for *_, ref in pairs)  # some question had a correct text reference


@needs_espeak
def test_rewards_and_advantages_carry_no_gradient(tiny, tmp_path, lively, monkeypatch):
    """Pooled states, rewards and advantages are constants of the policy gradient: a gradient through
    them would turn R_rep into a differentiable loss term the paper does not have."""
    seen = []
    real_align, real_surrogate = tars_mod.alignment_rewards, tars_mod.clipped_surrogate

    def align(*a, **k):
        for key in ("speech_pooled", "text_pooled", "speech_emb", "text_emb"):
            seen.append((key, k[key]))
        got = real_align(*a, **k)
        seen.extend([("rep", got.rep), ("beh", got.beh)])
        return got

    def surrogate(logprobs, old, adv, *a, **k):
        seen.extend([("old_logprobs", old), ("advantages", adv)])
        assert logprobs.requires_grad  # the one tensor that must carry it
        return real_surrogate(logprobs, old, adv, *a, **k)

    monkeypatch.setattr(tars_mod, "alignment_rewards", align)
    monkeypatch.setattr(tars_mod, "clipped_surrogate", surrogate)
    tr, batch, base_dir = trainer(tiny, tmp_path, method="tars", layers="last-2")
    tr.step(batch, base_dir, 0)
    assert {k for k, _ in seen} >= {"speech_pooled", "text_pooled", "speech_emb", "rep", "beh", "advantages"}
    for key, t in seen:
        assert not t.requires_grad and t.grad_fn is None, key
    rec = tr.last
    for t in (rec.speech_reward, rec.text_reward, rec.speech_adv, rec.text_adv, rec.rep, rec.beh):
        assert not t.requires_grad


@needs_espeak
def test_kl_to_the_lora_free_model(tiny, tmp_path, lively):
    tr, batch, base_dir = trainer(tiny, tmp_path, method="grpo", beta=0.1, lora={"dropout": 0.0},
                                  speech_rollouts=4, text_rollouts=4)
    first = tr.step(batch, base_dir, 0)
    second = tr.step(batch, base_dir, 1)
    assert first["kl"] == 0.0  # B = 0 at the start: the policy IS the reference
    assert second["kl"] > 0
    assert all(p.requires_grad for p in tr.params)  # the adapter toggle left them trainable


@needs_espeak
def test_killed_run_resumes_to_the_same_result(tiny, tmp_path, lively, monkeypatch, capsys):
    run(cfg(tiny, tmp_path / "a", keep_last=1), progress=False)

    real = tars_mod._save_checkpoint
    calls = {"n": 0}

    def checkpoint_then_die(out, step, *a, **k):
        real(out, step, *a, **k)
        calls["n"] += 1
        if step == 2:
            raise KeyboardInterrupt  # stands in for a SIGKILL right after the step-2 checkpoint

    monkeypatch.setattr(tars_mod, "_save_checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tiny, tmp_path / "b", keep_last=1), progress=False)
    assert calls["n"] == 2
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-0000002.pt"]  # keep_last
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a line cut short by the kill
    monkeypatch.setattr(tars_mod, "_save_checkpoint", real)
    capsys.readouterr()
    run(cfg(tiny, tmp_path / "b", keep_last=1), progress=False)
    assert "from step 2" in capsys.readouterr().out  # resumed, not restarted (which would agree too)

    a, b = lora_of(tmp_path / "a" / "adapter"), lora_of(tmp_path / "b" / "adapter")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    ra = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb):
        for k in x:
            if not k.startswith("time/"):
                assert x[k] == pytest.approx(y[k], abs=1e-5), k
    assert any(r["loss"] != 0 for r in ra)


def test_bad_config_names_the_key(tiny, tmp_path):
    with pytest.raises(UserError, match="learning_rate: unknown key"):
        cfg(tiny, tmp_path, learning_rate=1e-5)
    with pytest.raises(UserError, match="lora.rank: unknown key"):
        cfg(tiny, tmp_path, lora={"rank": 4})
    with pytest.raises(UserError, match="method"):
        cfg(tiny, tmp_path, method="ppo")
    with pytest.raises(UserError, match="layers"):
        cfg(tiny, tmp_path, layers="deepest")
    assert cfg(tiny, tmp_path, layers="1,3").layers == "1,3"


def test_bad_config_on_the_command_line_is_one_line(tiny, tmp_path):
    from conftest import run_cli

    conf = tmp_path / "c.yaml"
    conf.write_text(f"model: {tiny}\nout: {tmp_path / 'o'}\nsteps: many\n")
    r = run_cli("train", "--config", conf)
    assert r.returncode == 2 and "steps" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("train", "--config", conf, "steps=2", f"model={tmp_path / 'no-model'}")
    assert r.returncode == 2 and "no-model: model folder not found" in r.stderr and "Traceback" not in r.stderr


@needs_espeak
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_imitation_baselines_train_on_correct_text_rollouts_under_the_speech_prompt(tiny, tmp_path, lively,
                                                                                    monkeypatch, method):
    tr, batch, base_dir = trainer(tiny, tmp_path, method=method, text_rollouts=4, speech_rollouts=4)
    calls = spy_scores(tr.backend, monkeypatch)
    gens, real_generate = [], tr.backend.generate_paired
    monkeypatch.setattr(tr.backend, "generate_paired", lambda *a, **k: gens.append(real_generate(*a, **k)) or gens[-1])
    before = {k: v.detach().clone() for k, v in tr.lora.items()}
    row = tr.step(batch, base_dir, 0)
    assert all(c["modality"] == "speech" for c in calls)
    grad_calls = [c for c in calls if c["grad"]]
    assert len(grad_calls) == 1 and [c["grad"] for c in calls] == ([True] if method == "sft" else [False, True])
    assert row["loss"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
    assert any(not torch.equal(before[k], v) for k, v in tr.lora.items())
    # The targets: per question a correct text rollout that was not cut by the length limit (and, for
    # DPO, a wrong speech rollout to reject); a question without one trains nothing.
    (speech, text), = gens
    G = 4
    right = [a == 1 for a in tars_mod.accuracy_reward(text.texts, [None] * len(text.texts), [None] * len(text.texts))]
    good = [[i for i in range(q * G, (q + 1) * G) if right[i] and not text.truncated[i]] for q in range(len(batch))]
    wrong_s = [[i for i in range(q * G, (q + 1) * G)
                if tars_mod.accuracy_reward([speech.texts[i]], [None], [None])[0] != 1] for q in range(len(batch))]
    has = [bool(g) and (method == "sft" or bool(w)) for g, w in zip(good, wrong_s)]
    assert any(has)
    assert row["imitation/no_target"] == pytest.approx(1 - sum(has) / len(batch))
    chosen = grad_calls[0]["completions"] if method == "sft" else grad_calls[0]["completions"][0::2]
    assert len(chosen) == sum(has)
    assert all(c in [list(text.token_ids[i]) for i in g] for c, g in zip(chosen, [g for g, h in zip(good, has) if h]))
    assert row["imitation/target_entropy"] > 0
    if method == "dpo":
        assert {"dpo/margin", "dpo/pair_accuracy"} <= set(row)
        assert calls[0]["completions"] == grad_calls[0]["completions"]  # the reference scores the same pairs


@needs_espeak
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_a_text_rollout_cut_by_the_length_limit_is_never_a_target(tiny, tmp_path, lively, monkeypatch, method):
    """Here exactly the truncated text rollouts are "right": none may be imitated, so nothing trains."""
    gens = []
    tr, batch, base_dir = trainer(tiny, tmp_path, method=method, text_rollouts=4, speech_rollouts=4, max_new_tokens=4)
    real_generate = tr.backend.generate_paired
    monkeypatch.setattr(tr.backend, "generate_paired", lambda *a, **k: gens.append(real_generate(*a, **k)) or gens[-1])

    def right_iff_cut(texts, options, answers):
        (_, text), = gens
        cut = {t for t, trunc in zip(text.texts, text.truncated) if trunc}
        return [1.0 if t in cut else 0.0 for t in texts]

    monkeypatch.setattr(tars_mod, "accuracy_reward", right_iff_cut)
    before = {k: v.detach().clone() for k, v in tr.lora.items()}
    row = tr.step(batch, base_dir, 0)
    assert any(gens[0][1].truncated)  # there were cut rollouts to refuse
    assert row["imitation/no_target"] == 1.0 and row["loss"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in tr.lora.items())


WORKER = Path(__file__).parent / "dist_worker.py"


def _worker(tiny, home, out, *overrides, launch=None, env=None):
    """dist_worker.py alone, or under `accelerate launch --config_file configs/accelerate/<launch>.yaml`.

    accelerate's `--cpu` path starts several processes only through MPI; the launchers the shipped
    files select (torchrun for ddp and fsdp, DeepSpeed's for zero2) on a machine without GPUs start CPU
    processes that meet over gloo — the same code paths as on GPUs, NCCL aside."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TARS_HOME": str(home), **(env or {})}
    cmd = [sys.executable, str(WORKER), str(tiny), str(out), *overrides]
    if launch:
        cfg = Path(__file__).parents[1] / "configs" / "accelerate" / f"{launch}.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--num_processes", "2",
               *cmd[1:]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _same_run(a, b):
    ra = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines()]
    assert len(ra) == len(rb) == 2 and any(r["loss"] != 0 for r in ra)
    for x, y in zip(ra, rb):
        assert set(x) == set(y)
        for k in x:
            if not k.startswith("time/"):
                assert x[k] == pytest.approx(y[k], abs=1e-5), k
    wa, wb = lora_of(a / "adapter"), lora_of(b / "adapter")
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """The 1-process run of each method (made once), merged model saved."""
    runs = {}

    def get(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp(f"one_{method}") / "run"
            assert "world 1" in _worker(tiny, out.parent / "home", out, f"method={method}", "save_merged=true")
            runs[method] = out
        return runs[method]

    return get


@needs_espeak
@pytest.mark.parametrize("launch,method", [("ddp", "tars"), ("fsdp", "tars"), ("zero2", "tars"), ("fsdp", "dpo"),
                                           ("zero2", "sft")])
def test_two_processes_give_the_same_loss_and_update_as_one(tiny, one_process, tmp_path, launch, method):
    """Each process takes 2 or 1 of the step's 3 questions, in micro-batches of one; the losses,
    metrics and LoRA weights after 2 steps equal a 1-process run's, for every shipped launcher file
    (and the imitation baselines, whose target counts differ between processes). FSDP's merged model
    (rebuilt from the adapter, its blocks being sharded) equals the 1-process one."""
    out = tmp_path / "two"
    stdout = _worker(tiny, tmp_path / "home", out, f"method={method}", f"save_merged={launch == 'fsdp'}",
                     launch=launch)
    assert "world 2" in stdout and f"parallel: {launch}" in stdout
    here, whole = (float(x.replace(",", "")) for x in re.search(r"held by this process: ([\d.,]+) of ([\d.,]+) MiB", stdout).groups())
    assert here < 0.75 * whole if launch == "fsdp" else here == whole  # fsdp: half of every block
    _same_run(one_process(method), out)
    if launch == "fsdp":
        from safetensors.torch import load_file

        [a], [b] = (sorted((d / "model").glob("*.safetensors")) for d in (one_process(method), out))
        wa, wb = load_file(a), load_file(b)
        assert set(wa) == set(wb) and not any("lora" in k for k in wb)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


@needs_espeak
@pytest.mark.parametrize("launch", ["fsdp", "zero2"])
def test_a_two_process_run_stopped_after_a_checkpoint_resumes_to_the_same_end(tiny, one_process, tmp_path, launch):
    """A 2-process run stopped right after its step-1 checkpoint and started again ends where the
    uninterrupted 1-process run does. A ZeRO-2 checkpoint holds each process's optimizer partition;
    an fsdp one the whole optimizer (the LoRA is not sharded)."""
    out = tmp_path / "two"
    _worker(tiny, tmp_path / "home", out, "save_every=1", launch=launch, env={"TARS_TEST_EXIT_AFTER_CHECKPOINT": "1"})
    assert not (out / "DONE").exists()
    [ck] = (out / "checkpoints").glob("step-*.pt")
    state = torch.load(ck, map_location="cpu", weights_only=False)
    assert state["step"] == 1
    if launch == "zero2":
        assert state["optimizer_layout"] == "zero2 x2" and len(state["opt"]) == 2
    else:
        assert state["optimizer_layout"] == "whole" and state["opt"]["state"]
    assert "resuming" in _worker(tiny, tmp_path / "home", out, "save_every=1", launch=launch)
    _same_run(one_process("tars"), out)


@needs_espeak
def test_a_checkpoint_resumes_only_under_its_optimizer_layout(tiny, tmp_path):
    """A ddp / fsdp checkpoint holds the whole optimizer, a ZeRO-2 one partitions: mixing them is an error."""
    tr, _, _ = trainer(tiny, tmp_path)
    state = tr.state_dict()
    assert state["optimizer_layout"] == "whole"
    tr.load_state_dict(state)
    with pytest.raises(UserError, match="zero2 x2.*parallel setting"):
        tr.load_state_dict({**state, "optimizer_layout": "zero2 x2"})


@needs_espeak
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_imitation_runs_end_to_end(tiny, tmp_path, lively, method):
    run(cfg(tiny, tmp_path / "run", method=method, steps=2, speech_rollouts=3, text_rollouts=3), progress=True)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and (tmp_path / "run" / "DONE").exists()


def test_the_strategy_follows_the_accelerate_launch_file(monkeypatch):
    from tars.rl.strategies import launcher_choice

    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(var, raising=False)
    assert launcher_choice() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert launcher_choice() == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert launcher_choice() == "zero2"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(UserError, match="ZeRO stage 3 is not supported.*fsdp.yaml"):
        launcher_choice()


@needs_espeak
def test_truncated_importance_sampling_weights_the_policy_gradient(tiny, tmp_path, lively):
    """With tis_cap the step logs the TIS weights; the sampler-vs-trainer KL is logged either way. The
    lively test sampler forces its stop tokens (probability 1 under it, π(stop) under the policy), so
    those tokens weigh π(stop) < 1 and the mean weight is below 1; nothing reaches the cap (the cap
    itself is checked by hand in test_losses.py)."""
    rows = {}
    for cap in (None, 2.0):
        tr, batch, base_dir = trainer(tiny, tmp_path / str(cap), tis_cap=cap)
        rows[cap] = tr.step(batch, base_dir, 0)
    assert rows[None]["sampler/kl"] > 0 and "tis/weight" not in rows[None]
    assert rows[2.0]["sampler/kl"] == pytest.approx(rows[None]["sampler/kl"], abs=1e-6)
    assert 0 < rows[2.0]["tis/weight"] < 1 and rows[2.0]["tis/capped"] == 0
    assert rows[2.0]["loss"] != pytest.approx(rows[None]["loss"])
