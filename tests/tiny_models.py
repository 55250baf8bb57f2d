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


def make_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tars.data.prompts import SYSTEM_PROMPT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [SYSTEM_PROMPT, "<think>We add the numbers.</think><answer>The answer is B.</answer>",
              "What is 2 plus 2? A. 3 B. 4 C. 5 D. 6", "Audio 1: user assistant system"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None)
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    fast.chat_template = CHATML
    return fast


def tiny_qwen2_audio(path: Path, seed: int = 0, text_model: str = "qwen2") -> Path:
    from transformers import LlamaConfig, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2Config
    from transformers.models.qwen2_audio.configuration_qwen2_audio import Qwen2AudioEncoderConfig

    tok = make_tokenizer()
    torch.manual_seed(seed)
    audio = Qwen2AudioEncoderConfig(num_mel_bins=80, encoder_layers=2, encoder_attention_heads=2,
                                    encoder_ffn_dim=64, d_model=32, max_source_positions=50)
    text_cls = Qwen2Config if text_model == "qwen2" else LlamaConfig
    text = text_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg = Qwen2AudioConfig(audio_config=audio, text_config=text,
                           audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>"))
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
