"""Model-specific fidelity of the Qwen2.5-Omni and Phi-4-multimodal backends, on tiny random models.

The generic tests (test_backends.py) check that a backend is self-consistent. These check that it is the
model: our audio features, audio token counts, positions and spliced prompt embeddings give the logits
of the model's own forward on `input_ids` + audio features, prepared the way its processor does.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from tars.data.audio import load_audio
from tars.data.schema import Record
from tars.models.backend import AUDIO_SLOT
from tars.models.loading import load_backend
from tars.models.qwen2_5_omni import thinker_parts
from tiny_models import tiny_phi4_mm, tiny_qwen2_5_omni

SECONDS = [0.35, 0.8, 0.55]


def _clips(d):
    rng = np.random.default_rng(1)
    paths = []
    for i, s in enumerate(SECONDS):
        t = np.arange(int(s * 16000)) / 16000
        x = 0.2 * np.sin(2 * np.pi * (220 + 170 * i) * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(str(d / f"c{i}.wav"), x.astype(np.float32), 16000)
        paths.append(d / f"c{i}.wav")
    recs = [Record(id=f"r{i}", question="What is 2 plus 2?", options=["3", "4", "5"], answer="B", audio=p.name)
            for i, p in enumerate(paths)]
    return paths, recs


def _processor_ids(backend, rec, audio_token: str, n: int) -> list[int]:
    """The prompt as the model's processor writes it: the placeholder repeated once per audio
    embedding inside the wrapper tokens, tokenized as one string."""
    head, tail = backend.render(rec, "speech").split(AUDIO_SLOT)
    before, after = backend.audio_wrap()
    return backend.tokenizer(head + before + audio_token * n + after + tail, add_special_tokens=False)["input_ids"]


def _our_logits(backend, batch):
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        h = backend.decoder()(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask,
                              position_ids=backend.positions(pos)).last_hidden_state
        return backend.lm_head()(h)


def _left_pad(rows: list[list[int]], pad: int):
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r)
        mask[i, P - len(r):] = 1
    return ids, mask


# ---- Qwen2.5-Omni -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    d = tmp_path_factory.mktemp("omni")
    tiny_qwen2_5_omni(d / "model")
    paths, recs = _clips(d)
    backend = load_backend(d / "model")
    return backend, paths, recs, d


def _omni_reference_inputs(backend, paths, recs, d):
    """input_ids / attention_mask / input_features / feature_attention_mask as `Qwen2_5OmniProcessor`
    builds them (its audio kwargs: padding to the window, the attention mask returned)."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(str(d / "model"))
    feats = fe([load_audio(p) for p in paths], sampling_rate=16000, padding="max_length",
               return_attention_mask=True, return_tensors="pt")
    fmask = feats["attention_mask"]
    counts = thinker_parts(backend.model)[0]._get_feat_extract_output_lengths(fmask.sum(-1))[1].tolist()
    token = backend.tokenizer.convert_ids_to_tokens(backend.model.config.audio_token_id)
    rows = [_processor_ids(backend, r, token, n) for r, n in zip(recs, counts)]
    ids, mask = _left_pad(rows, backend.tokenizer.pad_token_id)
    return ids, mask, feats["input_features"], fmask, counts


def test_omni_audio_token_counts_are_the_processors(omni):
    backend, paths, recs, d = omni
    *_, counts = _omni_reference_inputs(backend, paths, recs, d)
    assert counts == [backend.n_audio_tokens(int(s * 16000)) for s in SECONDS] == [9, 20, 14]
    assert [e.shape[0] for e in backend.audio_embeds(paths)] == counts


def test_omni_positions_are_the_models_rope_index(omni):
    backend, paths, recs, d = omni
    ids, mask, _, fmask, _ = _omni_reference_inputs(backend, paths, recs, d)
    batch = backend.build_inputs(recs, "speech", base_dir=d)
    assert batch.lengths == mask.sum(-1).tolist()
    # The thinker's inner model has it from transformers 5.21 (the thinker itself before).
    rope_index = getattr(backend.model.model, "get_rope_index", None) or backend.model.get_rope_index
    want, _ = rope_index(ids, None, None, mask, False, fmask.sum(-1))
    got = backend.positions((mask.cumsum(-1) - 1).clamp(min=0))
    assert got.shape == want.shape == (3, *ids.shape)
    valid = mask.bool()
    assert torch.equal(got[:, valid], want[:, valid])
    assert torch.equal(want[0], want[1]) and torch.equal(want[1], want[2])


