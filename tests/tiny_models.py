"""Tiny random-initialised Speech LLMs of the real transformers classes, saved to disk, for fast tests.

The tokenizer is a byte-level BPE trained in memory (milliseconds) with ChatML special tokens and a
chat template, so prompts go through the same code as real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]


def make_tokenizer(vocab_size: int = 400, extra_specials: list[str] | None = None,
                   chat_template: str | None = None, eos_token: str = "<|im_end|>"):
    """`extra_specials`: more special tokens (a model's own audio/vision/role markers), added after the
    ChatML ones so the default ids stay as they were; `chat_template` replaces ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tars.data.prompts import SYSTEM_PROMPT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIALS + [t for t in (extra_specials or []) if t not in SPECIALS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [SYSTEM_PROMPT, "<think>We add the numbers.</think><answer>The answer is B.</answer>",
              "What is 2 plus 2? A. 3 B. 4 C. 5 D. 6", "Audio 1: user assistant system"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token="<|endoftext|>",
                                   unk_token=None)
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.chat_template = chat_template or CHATML
    return fast


def tiny_qwen2_audio(path: Path, seed: int = 0, text_model: str = "qwen2", window_s: float = 1.0) -> Path:
    """`window_s`: the encoder's window (1 s keeps the tests' clips short; 15 s fits spoken questions)."""
    from transformers import LlamaConfig, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2Config
    from transformers.models.qwen2_audio.configuration_qwen2_audio import Qwen2AudioEncoderConfig

    tok = make_tokenizer()
    torch.manual_seed(seed)
    audio = Qwen2AudioEncoderConfig(num_mel_bins=80, encoder_layers=2, encoder_attention_heads=2,
                                    encoder_ffn_dim=64, d_model=32, max_source_positions=int(window_s * 50))
    text_cls = Qwen2Config if text_model == "qwen2" else LlamaConfig
    text = text_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg = Qwen2AudioConfig(audio_config=audio, text_config=text,
                           audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>"))
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


#: Qwen2.5-Omni's own markers on top of ChatML: its vision wrappers and placeholders (the thinker's
#: config names them by id, so they must exist in the vocabulary).
OMNI_SPECIALS = ["<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>"]


def tiny_qwen2_5_omni(path: Path, seed: int = 0, full: bool = False) -> Path:
    """A tiny `Qwen2_5OmniThinkerForConditionalGeneration` (`full=True`: the same thinker saved inside a
    `Qwen2_5OmniForConditionalGeneration` folder, model_type "qwen2_5_omni", weights under `thinker.`,
    as the released checkpoints are; the talker is left out, it is never loaded).

    The audio window is 1 s (`chunk_length=1` in preprocessor_config.json, as Omni's processor reads
    it: 300 s for real checkpoints) and the encoder attends in 0.4 s blocks (`n_window=20`; 2 s for
    real checkpoints), so the tests' 0.55 s and 0.8 s clips span two blocks.
    """
    from transformers import (Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration,
                              Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration,
                              WhisperFeatureExtractor)
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (
        Qwen2_5OmniAudioEncoderConfig, Qwen2_5OmniTextConfig, Qwen2_5OmniVisionEncoderConfig)

    tok = make_tokenizer(extra_specials=OMNI_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS + OMNI_SPECIALS}
    torch.manual_seed(seed)
    audio = Qwen2_5OmniAudioEncoderConfig(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2,
                                          encoder_ffn_dim=64, d_model=32, max_source_positions=50, n_window=20,
                                          output_dim=64)
    vision = Qwen2_5OmniVisionEncoderConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                            out_hidden_size=64, fullatt_block_indexes=[0])
    text = Qwen2_5OmniTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                  "mrope_section": [2, 3, 3]})
    thinker = Qwen2_5OmniThinkerConfig(
        audio_config=audio, vision_config=vision, text_config=text,
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], user_token_id=tok("user")["input_ids"][0],
    )
    if full:
        cfg = Qwen2_5OmniConfig(thinker_config=thinker.to_dict(), enable_audio_output=False)
        model = Qwen2_5OmniForConditionalGeneration(cfg).eval()
    else:
        model = Qwen2_5OmniThinkerForConditionalGeneration(thinker).eval()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    WhisperFeatureExtractor(feature_size=128, chunk_length=1).save_pretrained(str(path))
    return path


