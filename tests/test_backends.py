"""Backends on tiny random models of the real transformers classes: batching, pooling, generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from tars.data.schema import Record
from tars.errors import UserError
from tars.models.loading import load_backend
from tiny_models import tiny_phi4_mm, tiny_qwen2_5_omni, tiny_qwen2_audio, tone_records

BUILDERS = {"qwen2_audio": tiny_qwen2_audio, "qwen2_5_omni": tiny_qwen2_5_omni, "phi4_mm": tiny_phi4_mm}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def setup(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](d / "model")
    backend = load_backend(d / "model")
    recs = tone_records(d, ["What is 2 plus 2?", "Which is bigger, 3 or 30? Think.", "Pick one."])
    return backend, recs, d


def completions(backend, n_vocab, seed=0):
    """Three completions of different lengths; the first two end with a stop token."""
    g = torch.Generator().manual_seed(seed)
    stop = backend.stop_token_ids[0]
    lens = [5, 9, 3]
    out = [torch.randint(5, n_vocab - 1, (n,), generator=g).tolist() for n in lens]
    out[0][-1] = stop
    out[1][-1] = stop
    return out


@pytest.mark.parametrize("modality", ["text", "speech"])
def test_padded_batch_scores_equal_one_by_one(setup, modality):
    backend, recs, d = setup
    comps = completions(backend, len(backend.tokenizer))
    batch = backend.build_inputs(recs, modality, base_dir=d)
    assert len(set(batch.lengths)) > 1, "prompts must differ in length for padding to be exercised"
    layers = list(range(1, len(backend.decoder_layers()) + 1))
    full = backend.score(batch, comps, [0, 1, 2], layers=layers)
    for i in range(3):
        one = backend.score(backend.build_inputs([recs[i]], modality, base_dir=d), [comps[i]], [0], layers=layers)
        n = len(comps[i])
        torch.testing.assert_close(full.logprobs[i, :n], one.logprobs[0, :n], atol=1e-4, rtol=0)
        assert torch.all(full.logprobs[i, n:] == 0)
        for kind in ("mean", "last"):
            torch.testing.assert_close(full.pooled[kind][i], one.pooled[kind][0], atol=1e-4, rtol=0)


def test_pooling_covers_exactly_the_completion_tokens(setup):
    """Against states from a plain forward with output_hidden_states: mean over the completion
    positions without the final stop token; last = the last of those."""
    backend, recs, d = setup
    comps = completions(backend, len(backend.tokenizer))
    batch = backend.build_inputs(recs[:1], "text")
    got = backend.score(batch, comps[:1], [0], layers=[1, 3])
    c = torch.tensor(comps[0])
    embeds = torch.cat([batch.embeds[0], backend.embed_tokens(c)], 0)[None]
    with torch.no_grad():
        out = backend.decoder()(inputs_embeds=embeds, output_hidden_states=True)
    P, n = batch.embeds.shape[1], len(comps[0])
    for j, layer in enumerate([1, 3]):
        h = out.hidden_states[layer][0]
        want_mean = h[P : P + n - 1].mean(0)  # the final token is the stop token: excluded
        torch.testing.assert_close(got.pooled["mean"][0, j], want_mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.pooled["last"][0, j], h[P + n - 2], atol=1e-5, rtol=0)
    # A completion without a stop token (truncated) pools over all its tokens.
    got3 = backend.score(backend.build_inputs(recs[2:], "text"), comps[2:], [0], layers=[2])
    b3 = backend.build_inputs(recs[2:], "text")
    e3 = torch.cat([b3.embeds[0], backend.embed_tokens(torch.tensor(comps[2]))], 0)[None]
    with torch.no_grad():
        h3 = backend.decoder()(inputs_embeds=e3, output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(got3.pooled["mean"][0, 0], h3[b3.embeds.shape[1]:].mean(0), atol=1e-5, rtol=0)


def test_logprobs_match_the_full_models_logits(setup):
    backend, recs, d = setup
    comps = completions(backend, len(backend.tokenizer))
    batch = backend.build_inputs(recs[1:2], "speech", base_dir=d)
    got = backend.score(batch, comps[1:2], [0])
    c = torch.tensor(comps[1])
    embeds = torch.cat([batch.embeds[0], backend.embed_tokens(c)], 0)[None]
    with torch.no_grad():
        h = backend.decoder()(inputs_embeds=embeds).last_hidden_state
        lp = torch.log_softmax(backend.lm_head()(h).float(), -1)[0]
    P = batch.embeds.shape[1]
    want = lp[P - 1 : P - 1 + len(c)].gather(-1, c[:, None]).squeeze(-1)
    torch.testing.assert_close(got.logprobs[0], want, atol=1e-5, rtol=0)


def test_entropy_is_that_of_the_full_next_token_distribution(setup):
    backend, recs, d = setup
    comps = completions(backend, len(backend.tokenizer))
    batch = backend.build_inputs(recs, "text", base_dir=d)
    got = backend.score(batch, comps, [0, 1, 2], entropy=True)
    assert backend.score(batch, comps, [0, 1, 2]).entropy is None
    c = torch.tensor(comps[1])
    one = backend.build_inputs(recs[1:2], "text", base_dir=d)
    embeds = torch.cat([one.embeds[0], backend.embed_tokens(c)], 0)[None]
    with torch.no_grad():
        p = torch.softmax(backend.lm_head()(backend.decoder()(inputs_embeds=embeds).last_hidden_state).float(), -1)[0]
    P = one.embeds.shape[1]
    want = -(p * p.log()).sum(-1)[P - 1 : P - 1 + len(c)]
    torch.testing.assert_close(got.entropy[1, : len(c)], want, atol=1e-4, rtol=0)
    assert torch.all(got.entropy[2, len(comps[2]):] == 0)
    assert float(got.entropy.max()) <= float(torch.log(torch.tensor(float(p.shape[-1])))) + 1e-4


@pytest.mark.parametrize("modality", ["text", "speech"])
def test_greedy_generation_batched_equals_single_and_agrees_with_score(setup, modality):
    backend, recs, d = setup
    batch = backend.build_inputs(recs, modality, base_dir=d)
    gen = backend.generate(batch, num_samples=1, temperature=0.0, max_new_tokens=6)
    for i in range(3):
        one = backend.generate(backend.build_inputs([recs[i]], modality, base_dir=d), temperature=0.0,
                               max_new_tokens=6)
        assert one.token_ids[0] == gen.token_ids[i]
    # Each greedy token is the arg-max under the one-forward scorer: KV-cache decoding and scoring see
    # the same positions.
    sc = backend.score(batch, gen.token_ids, gen.prompt_index)
    for r, ids in enumerate(gen.token_ids):
        c = torch.tensor(ids)
        embeds = torch.cat([batch.embeds[gen.prompt_index[r]], backend.embed_tokens(c)], 0)[None]
        mask = torch.cat([batch.attention_mask[gen.prompt_index[r]], torch.ones(len(ids), dtype=torch.long)])[None]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            h = backend.decoder()(inputs_embeds=embeds, attention_mask=mask,
                                  position_ids=backend.positions(pos)).last_hidden_state
            lp = torch.log_softmax(backend.lm_head()(h).float(), -1)[0]
        P = batch.embeds.shape[1]
        assert lp[P - 1 : P - 1 + len(ids)].argmax(-1).tolist() == ids
        torch.testing.assert_close(sc.logprobs[r, : len(ids)], lp[P - 1 : P - 1 + len(ids)].max(-1).values,
                                   atol=1e-4, rtol=0)


class _Bias(torch.nn.Module):
    def __init__(self, head, token, value):
        super().__init__()
        self.head, self.token, self.value = head, token, value

    def forward(self, h):
        out = self.head(h).clone()
        out[..., self.token] += self.value
        return out


def test_generation_stops_at_end_of_turn_and_flags_truncation(setup, monkeypatch):
    backend, recs, d = setup
    batch = backend.build_inputs(recs[:2], "text")
    head = backend.lm_head()
    stop = backend.stop_token_ids[0]
    monkeypatch.setattr(backend, "lm_head", lambda: _Bias(head, stop, 1e4))
    g = backend.generate(batch, num_samples=3, temperature=1.0, max_new_tokens=7)
    assert g.token_ids == [[stop]] * 6 and g.truncated == [False] * 6 and g.texts == [""] * 6
    assert g.prompt_index == [0, 0, 0, 1, 1, 1]

    class _Never(torch.nn.Module):
        def forward(self, h):
            out = head(h).clone()
            out[..., backend.stop_token_ids] = -1e9
            return out

    monkeypatch.setattr(backend, "lm_head", lambda: _Never())
    g = backend.generate(batch, num_samples=2, temperature=1.0, max_new_tokens=7)
    assert all(len(t) == 7 for t in g.token_ids) and g.truncated == [True] * 4


class _StopWhen(torch.nn.Module):
    """Stops a row when coordinate `k` of its own last hidden state is positive."""

    def __init__(self, head, stop, k):
        super().__init__()
        self.head, self.stop, self.k = head, stop, k

    def forward(self, h):
        out = self.head(h).clone()
        out[..., self.stop] = torch.where(h[..., self.k] > 0, 1e4, -1e4)
        return out


def test_rows_that_stop_leave_the_batch_without_changing_any_answer(setup, monkeypatch):
    backend, recs, d = setup
    head = backend.lm_head()
    seeds = list(range(100, 106))
    # The first hidden coordinate that makes rows stop at different steps (a property of the random
    # model, searched deterministically): that is what exercises the pruning.
    for k in range(32):
        monkeypatch.setattr(backend, "lm_head", lambda k=k: _StopWhen(head, backend.stop_token_ids[0], k))
        both = backend.generate(backend.build_inputs(recs, "text"), 2, 1.0, 1.0, 12, row_seeds=seeds)
        if len({len(t) for t in both.token_ids}) > 2:
            break
    else:
        raise AssertionError("no coordinate makes rows stop at different steps")
    for i in range(3):
        one = backend.generate(backend.build_inputs(recs[i:i + 1], "text"), 2, 1.0, 1.0, 12,
                               row_seeds=seeds[2 * i:2 * i + 2])
        assert one.token_ids == both.token_ids[2 * i:2 * i + 2]
        assert one.truncated == both.truncated[2 * i:2 * i + 2]


@pytest.mark.parametrize("modality", ["text", "speech"])
def test_continuous_batching_gives_each_item_its_own_greedy_answer(setup, monkeypatch, modality):
    """Rows that stop free their slot for the next prompt, whose KV cache joins the running one; every
    answer equals that item's greedy answer generated alone, and joins and cache trims really happened."""
    import tars.models.backend as backend_mod

    backend, recs, d = setup
    head = backend.lm_head()
    items = [recs[i % 3] for i in range(7)]
    joins, trims = [], []
    real_join, real_trim = backend_mod._join_caches, backend_mod._trim_cache
    monkeypatch.setattr(backend_mod, "_join_caches", lambda *a: joins.append(a[2].shape[1]) or real_join(*a))

    def trim(cache, mask):
        out = real_trim(cache, mask)
        trims.append(mask.shape[1] - out.shape[1])
        return out

    monkeypatch.setattr(backend_mod, "_trim_cache", trim)

    def stream():
        out = {}
        for i, ids, trunc in backend.generate_stream(items, lambda rs: backend.build_inputs(rs, modality, base_dir=d),
                                                     batch_size=3, max_new_tokens=10, refill=1):
            assert i not in out
            out[i] = (ids, trunc)
        return out

    for k in range(32):  # a stop rule under which rows end at different steps (see the test above)
        monkeypatch.setattr(backend, "lm_head", lambda k=k: _StopWhen(head, backend.stop_token_ids[0], k))
        joins.clear()
        trims.clear()
        got = stream()
        if joins and any(trims) and len({len(v[0]) for v in got.values()}) > 1:
            break
    else:
        raise AssertionError("no stop rule makes rows end at different steps")
    assert sorted(got) == list(range(7))
    for i, r in enumerate(items):
        one = backend.generate(backend.build_inputs([r], modality, base_dir=d), temperature=0.0, max_new_tokens=10)
        assert got[i] == (one.token_ids[0], one.truncated[0]), i