def test_omni_spliced_prompt_is_the_models_input_and_gives_its_logits(omni):
    """A left-padded batch of three clips: our prompt embeddings equal the `inputs_embeds` the thinker
    builds from input_ids + input_features (audio frames scattered into the placeholders), and our
    decoder call its logits. Measured: both differ by < 2e-7 (float32)."""
    backend, paths, recs, d = omni
    ids, mask, feats, fmask, _ = _omni_reference_inputs(backend, paths, recs, d)
    seen = {}
    hook = backend.decoder().register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            want = backend.model(input_ids=ids, attention_mask=mask, input_features=feats,
                                 feature_attention_mask=fmask).logits
    finally:
        hook.remove()
    batch = backend.build_inputs(recs, "speech", base_dir=d)
    valid = mask.bool()
    torch.testing.assert_close(batch.embeds[valid], seen["inputs_embeds"][valid], atol=1e-6, rtol=0)
    torch.testing.assert_close(_our_logits(backend, batch)[valid], want[valid], atol=1e-5, rtol=0)


def test_omni_loads_the_thinker_from_a_full_checkpoint_and_saves_it(omni, tmp_path):
    backend, paths, recs, d = omni
    tiny_qwen2_5_omni(tmp_path / "full", full=True)
    full = load_backend(tmp_path / "full")
    assert type(full.model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    comp = [[40, 77, backend.stop_token_ids[0]]]
    want = backend.score(backend.build_inputs(recs[1:2], "speech", base_dir=d), comp, [0]).logprobs
    got = full.score(full.build_inputs(recs[1:2], "speech", base_dir=d), comp, [0]).logprobs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    full.save_pretrained(tmp_path / "saved")
    again = load_backend(tmp_path / "saved")
    assert again.max_audio_s == 1.0
    got = again.score(again.build_inputs(recs[1:2], "speech", base_dir=d), comp, [0]).logprobs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---- Phi-4-multimodal ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    d = tmp_path_factory.mktemp("phi")
    tiny_phi4_mm(d / "model", speech_lora=True)
    paths, recs = _clips(d)
    return paths, recs, d


def _phi_reference(backend, path, rec):
    """One prompt as `Phi4MultimodalProcessor` builds it for one clip: features of the clip alone."""
    fe = backend.feature_extractor(load_audio(path), sampling_rate=16000, return_tensors="pt")
    n = int(fe["audio_embed_sizes"][0])
    token = backend.tokenizer.convert_ids_to_tokens(backend.model.config.audio_config.audio_token_id)
    ids = torch.tensor([_processor_ids(backend, rec, token, n)])
    return ids, fe, n


def _phi_model_logits(model, ids, fe):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids),
                     audio_input_features=fe["audio_input_features"],
                     audio_embed_sizes=fe["audio_embed_sizes"]).logits[0]


