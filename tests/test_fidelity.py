"""The fidelity switches of docs/fidelity.md, each shown to change what it claims, and the pooling
fixes of issue 14 (padded positions holding inf/NaN, float32 pooled states under a bf16 model)."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import needs_espeak, run_cli
from tars.config import validate
from tars.data.schema import Record
from tars.data.sources import load_data
from tars.errors import UserError
from tars.models.backend import sample_next_with_logprob
from tars.models.loading import load_backend
from tars.rl import tars as tars_mod
from tars.rl.tars import TarsConfig, TarsTrainer
from tiny_models import tiny_qwen2_audio

DATA = {"families": ["facts", "comparison"], "n": 4, "seed": 5}
RECS = [Record(id="a", question="What is 2 plus 2 plus 2 plus 2, all told?", options=["3", "8"], answer="B"),
        Record(id="b", question="Two?", options=["1", "2", "3"], answer="B")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_qwen2_audio(tmp_path_factory.mktemp("m") / "model", window_s=20.0)


@pytest.fixture
def be(tiny):
    return load_backend(tiny)


def comps_of(be):
    stop = be.stop_token_ids[0]
    return [[5, 9, 14, 17, stop], [7, 8]]  # row 1 is shorter: completion padding after it


def cfg(tiny, out, **kw):
    base = dict(model=str(tiny), out=str(out), data=DATA, steps=3, questions_per_step=2, speech_rollouts=2,
                text_rollouts=2, max_new_tokens=6, lr=1e-2, warmup_frac=0.0, save_every=1, seed=3)
    base.update(kw)
    return validate(TarsConfig, base)


def _out(o):
    return o[0] if isinstance(o, tuple) else o


# ---- pooling: padded positions and precision ------------------------------------------------------
def test_pooling_ignores_inf_and_nan_at_padded_positions(be):
    """A hook writes inf and NaN into the last block's output wherever a row has no token (the prompt's
    left padding, the completion's right padding): pooled states, log-probs and entropies come out
    finite and exactly as without it. (Multiplying by a 0/1 mask gave 0 · inf = NaN.)"""
    batch = be.build_inputs(RECS, "text")
    comps = comps_of(be)
    assert len(set(batch.lengths)) > 1
    n = len(be.decoder_layers())
    clean = be.score(batch, comps, [0, 1], layers=[n], entropy=True)
    T = max(map(len, comps))
    cmask = torch.tensor([[t < len(c) for t in range(T)] for c in comps])
    empty = torch.cat([batch.attention_mask == 0, ~cmask], 1)  # [N, P+T] positions holding no token
    P = batch.embeds.shape[1]
    assert empty[:, :P].any() and empty[:, P:].any()  # both kinds of padding are there

    def corrupt(_m, _i, out):
        h = _out(out).clone()
        h[empty] = float("inf")
        h[empty & (torch.arange(h.shape[1]) % 2 == 0)] = float("nan")
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = be.decoder_layers()[-1].register_forward_hook(corrupt)
    try:
        dirty = be.score(batch, comps, [0, 1], layers=[n], entropy=True)
    finally:
        handle.remove()
    for kind in ("mean", "last"):
        assert torch.isfinite(dirty.pooled[kind]).all()
        assert torch.equal(dirty.pooled[kind], clean.pooled[kind])
    assert torch.isfinite(dirty.logprobs).all() and torch.equal(dirty.logprobs, clean.logprobs)
    assert torch.isfinite(dirty.entropy).all() and torch.equal(dirty.entropy, clean.entropy)


def test_a_bf16_models_pooled_states_are_float32_means(tiny):
    """Pooled sums and means are float32 under a bf16 model: equal to the float32 mean of the model's
    own bf16 states (a plain forward), not that mean rounded to bf16; and close to the fp32 model's."""
    be16, be32 = load_backend(tiny, dtype=torch.bfloat16), load_backend(tiny)
    comps = comps_of(be16)
    n = len(be16.decoder_layers())
    layers = list(range(1, n))  # hidden_states[l] is block l's output for l < n
    rounded_differs = False
    for i, rec in enumerate(RECS):
        inp = be16.build_inputs([rec], "text")
        got = be16.score(inp, [comps[i]], [0], layers=layers)
        assert got.pooled["mean"].dtype == got.pooled["last"].dtype == torch.float32
        embeds = torch.cat([inp.embeds[0], be16.embed_tokens(torch.tensor(comps[i]))], 0)[None]
        with torch.no_grad():
            hs = be16.decoder()(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        P, k = inp.embeds.shape[1], len(comps[i]) - (comps[i][-1] in be16.stop_token_ids)
        for j, l in enumerate(layers):
            want = hs[l][0, P : P + k].float().mean(0)
            torch.testing.assert_close(got.pooled["mean"][0, j], want, atol=1e-6, rtol=1e-6)
            rounded_differs |= not torch.equal(want.bfloat16().float(), got.pooled["mean"][0, j])
        ref = be32.score(be32.build_inputs([rec], "text"), [comps[i]], [0], layers=layers).pooled["mean"]
        cos = torch.nn.functional.cosine_similarity(got.pooled["mean"], ref, dim=-1)
        assert cos.min() > 0.999
        torch.testing.assert_close(got.pooled["mean"], ref, atol=0.05 * float(ref.abs().max()), rtol=0.05)
    assert rounded_differs  # bf16 storage would have moved the means


# ---- last_layer -----------------------------------------------------------------------------------
def test_last_layer_pre_norm_is_the_blocks_output_post_norm_is_hf_hidden_states(be):
    with torch.no_grad():
        be.decoder().norm.weight.copy_(torch.linspace(0.1, 4.0, be.decoder().norm.weight.numel()))
    inp = be.build_inputs(RECS[:1], "text")
    comp = comps_of(be)[0]
    n = len(be.decoder_layers())
    pre = be.score(inp, [comp], [0], layers=[n - 1, n])
    post = be.score(inp, [comp], [0], layers=[n - 1, n], last_layer="post_norm")
    embeds = torch.cat([inp.embeds[0], be.embed_tokens(torch.tensor(comp))], 0)[None]
    block = {}
    handle = be.decoder_layers()[-1].register_forward_hook(lambda m, i, o: block.setdefault("h", _out(o)))
    with torch.no_grad():
        hs = be.decoder()(inputs_embeds=embeds, output_hidden_states=True).hidden_states
    handle.remove()
    P, k = inp.embeds.shape[1], len(comp) - 1  # the stop token is not pooled
    torch.testing.assert_close(post.pooled["mean"][0, 1], hs[n][0, P : P + k].mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(post.pooled["last"][0, 1], hs[n][0, P + k - 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pre.pooled["mean"][0, 1], block["h"][0, P : P + k].mean(0), atol=1e-5, rtol=0)
    assert (pre.pooled["mean"][0, 1] - post.pooled["mean"][0, 1]).abs().max() > 0.1
    assert torch.equal(pre.pooled["mean"][:, 0], post.pooled["mean"][:, 0])  # other layers: untouched
    assert torch.equal(pre.logprobs, post.logprobs)
    with pytest.raises(ValueError, match="last_layer must be one of"):
        be.score(inp, [comp], [0], layers=[n], last_layer="final")


# ---- scoring temperature --------------------------------------------------------------------------
def test_score_temperature_gives_the_samplers_log_probs(be):
    """At temperature 0.5 (top-p 1) the sampler's recorded log-probs are those of softmax(logits / 0.5):
    `score(temperature=0.5)` reproduces them, `score()` (temperature 1) does not."""
    batch = be.build_inputs(RECS, "text")
    gen = be.generate(batch, 2, temperature=0.5, max_new_tokens=5, row_seeds=[1, 2, 3, 4], logprobs=True)
    at_t = be.score(batch, gen.token_ids, gen.prompt_index, temperature=0.5)
    at_1 = be.score(batch, gen.token_ids, gen.prompt_index)
    sampler = torch.zeros_like(at_t.logprobs)
    for r, lp in enumerate(gen.logprobs):
        sampler[r, : len(lp)] = torch.tensor(lp)
    torch.testing.assert_close(at_t.logprobs, sampler, atol=1e-4, rtol=0)
    assert (at_1.logprobs - sampler).abs().max() > 1e-2
    # by hand on one row of logits: log_softmax(z / T) of the chosen token
    z = torch.tensor([[2.0, 0.0, -1.0]])
    tok, lp = sample_next_with_logprob(z, 0.5, 1.0, None, torch.tensor([0.0]))
    assert lp.item() == pytest.approx(torch.log_softmax(z / 0.5, -1)[0, tok].item())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        be.score(batch, gen.token_ids, gen.prompt_index, temperature=0.0)


def test_the_trainer_scores_at_the_sampling_temperature_unless_told_otherwise(tiny, tmp_path):
    def kw(**c):
        return TarsTrainer(cfg(tiny, tmp_path, method="grpo", **c), 1).score_kw

    assert kw(temperature=0.7) == {"temperature": 0.7, "last_layer": "pre_norm"}
    assert kw(temperature=0.7, score_temperature="one")["temperature"] == 1.0
    assert kw(temperature=0.0)["temperature"] == 1.0  # greedy rollouts: nothing to match, score at 1
    assert kw(last_layer="post_norm")["last_layer"] == "post_norm"


# ---- format levels, layer groups ------------------------------------------------------------------
def test_format_levels_in_the_base_reward(tiny, tmp_path):
    texts = ["<think>x</think><answer>The answer is B.</answer>",  # right, strict
             "Sure! <think>x</think><answer>The answer is B.</answer>",  # right, loose
             "<answer>A</answer>"]  # wrong, loose (a bare letter)
    batch = [Record(id="q", question="2 + 2?", options=["3", "4"], answer="B")]
    got = {}
    for levels in ("binary", "graded"):
        tr = TarsTrainer(cfg(tiny, tmp_path / levels, method="grpo", format_levels=levels), 1)
        acc, fmt, base = tr._base_rewards(texts, batch, 3)
        got[levels] = (acc.tolist(), fmt.tolist(), base.tolist())
    # graded (reference scale) × λ 0.5: 1 + 0.5, 1 + 0.25, 0 + 0.25; binary (paper): 1.5, 1.0, 0.0
    assert got["graded"] == ([[1.0, 1.0, 0.0]], [[1.0, 0.5, 0.5]], [[1.5, 1.25, 0.25]])
    assert got["binary"] == ([[1.0, 1.0, 0.0]], [[1.0, 0.0, 0.0]], [[1.5, 1.0, 0.0]])
    assert TarsConfig.model_fields["format_levels"].default == "binary"


def test_base_rewards_pair_each_rollout_with_its_own_questions_answer(tiny, tmp_path):
    """Rows are prompt-major (question 0's G rollouts, then question 1's): each is scored against its
    own question's options and gold letter, which differ here (B, then A)."""
    batch = [Record(id="q1", question="2 + 2?", options=["3", "4"], answer="B"),
             Record(id="q2", question="1 + 1?", options=["2", "5"], answer="A")]
    texts = ["<think>x</think><answer>The answer is B.</answer>", "<think>x</think><answer>The answer is A.</answer>",
             "<think>x</think><answer>The answer is B.</answer>", "<think>x</think><answer>The answer is A.</answer>"]
    tr = TarsTrainer(cfg(tiny, tmp_path, method="grpo"), 1)
    acc, fmt, base = tr._base_rewards(texts, batch, 2)
    assert acc.tolist() == [[1.0, 0.0], [0.0, 1.0]] and fmt.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert base.tolist() == [[1.5, 0.5], [0.5, 1.5]]  # R_acc + 0.5 · R_fmt


def test_layer_groups_in_the_trainer(tiny, tmp_path):
    def layers(**c):
        return TarsTrainer(cfg(tiny, tmp_path, method="grpo_rep", **c), 1).layers

    assert layers(layers="deep", layer_groups="equal_thirds") == [4]  # 4 = 2 + 1 + 1
    assert layers(layers="shallow") == [1, 2, 3, 4]  # the paper's 1-10, cut to 4 layers
    assert layers(layers="2-3") == [2, 3]
    with pytest.raises(UserError, match="config: layers: .*no deep group.*layer_groups=equal_thirds"):
        layers(layers="deep")


# ---- the embedder ---------------------------------------------------------------------------------
@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_the_paper_embedder_missing_offline_stops_the_run_before_the_model_loads(tmp_path, empty_hub_cache):
    c = cfg(tmp_path / "no-such-model", tmp_path / "run", embedder="Qwen/Qwen3-Embedding-0.6B")
    with pytest.raises(UserError, match=r"^config: embedder: Qwen/Qwen3-Embedding-0.6B cannot be loaded offline"):
        tars_mod.run(c, progress=False)
    assert not (tmp_path / "run").exists()
    # grpo has no R_beh: the embedder is never looked for, the (missing) model is the first complaint
    with pytest.raises(UserError, match="model folder not found"):
        tars_mod.run(cfg(tmp_path / "no-such-model", tmp_path / "run2", method="grpo",
                         embedder="Qwen/Qwen3-Embedding-0.6B"), progress=False)


def test_the_7b_recipe_without_its_embedder_is_one_line_on_the_command_line(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "TARS_HOME": str(tmp_path / "home")}
    r = run_cli("train", "--config", "configs/qwen2_audio_7b.yaml", f"model={tmp_path / 'm'}",
                f"out={tmp_path / 'run'}", env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "embedder" in lines[0] and "embedder=null" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


# ---- a step: rep_dropout, beh_strip_tags, the temperature it scores at ----------------------------
@pytest.fixture
def lively(monkeypatch):
    from lively import make_lively

    make_lively(monkeypatch.setattr)


def spy(backend, monkeypatch):
    """Each score call's layers / grad / kwargs / pooled output, and the same call's pooled states
    from a dropout-free (eval mode) forward for comparison."""
    calls, real = [], backend.score

    def score(inputs, completions, prompt_index, layers=None, grad=False, **kw):
        out = real(inputs, completions, prompt_index, layers, grad, **kw)
        call = {"layers": list(layers or []), "grad": grad, "training": backend.training, "kw": kw,
                "pooled": out.pooled.get("mean")}
        if layers:
            was = backend.training
            backend.eval()
            call["eval_pooled"] = real(inputs, completions, prompt_index, layers, **kw).pooled["mean"]
            backend.train(was)
        calls.append(call)
        return out

    monkeypatch.setattr(backend, "score", score)
    return calls


def _randomise_lora_b(tr):
    """LoRA B starts at 0, where dropout on the adapter changes nothing: give it weight."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, p in tr.lora.items():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@needs_espeak
def test_rep_dropout_off_takes_r_rep_from_a_dropout_free_forward(tiny, tmp_path, lively, monkeypatch):
    recs = {}
    for rep_dropout in (True, False):
        c = cfg(tiny, tmp_path / str(rep_dropout), method="grpo_rep", rep_dropout=rep_dropout, temperature=0.7,
                lora={"dropout": 0.5}, layers="last-2")
        records, base_dir = load_data(c.data, "speech")
        tr = TarsTrainer(c, c.steps)
        _randomise_lora_b(tr)
        calls = spy(tr.backend, monkeypatch)
        tr.step(records[:2], base_dir, 0)
        recs[rep_dropout] = tr.last
        assert all((x["kw"]["temperature"], x["kw"]["last_layer"]) == (0.7, "pre_norm") for x in calls)
        asked = [call for call in calls if call["layers"]]
        if rep_dropout:  # the loss's two forwards hand out the states: train mode, dropout on
            assert [(x["layers"], x["grad"], x["training"]) for x in calls] == [([3, 4], True, True)] * 2
            assert all((x["pooled"] - x["eval_pooled"]).abs().max() > 1e-3 for x in asked)
        else:  # two more no-grad forwards in eval mode; the loss's forwards ask for no states
            assert [(x["layers"], x["grad"], x["training"]) for x in calls] == \
                [([3, 4], False, False)] * 2 + [([], True, True)] * 2
            assert all(torch.equal(x["pooled"], x["eval_pooled"]) for x in asked)
    on, off = recs[True], recs[False]
    assert on.speech_texts == off.speech_texts and on.text_texts == off.text_texts  # same rollouts
    assert on.rep.any() and not torch.allclose(on.rep, off.rep)  # only the states' dropout differs


class _StubEmbedder:
    def __init__(self):
        self.strip = []

    def embed_completions(self, texts, strip_tags=True):
        self.strip.append(strip_tags)
        g = torch.Generator().manual_seed(len(texts))
        return torch.randn(len(texts), 4, generator=g)


@needs_espeak
@pytest.mark.parametrize("strip", [False, True])
def test_beh_strip_tags_reaches_the_embedder(tiny, tmp_path, lively, strip):
    c = cfg(tiny, tmp_path, method="grpo_beh", beh_strip_tags=strip)
    records, base_dir = load_data(c.data, "speech")
    stub = _StubEmbedder()
    tr = TarsTrainer(c, c.steps, embedder=stub)
    tr.step(records[:2], base_dir, 0)
    assert stub.strip == [strip]
    assert TarsConfig.model_fields["beh_strip_tags"].default is False


@needs_espeak
def test_truncated_in_normalizer_counts_the_masked_tokens_in_the_denominator(tiny, tmp_path, lively, monkeypatch):
    """Same rollouts and advantages; only the DAPO denominator changes: kept tokens, or every sampled
    token. The loss scales by exactly their ratio."""
    seen, real = [], tars_mod.loss_normalizer

    def normalizer(mask, keep=None, loss_type="dapo"):
        seen.append((float(mask.sum()), None if keep is None else float((mask & keep[:, None]).sum())))
        return real(mask, keep, loss_type)

    monkeypatch.setattr(tars_mod, "loss_normalizer", normalizer)
    loss = {}
    for flag in (False, True):
        c = cfg(tiny, tmp_path / str(flag), method="grpo", truncated_in_normalizer=flag, lora={"dropout": 0.0},
                speech_rollouts=4, text_rollouts=4)
        records, base_dir = load_data(c.data, "speech")
        loss[flag] = TarsTrainer(c, c.steps).step(records[:2], base_dir, 0)["loss"]
    (all_tokens, kept), (all_tokens2, none) = seen
    assert none is None and all_tokens == all_tokens2 and 0 < kept < all_tokens  # some rollouts truncated
    assert loss[False] != 0
    assert loss[True] == pytest.approx(loss[False] * kept / all_tokens, rel=1e-5)