def test_sampling_is_reproducible_with_a_generator(setup):
    backend, recs, d = setup
    batch = backend.build_inputs(recs, "text")
    a = backend.generate(batch, num_samples=2, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    b = backend.generate(batch, num_samples=2, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    assert a.token_ids == b.token_ids


def test_row_seeded_sampling_does_not_depend_on_the_batch(setup):
    backend, recs, d = setup
    seeds = [11, 12, 21, 22, 31, 32]
    both = backend.generate(backend.build_inputs(recs, "speech", base_dir=d), 2, 1.0, 0.9, 6, row_seeds=seeds)
    for i in range(3):
        one = backend.generate(backend.build_inputs(recs[i:i + 1], "speech", base_dir=d), 2, 1.0, 0.9, 6,
                               row_seeds=seeds[2 * i:2 * i + 2])
        assert one.token_ids == both.token_ids[2 * i:2 * i + 2]
    assert both.token_ids[0] != both.token_ids[1] or both.token_ids[2] != both.token_ids[3]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_paired_generation_gives_each_part_what_it_gets_alone(setup, temperature):
    """Speech and text prompts prefilled once each, their rows (2 and 3 samples per prompt) decoded
    in one batch: every row's tokens and sampler log-probs are those of its part generated alone.
    (Phi-4 with its speech LoRA decodes the parts one by one: its two modalities run different weights.)"""
    backend, recs, d = setup
    speech = backend.build_inputs(recs, "speech", base_dir=d)
    text = backend.build_inputs(recs, "text")
    seeds_s, seeds_t = list(range(100, 106)), list(range(200, 209))
    a, b = backend.generate_paired([(speech, 2, seeds_s), (text, 3, seeds_t)], temperature, 0.9, 7, logprobs=True)
    a1 = backend.generate(speech, 2, temperature, 0.9, 7, row_seeds=seeds_s, logprobs=True)
    b1 = backend.generate(text, 3, temperature, 0.9, 7, row_seeds=seeds_t, logprobs=True)
    for got, want in ((a, a1), (b, b1)):
        assert got.token_ids == want.token_ids and got.truncated == want.truncated
        assert got.prompt_index == want.prompt_index
        for x, y in zip(got.logprobs, want.logprobs):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-4, rtol=0)
    assert a.prompt_index == [0, 0, 1, 1, 2, 2] and b.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    mixes = backend.can_mix(["speech", "text"])
    assert mixes == (getattr(backend, "speech_lora", None) is None)


def test_one_prefill_per_prompt_whatever_the_samples(setup, monkeypatch):
    """The prompt goes through the decoder once, [prompts × length], not once per sample."""
    backend, recs, d = setup
    batch = backend.build_inputs(recs, "text")
    shapes = []
    hook = backend.decoder().register_forward_pre_hook(
        lambda _m, args, kwargs: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        backend.generate(batch, num_samples=4, max_new_tokens=3)
    finally:
        hook.remove()
    assert shapes[0] == (3, batch.embeds.shape[1])  # the prefill: 3 prompts, not 12 rows
    assert all(s[1] == 1 for s in shapes[1:]) and shapes[1][0] == 12


def test_inverse_cdf_sampling_by_hand():
    from tars.models.backend import sample_next

    logits = torch.tensor([0.2, 0.0, 0.5, 0.3]).log()[None].repeat(5, 1)
    u = torch.tensor([0.0, 0.1, 0.2, 0.69, 0.7])
    assert sample_next(logits, 1.0, 1.0, None, u).tolist() == [0, 0, 2, 2, 3]
    # top_p 0.5 keeps only the most likely token (0.5): every draw lands on it.
    assert sample_next(logits, 1.0, 0.5, None, u).tolist() == [2] * 5


def test_sampled_logprob_by_hand():
    """The log-prob of a drawn token under the distribution it was drawn from."""
    import math

    from tars.models.backend import sampled_logprob

    logits = torch.tensor([[0.2, 0.5, 0.3]]).log()
    tok = lambda i: torch.tensor([i])  # noqa: E731
    assert float(sampled_logprob(logits, 1.0, 1.0, tok(1))) == pytest.approx(math.log(0.5))
    # top_p 0.6 keeps 0.5 and 0.3, renormalised: 0.3 / 0.8.
    assert float(sampled_logprob(logits, 1.0, 0.6, tok(2))) == pytest.approx(math.log(0.375))
    assert float(sampled_logprob(logits, 1.0, 0.6, tok(0))) == float("-inf")
    # temperature 2: p ∝ sqrt(p).
    r = [math.sqrt(x) for x in (0.2, 0.5, 0.3)]
    assert float(sampled_logprob(logits, 2.0, 1.0, tok(1))) == pytest.approx(math.log(r[1] / sum(r)), abs=1e-6)
    assert float(sampled_logprob(logits, 0.0, 1.0, tok(1))) == 0.0  # greedy: a point mass


def test_sampled_tokens_logprobs_equal_the_scorers(setup):
    """At temperature 1 and top-p 1 the sampler draws from exactly the distribution `score` assigns
    (KV-cache decoding vs one forward, fp32): its recorded log-probs equal the scored ones."""
    backend, recs, d = setup
    batch = backend.build_inputs(recs, "speech", base_dir=d)
    gen = backend.generate(batch, 2, 1.0, 1.0, 6, row_seeds=list(range(6)), logprobs=True)
    assert [len(lp) for lp in gen.logprobs] == [len(t) for t in gen.token_ids]
    sc = backend.score(batch, gen.token_ids, gen.prompt_index)
    for r, lp in enumerate(gen.logprobs):
        torch.testing.assert_close(torch.tensor(lp), sc.logprobs[r, : len(lp)], atol=1e-4, rtol=0)


def test_encoder_runs_once_per_clip(setup):
    backend, recs, d = setup
    backend.cache.hits = backend.cache.misses = 0
    backend.build_inputs(recs, "speech", base_dir=d)
    backend.build_inputs(recs + recs, "speech", base_dir=d)
    assert backend.cache.misses <= 3 and backend.cache.hits >= 6


def test_bad_inputs(setup, tmp_path):
    backend, recs, d = setup
    sf.write(str(tmp_path / "long.wav"), np.zeros(int(1.5 * 16000), np.float32) + 0.1, 16000)
    long = Record(id="L", question="q", options=["a", "b"], answer="A", audio="long.wav")
    with pytest.raises(UserError, match=r"long.wav: audio is 1.5 s, longer than the encoder window of 1 s"):
        backend.build_inputs([long], "speech", base_dir=tmp_path)
    noaudio = Record(id="N", question="q", options=["a", "b"], answer="A")
    with pytest.raises(UserError, match="record N: no `audio`"):
        backend.build_inputs([noaudio], "speech")
    huge = Record(id="H", question="word " * 600, options=["a", "b"], answer="A")
    with pytest.raises(UserError, match="record H: the text prompt is .* tokens, over the model's context of 512"):
        backend.build_inputs([huge], "text")
    with pytest.raises(UserError, match="exceeds the model's context"):
        backend.generate(backend.build_inputs(recs[:1], "text"), max_new_tokens=1000)


def test_a_hub_id_loads_through_the_hub_cache_or_says_why_not(setup, monkeypatch, tmp_path):
    import huggingface_hub

    _, _, d = setup
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: asked.append(repo) or str(d / "model"))
    monkeypatch.chdir(tmp_path)
    assert load_backend("some-org/some-model").decoder() is not None and asked == ["some-org/some-model"]

    def offline(repo):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="some-org/some-model: not a local folder, and the Hugging Face hub"):
        load_backend("some-org/some-model")