def test_phi4_audio_token_counts_prompt_and_logits_are_the_models(phi):
    """Without the speech LoRA (the native class as it loads): each prompt of a left-padded batch equals
    the `inputs_embeds` the model builds from that prompt's input_ids + audio features alone, and gives
    its logits. Measured: < 2e-7 (float32)."""
    paths, recs, d = phi
    from transformers import Phi4MultimodalForCausalLM

    backend = load_backend(d / "model")
    backend.speech_lora = None
    batch = backend.build_inputs(recs, "speech", base_dir=d)
    got = _our_logits(backend, batch)
    ref = Phi4MultimodalForCausalLM.from_pretrained(str(d / "model")).eval()
    seen = []
    hook = ref.model.embed_tokens_extend.register_forward_hook(lambda _m, _a, out: seen.append(out))
    counts = []
    try:
        for i, (p, r) in enumerate(zip(paths, recs)):
            ids, fe, n = _phi_reference(backend, p, r)
            counts.append(n)
            want = _phi_model_logits(ref, ids, fe)
            assert batch.lengths[i] == ids.shape[1]
            torch.testing.assert_close(batch.embeds[i, -ids.shape[1]:], seen[-1][0], atol=1e-6, rtol=0)
            torch.testing.assert_close(got[i, -ids.shape[1]:], want, atol=1e-5, rtol=0)
    finally:
        hook.remove()
    frames = [(int(s * 16000) - 400) // 160 + 1 for s in SECONDS]
    assert counts == [-(-f // 8) for f in frames] == [5, 10, 7]
    assert [e.shape[0] for e in backend.audio_embeds(paths)] == counts


def test_phi4_speech_lora_on_for_speech_off_for_text_as_peft_applies_it(phi, tmp_path):
    """Our hook-applied LoRA against PEFT's own injection of the `speech-lora` folder (transformers'
    documented `load_adapter` + `set_adapter` route needs peft >= 0.22; the pin is 0.21.2): speech
    prompts score with it, text prompts with the base LLM, greedy decoding follows the adapted model,
    and it survives save / load."""
    paths, recs, d = phi
    from peft import PeftModel
    from transformers import Phi4MultimodalForCausalLM

    backend = load_backend(d / "model")
    assert backend.speech_lora is not None and len(backend.speech_lora.names) == 4 * 4
    base_model = Phi4MultimodalForCausalLM.from_pretrained(str(d / "model")).eval()
    ref = PeftModel.from_pretrained(base_model, str(d / "model" / "speech-lora")).eval()

    comp = [40, 51, 77, backend.stop_token_ids[0]]
    ids, fe, _ = _phi_reference(backend, paths[1], recs[1])
    want = torch.log_softmax(_phi_model_logits(ref, torch.cat([ids, torch.tensor([comp])], 1), fe), -1)
    want = want[ids.shape[1] - 1: -1].gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)
    speech = backend.build_inputs(recs[1:2], "speech", base_dir=d)
    got = backend.score(speech, [comp], [0]).logprobs[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert backend.speech_lora.active is False  # switched on for the call only

    with ref.disable_adapter():
        base = torch.log_softmax(_phi_model_logits(ref, torch.cat([ids, torch.tensor([comp])], 1), fe), -1)
        text_ids = torch.tensor([backend.tokenizer(backend.render(recs[1], "text"),
                                                   add_special_tokens=False)["input_ids"] + comp])
        with torch.no_grad():
            lp = torch.log_softmax(ref(input_ids=text_ids).logits[0], -1)
    base = base[ids.shape[1] - 1: -1].gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)
    assert (base - want).abs().max() > 1e-2, "the test adapter must change the outputs"
    text = backend.build_inputs(recs[1:2], "text")
    n = text_ids.shape[1] - len(comp)
    want_text = lp[n - 1: -1].gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)
    torch.testing.assert_close(backend.score(text, [comp], [0]).logprobs[0], want_text, atol=1e-4, rtol=0)

    gen = backend.generate(speech, temperature=0.0, max_new_tokens=4).token_ids[0]
    full = torch.cat([ids, torch.tensor([gen])], 1)
    greedy = _phi_model_logits(ref, full, fe)[ids.shape[1] - 1: -1].argmax(-1).tolist()
    assert greedy == gen

    backend.save_pretrained(tmp_path / "saved")
    again = load_backend(tmp_path / "saved")
    again_speech = again.build_inputs(recs[1:2], "speech", base_dir=d)
    torch.testing.assert_close(again.score(again_speech, [comp], [0]).logprobs[0], want, atol=1e-4, rtol=0)


def test_phi4_speech_lora_on_text_prompts_is_a_folder_setting(phi, tmp_path):
    """`tars_audio.json` `{"speech_lora": "always"}`: text prompts score with the speech LoRA too (the
    native class's `set_adapter` route, docs/fidelity.md row 8); it survives save / load; a bad value
    is one line naming the file."""
    import json
    import shutil

    from tars.errors import UserError

    paths, recs, d = phi
    folder = tmp_path / "always"
    shutil.copytree(d / "model", folder)
    cfg = json.loads((folder / "tars_audio.json").read_text())
    (folder / "tars_audio.json").write_text(json.dumps({**cfg, "speech_lora": "always"}))
    only, always = load_backend(d / "model"), load_backend(folder)
    assert only.speech_lora_on == "speech_only" and always.speech_lora_on == "always"
    comp = [40, 51, 77, only.stop_token_ids[0]]
    text = only.build_inputs(recs[1:2], "text")
    speech = only.build_inputs(recs[1:2], "speech", base_dir=d)
    got_always = always.score(text, [comp], [0]).logprobs[0]
    got_only = only.score(text, [comp], [0]).logprobs[0]
    assert (got_always - got_only).abs().max() > 1e-2  # the adapter is on for text now
    only.speech_lora.active = True  # forced on by hand: what `always` must equal
    forced = super(type(only), only).score(text, [comp], [0]).logprobs[0]  # Backend.score, no per-modality switch
    torch.testing.assert_close(got_always, forced, atol=1e-6, rtol=0)
    only.speech_lora.active = False
    torch.testing.assert_close(always.score(speech, [comp], [0]).logprobs[0],
                               only.score(speech, [comp], [0]).logprobs[0], atol=1e-6, rtol=0)
    always.save_pretrained(tmp_path / "saved")
    assert load_backend(tmp_path / "saved").speech_lora_on == "always"
    (folder / "tars_audio.json").write_text('{"speech_lora": "sometimes"}')
    with pytest.raises(UserError, match=r"tars_audio\.json.*speech_lora must be one of"):
        load_backend(folder)