#: Phi-4-multimodal's markers: its role tags and end of turn, and the audio / image placeholders the
#: released tokenizer calls `<|endoftext11|>` (id 200011) and `<|endoftext10|>` (id 200010).
PHI4_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext10|>", "<|endoftext11|>"]
#: The released tokenizer's chat template (Phi-4-mini's: no newlines, `<|end|>` closes every turn).
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
#: The LLM projections the released speech LoRA adapts (every decoder block's attention and MLP).
PHI4_LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"


def tiny_phi4_mm(path: Path, seed: int = 0, speech_lora: bool = False) -> Path:
    """A tiny `Phi4MultimodalForCausalLM`, its `Phi4MultimodalFeatureExtractor` config, and a 1 s audio
    limit (`tars_audio.json`; Phi-4's encoder has no fixed window, tars's default limit is 40 s).

    `speech_lora=True` also writes a PEFT LoRA adapter in `speech-lora/`, laid out like the released
    checkpoint's (r 4 here, 320 there) and with random, non-zero B matrices so that it changes the outputs.
    """
    from transformers import Phi4MultimodalConfig, Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM
    from transformers.models.phi4_multimodal.configuration_phi4_multimodal import (
        Phi4MultimodalAudioConfig, Phi4MultimodalVisionConfig)

    tok = make_tokenizer(extra_specials=PHI4_SPECIALS, chat_template=PHI4_TEMPLATE, eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    audio = Phi4MultimodalAudioConfig(hidden_size=32, intermediate_size=64, num_blocks=2, num_attention_heads=2,
                                      ext_pw_out_channel=32, depthwise_separable_out_channel=32,
                                      nemo_conv_channels=16, bias_max_distance=50,
                                      audio_token_id=tok.convert_tokens_to_ids("<|endoftext11|>"))
    vision = Phi4MultimodalVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=56, crop_size=56, patch_size=14,
                                        image_token_id=tok.convert_tokens_to_ids("<|endoftext10|>"))
    end, eot = tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Phi4MultimodalConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               original_max_position_embeddings=512, bos_token_id=eot, pad_token_id=eot,
                               eos_token_id=[eot, end], audio_config=audio, vision_config=vision)
    model = Phi4MultimodalForCausalLM(cfg).eval()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    Phi4MultimodalFeatureExtractor().save_pretrained(str(path))
    (Path(path) / "tars_audio.json").write_text('{"max_audio_s": 1.0}\n')
    if speech_lora:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=PHI4_LORA_TARGETS))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2)
        peft_model.save_pretrained(str(Path(path) / "speech-lora"))
    return path


def tone_records(folder: Path, questions: list[str], seconds=(0.35, 0.8, 0.55)) -> list:
    """One short noisy tone per question (16 kHz wav files in `folder`, of different lengths so that a
    batch is padded) and its Record: options A-C or A-D alternating, answer B."""
    import numpy as np
    import soundfile as sf

    from tars.data.schema import Record

    rng = np.random.default_rng(0)
    for i, s in enumerate(seconds):
        t = np.arange(int(s * 16000)) / 16000
        x = 0.2 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(str(folder / f"a{i}.wav"), x.astype(np.float32), 16000)
    return [Record(id=f"q{i}", question=q, options=["3", "4", "5", "six"][: 3 + i % 2], answer="B",
                   audio=f"a{i}.wav") for i, q in enumerate(questions)]


def tiny_adapter(base: Path, folder: Path, r: int = 4, alpha: float = 8.0, seed: int = 0):
    """Save an adapter of the model at `base` that changes it (B ~ N(0, 0.05): a fresh LoRA's B = 0
    would be the identity), as a finished RL run leaves one; returns the backend carrying it, unmerged."""
    from tars.models.loading import load_backend
    from tars.models.lora import LoraSettings, add_lora, save_adapter

    be = load_backend(base)
    lora = LoraSettings(r=r, alpha=alpha, dropout=0.0)
    params = add_lora(be, lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for k, p in params.items():
            if k.endswith("lora_B.weight"):
                p.normal_(0, 0.05)
    save_adapter(be, folder, str(base), lora, steps=3, method="tars")
    return be.eval()