def test_loading_errors(tmp_path, setup):
    _, _, d = setup
    with pytest.raises(UserError, match="model folder not found"):
        load_backend(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="unknown architecture 'bert'; tars supports"):
        load_backend(tmp_path / "m")
    import shutil
    shutil.copytree(d / "model", tmp_path / "corrupt")
    w = next((tmp_path / "corrupt").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(UserError, match="could not load the weights|corrupt weight file"):
        load_backend(tmp_path / "corrupt")


def test_the_encoder_cache_is_not_shared_across_dtypes(setup, tmp_path, monkeypatch):
    """A float16 run must not fill the cache a float32 run reads (Whisper-born weights are float16
    exact, so the weights alone sample the same in both): else a run's speech prompts depend on which
    run came first (issue 14's irreproducible speech rollouts)."""
    backend, recs, d = setup
    monkeypatch.setenv("TARS_HOME", str(tmp_path / "home"))
    folder = d / "model"
    half = load_backend(folder, dtype=torch.float16)
    full = load_backend(folder)
    assert half.cache.namespace != full.cache.namespace
    half.encode_audio([d / "a0.wav"])  # fills the disk cache first, in float16
    cold = load_backend(folder).encode_audio([d / "a0.wav"])[0]
    fresh = full._encode([d / "a0.wav"])[0]
    assert torch.equal(cold, fresh)


def test_encoder_fingerprint_tells_float16_from_float32_even_for_float16_born_weights():
    import copy

    from tars.models.qwen2_audio import encoder_fingerprint

    enc = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(p.half().float())  # exactly representable in float16, like Whisper's CT2 weights
    assert encoder_fingerprint(enc) == encoder_fingerprint(copy.deepcopy(enc))
    assert encoder_fingerprint(enc) != encoder_fingerprint(copy.deepcopy(enc).half())


def _decode_calls(backend):
    """A hook on the decoder recording each call's (rows, mask width, its cache layers' class names)."""
    from tars.models.hf_compat import cache_name

    calls = []

    def pre(_m, args, kwargs):
        cache = kwargs.get(cache_name())
        layers = () if cache is None else {type(layer).__name__ for layer in cache.layers}
        calls.append((kwargs["inputs_embeds"].shape[0], kwargs["attention_mask"].shape[1], layers))

    return calls, backend.decoder().register_forward_pre_hook(pre, with_kwargs=True)


def _assert_same_generations(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids and g.truncated == w.truncated and g.prompt_index == w.prompt_index
        for x, y in zip(g.logprobs, w.logprobs, strict=True):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_cache_decode_equals_the_dynamic_one(setup, monkeypatch, temperature):
    """The static-cache path (preallocated KV buffers, every row kept to the end) gives the same tokens,
    stops and sampler log-probs as the default path, for paired speech + text parts — also when rows
    stop at different steps (the dynamic path drops them from the batch, the static one keeps decoding
    them and cuts afterwards); and it really decodes through static layers at one shape."""
    from tars.models.backend import DecodeOptions

    backend, recs, d = setup
    speech = backend.build_inputs(recs, "speech", base_dir=d)
    text = backend.build_inputs(recs, "text")
    parts = [(speech, 2, list(range(10, 16))), (text, 2, list(range(20, 26)))]
    n_new = 10
    want = backend.generate_paired(parts, temperature, 0.9, n_new, logprobs=True)
    calls, hook = _decode_calls(backend)
    try:
        got = backend.generate_paired(parts, temperature, 0.9, n_new, logprobs=True, decode=DecodeOptions("static"))
    finally:
        hook.remove()
    _assert_same_generations(got, want)
    steps = [c for c in calls if c[2]]  # the decode steps (the prefills have no cache yet)
    assert steps and all(layers == {"StaticLayer"} for _, _, layers in steps)
    Ps, Pt = speech.embeds.shape[1], text.embeds.shape[1]
    if backend.can_mix(["speech", "text"]):  # one batch of 12 rows, one shape for every step
        assert {(rows, width) for rows, width, _ in steps} == {(12, max(Ps, Pt) + n_new)}
    else:  # part by part (Phi-4's speech LoRA): one shape per part
        assert {(rows, width) for rows, width, _ in steps} == {(6, Ps + n_new), (6, Pt + n_new)}

    # Rows that stop at different steps (a stop rule on the random model, searched as above).
    head = backend.lm_head()
    for k in range(32):
        monkeypatch.setattr(backend, "lm_head", lambda k=k: _StopWhen(head, backend.stop_token_ids[0], k))
        want = backend.generate_paired(parts, temperature, 0.9, n_new, logprobs=True)
        lengths = {len(t) for g in want for t in g.token_ids}
        if len(lengths) > 2 and any(not t for g in want for t in g.truncated):
            break
    else:
        raise AssertionError("no stop rule makes rows stop at different steps")
    got = backend.generate_paired(parts, temperature, 0.9, n_new, logprobs=True, decode=DecodeOptions("static"))
    _assert_same_generations(got, want)


def test_static_cache_holds_the_prefill_and_frees_its_source(setup):
    """`_static_cache`: the prefill's keys/values in the first columns, zeros after, the length set;
    the dynamic cache it copied is emptied (never both held whole during a decode)."""
    from tars.models.backend import _static_cache
    from tars.models.hf_compat import kv_cache

    backend, recs, d = setup
    inp = backend.build_inputs(recs, "text")
    P = inp.embeds.shape[1]
    with torch.no_grad():
        out = backend.decoder()(inputs_embeds=inp.embeds, attention_mask=inp.attention_mask, use_cache=True)
    cache = kv_cache(out)
    want = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    static = _static_cache(cache, P + 5)
    for layer, src, (k, v) in zip(static.layers, cache.layers, want, strict=True):
        assert layer.keys.shape[-2] == P + 5 and int(layer.get_seq_length()) == P
        assert torch.equal(layer.keys[:, :, :P], k) and torch.equal(layer.values[:, :, :P], v)
        assert not layer.keys[:, :, P:].any() and not layer.values[:, :, P:].any()
        assert src.keys.numel() == 0 and src.values.numel() == 0


def test_compiled_static_decode_equals_the_dynamic_one(setup):
    """`torch.compile` over the static decode step: greedy tokens equal, sampled (row-seeded) tokens and
    their log-probs within tolerance; the compiled graph really ran, compiled once for every step."""
    from torch._dynamo.utils import counters

    from tars.models.backend import DecodeOptions

    backend, recs, d = setup
    if backend.__class__.__name__ != "Qwen2AudioBackend":
        pytest.skip("compiled once, on the Qwen2-Audio backend: a compile costs ~a minute on 2 cores")
    torch._dynamo.reset()
    counters.clear()
    text = backend.build_inputs(recs, "text")
    compiled = DecodeOptions("static", compile=True)
    for temperature in (0.0, 1.0):
        want = backend.generate(text, 2, temperature, 1.0, 6, row_seeds=list(range(6)), logprobs=True)
        got = backend.generate(text, 2, temperature, 1.0, 6, row_seeds=list(range(6)), logprobs=True,
                               decode=compiled)
        _assert_same_generations([got], [want])
    # dynamo traced the whole decode step once (not a silent eager run, no graph break), and all 10
    # steps of both calls ran that one graph: no recompile per step or per call
    assert counters["frames"]["ok"] == 1 and counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert "_orig_mod" not in " ".join(backend.state_dict())


def test_decode_options_are_checked():
    from tars.models.backend import DecodeOptions

    with pytest.raises(ValueError, match="cache"):
        DecodeOptions("paged")
    with pytest.raises(ValueError, match="compile needs cache=static"):
        DecodeOptions("dynamic", compile=True)
