"""Measuring what a training step's forwards and backwards hold, per token, at a model's real widths.

The model is the real transformers class at the real hidden sizes, vocabulary and LoRA, with 2 and 3
decoder blocks (`DEPTHS` says why not 1 and 2) and tiny audio / vision towers, built on the meta device
and filled in place (seconds, not the minute a random init of a 7B-wide vocabulary takes). Through `Backend.score(..., grad=True)` and
a backward, as the trainer runs them, two numbers per run:

- **saved**: the bytes autograd keeps for the backward — distinct tensor storages seen by
  `torch.autograd.graph.saved_tensors_hooks`, weights excluded (they are counted once, as weights);
- **peak**: the largest sum of live tensor bytes allocated during the forward + backward, from the
  profiler's memory events (what `torch.cuda.max_memory_allocated` reports on a GPU, over the same window).

Per layer per token is the slope from 2 to 3 blocks; the rest is per token (embeddings, final norm,
rotary tables, the gradient of the decoder's output), per completion token (the states the LM head's
chunks keep) and constant. Each of `full` (activations kept) and `checkpoint` (`Backend.checkpoint_blocks`)
is fitted by least squares; the runs that fit the peak have one-token completions, so the peak they see
is the decoder's (the LM head's chunk is measured apart, on `token_logprobs` alone). Also measured: the
no-grad forward's transient per token (generation's prefill), the LM head's transient per chunk, the
sampler's bytes per logit, and the KV cache's bytes per token (checked against the formula).

`tars plan --calibrate` runs this for the three published architectures and writes calibration.json.
"""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tars.plan.architecture import Architecture, build_meta, decoder_parts, json_object

#: Decoder blocks of the two measured depths. Not 1 and 2: the first block's input (the embeddings)
#: needs no gradient, so a 1-block model keeps less than one block of a deeper stack does (measured:
#: with checkpointing, 1 → 2 blocks adds 6× what 2 → 3 adds per token); the slope from 2 to 3 is the
#: per-block cost of every block but the first, whose difference the per-token term absorbs.
DEPTHS = (2, 3)
#: (rows, prompt tokens) of the runs the per-token fits use; completions of 1 token.
SHAPES = ((2, 64), (2, 160))
#: (rows, prompt, completion tokens) of the run that gives the completion tokens' share.
COMP_SHAPE = (2, 32, 48)
#: Left padding of the measured prompts, so the attention mask is a real one (as in every batch of
#: prompts of different lengths), not the all-ones mask transformers may drop.
PAD = 3


class _Tokenizer:
    """Enough of a tokenizer for a backend that never tokenizes text (calibration feeds embeddings)."""

    unk_token_id = None
    eos_token_id = 0

    def convert_tokens_to_ids(self, token):
        return None

    def convert_ids_to_tokens(self, i):
        return f"<{i}>"


# ---- measuring ----------------------------------------------------------------------------------------------
class SavedBytes:
    """Bytes of the distinct storages autograd saves for the backward inside the block, except the
    storages in `exclude` (the weights)."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = exclude
        self.seen: dict[int, int] = {}

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.exclude:
            self.seen[s.data_ptr()] = s.nbytes()
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


@contextmanager
def peak_live_bytes(device: torch.device | str = "cpu"):
    """Yields a dict whose `peak` is, after the block, the largest sum of tensor bytes allocated inside it
    and alive at once (frees of older tensors count down from 0): on a CPU from the profiler's memory
    events, on a GPU `torch.cuda.max_memory_allocated` over the block."""
    from torch.profiler import ProfilerActivity, profile

    out = {"peak": 0}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - base
        return
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, b in events:
        live += b
        peak = max(peak, live)
    out["peak"] = peak


def weight_storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


def _inputs(be, rows: int, prompt: int, completion: int, modality: str, seed: int = 0):
    from tars.models.backend import PromptBatch

    g = torch.Generator().manual_seed(seed)
    H = be.lm_head().in_features
    emb = (torch.randn(1, prompt, H, generator=g) * 0.02).to(device=be.device, dtype=be.dtype)
    mask = torch.ones(1, prompt, dtype=torch.long, device=be.device)
    mask[0, :PAD] = 0
    inp = PromptBatch(emb, mask, [prompt - PAD], modality, ["q"])
    vocab = be.lm_head().out_features
    comps = [torch.randint(10, vocab, (completion,), generator=g).tolist() for _ in range(rows)]
    return inp, comps


def measure_step(be, params, rows: int, prompt: int, completion: int, modality: str = "text") -> tuple[int, int]:
    """(saved, peak) bytes of one grad-enabled `score` (every layer pooled, entropies, as the trainer's
    policy forward) and its backward."""
    inp, comps = _inputs(be, rows, prompt, completion, modality)
    layers = list(range(1, len(be.decoder_layers()) + 1))
    exclude = weight_storages(be)
    for p in params:  # gradients exist from the first step on; not part of the activations
        p.grad = torch.zeros_like(p)
    # Phi-4's speech LoRA stays on through the backward, so that a checkpointed block's recompute runs
    # the weights its forward ran (Phi4MMBackend.score alone switches it off when it returns).
    adapters = be.adapters_for(modality) if hasattr(be, "adapters_for") else contextlib.nullcontext()
    be.train()
    with adapters, peak_live_bytes(be.device) as peak, SavedBytes(exclude) as saved:
        # One forward per row, as the plan models it: the path under checkpointed blocks, and an upper
        # bound of the prompt-sharing one (which `score` would take here, every row sharing prompt 0).
        sc = be.score(inp, comps, [0] * rows, layers, grad=True, entropy=True, share_prompt=False)
        (sc.logprobs * sc.mask).sum().backward()
    be.eval()
    return saved.total, peak["peak"]


def measure_forward(be, rows: int, prompt: int, modality: str = "text") -> int:
    """Peak bytes of a no-grad `score` (generation's prefill, reference and dropout-free forwards)."""
    inp, comps = _inputs(be, rows, prompt, 1, modality)
    layers = list(range(1, len(be.decoder_layers()) + 1))
    with peak_live_bytes(be.device) as peak:
        be.score(inp, comps, [0] * rows, layers, grad=False, share_prompt=False)
    return peak["peak"]


def measure_head(head: nn.Linear, rows: int, dtype: torch.dtype) -> int:
    """Peak bytes of `token_logprobs` (entropy on) forward + backward over `rows` states."""
    from tars.models.backend import token_logprobs

    device = head.weight.device
    h = (torch.randn(rows, head.in_features) * 0.02).to(device=device, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, head.out_features, (rows,)).to(device)
    with peak_live_bytes(device) as peak:
        lp, _ = token_logprobs(head, h, y, 1.0, entropy=True)
        lp.sum().backward()
    return peak["peak"]


def measure_sampling(head: nn.Linear, rows: int, top_p: float, dtype: torch.dtype) -> int:
    """Peak bytes of one decode step's head + sampler (`sample_next_with_logprob`, row-seeded)."""
    from tars.models.backend import sample_next_with_logprob

    device = head.weight.device
    last = (torch.randn(rows, head.in_features) * 0.02).to(device=device, dtype=dtype)
    u = torch.rand(rows, dtype=torch.float64).to(device)
    with torch.no_grad(), peak_live_bytes(device) as peak:
        logits = head(last).float()
        sample_next_with_logprob(logits, 1.0, top_p, None, u)
    return peak["peak"]


def measure_kv(be, prompt: int) -> int:
    """Bytes of the KV cache a prefill of one `prompt`-token prompt leaves, per token."""
    from tars.models.hf_compat import kv_cache

    inp, _ = _inputs(be, 1, prompt, 1, "text")
    pos = (inp.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = be.decoder()(inputs_embeds=inp.embeds, attention_mask=inp.attention_mask,
                           position_ids=be.positions(pos), use_cache=True)
    cache = kv_cache(out)
    total = sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
                for l in cache.layers)
    return total // prompt


# ---- the reduced model -------------------------------------------------------------------------------------------
def reduced_config(arch: Architecture, depth: int):
    """`arch`'s config with `depth` decoder blocks and tiny audio / vision towers (they never run in a
    scoring forward: prompts arrive as embeddings)."""
    from transformers import AutoConfig

    d = copy.deepcopy(arch.config.to_dict())
    mt = arch.model_type
    text = d["text_config"] if "text_config" in d else d
    text["num_hidden_layers"] = depth
    for k in ("layer_types", "max_window_layers"):
        text.pop(k, None)
    H = text["hidden_size"]
    if mt == "qwen2_audio":
        d["audio_config"].update(encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                                 max_source_positions=50)
    elif mt == "qwen2_5_omni_thinker":
        d["audio_config"].update(encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                                 max_source_positions=50, n_window=20, output_dim=H)
        d["vision_config"].update(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=H,
                                  fullatt_block_indexes=[0])
    elif mt == "phi4_multimodal":
        d["audio_config"].update(hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2,
                                 ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=16,
                                 bias_max_distance=50)
        d["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=56, crop_size=56, patch_size=14)
    model_type = d.pop("model_type")
    for k in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(k, None)
    return AutoConfig.for_model(model_type, **d)


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """A meta-device model on the CPU in `dtype`, filled in place: weights and biases 0, norm scales 1,
    rotary tables rebuilt (their buffers are computed, not learned). What a forward and backward
    allocate depends on shapes only, never on the values; zeros fill a 7B-wide vocabulary in a second
    where a random init takes half a minute on two cores."""
    model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if p.dim() == 1 and "norm" in name else 0.0)
    for name, m in list(model.named_modules()):
        if hasattr(m, "inv_freq") and hasattr(m, "config"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, type(m)(config=m.config).to(device))
    return model.eval()


def reduced_backend(arch: Architecture, depth: int, dtype: torch.dtype, lora, workdir: Path,
                    device: torch.device | str = "cpu"):
    """The backend of `arch` at `depth` blocks, with tars's trainable LoRA (and Phi-4's speech LoRA)."""
    from tars.models.lora import add_lora

    model = materialize(build_meta(arch.model_type, reduced_config(arch, depth)), dtype, device)
    if arch.model_type == "qwen2_audio":
        from tars.models.qwen2_audio import Qwen2AudioBackend

        be = Qwen2AudioBackend(model, _Tokenizer())
    elif arch.model_type == "qwen2_5_omni_thinker":
        from tars.models.qwen2_5_omni import Qwen25OmniBackend

        be = Qwen25OmniBackend(model, _Tokenizer())
    else:
        from tars.models.phi4_mm import LoRA, Phi4MMBackend

        speech = None
        if arch.speech_lora:
            speech = LoRA(model, _speech_lora_folder(model, arch, workdir / f"speech-lora-{depth}")).to(device, dtype)
        be = Phi4MMBackend(model, _Tokenizer(), None, speech_lora=speech)
    torch.manual_seed(0)
    params = list(add_lora(be, lora).values())
    return be, params


def _speech_lora_folder(model: nn.Module, arch: Architecture, folder: Path) -> Path:
    """A PEFT adapter of the checkpoint's rank on the checkpoint's targets, random, for `LoRA` to load."""
    from safetensors.torch import save_file

    r = arch.speech_lora["r"]
    in_blocks = {id(m) for m in decoder_parts(model, arch.model_type)[1].modules()}
    wanted = set(arch.speech_lora["target_modules"])
    state = {}
    for name, m in model.named_modules():
        if id(m) in in_blocks and isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in wanted:
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, m.in_features) * 0.01
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, r) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": arch.speech_lora.get("lora_alpha", r)}))
    return folder


# ---- fitting -----------------------------------------------------------------------------------------------------
def _lstsq(rows: list[list[float]], ys: list[float]) -> tuple[list[float], float]:
    """Least-squares coefficients and the largest relative residual."""
    A = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    coef = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    res = ((A @ coef - y).abs() / y.clamp(min=1)).max().item()
    return [float(c) for c in coef], res


def calibrate_architecture(arch: Architecture, dtype: torch.dtype, lora, log: Callable[[str], None] = print,
                           extras: bool = True, device: torch.device | str = "cpu") -> dict:
    """Measure `arch` at its widths with 2 and 3 blocks; returns the entry calibration.json keeps.
    `extras=False` measures the training forwards only (no prefill, LM head chunk, sampler, KV cache)."""
    t0 = time.perf_counter()
    modalities = ["text", "speech"] if arch.speech_lora else ["text"]
    points = []  # (modality, mode, depth, rows, prompt, completion, saved, peak)
    forwards = []  # (depth, rows, prompt, peak)
    extra = {}
    with tempfile.TemporaryDirectory(prefix="tars-calibrate-") as tmp:
        for depth in DEPTHS:
            be, params = reduced_backend(arch, depth, dtype, lora, Path(tmp), device)
            measure_forward(be, 1, 16)  # warm-up: lazily built tables are not activations
            for modality in modalities:
                for mode in ("full", "checkpoint"):
                    be.checkpoint_blocks(mode == "checkpoint")
                    shapes = [(r, p, 1) for r, p in SHAPES] + ([COMP_SHAPE] if depth == DEPTHS[-1] else [])
                    for rows, prompt, completion in shapes:
                        saved, peak = measure_step(be, params, rows, prompt, completion, modality)
                        points.append((modality, mode, depth, rows, prompt, completion, saved, peak))
                        log(f"  {arch.name}: {modality:6s} {mode:10s} blocks {depth}, {rows}×({prompt}+{completion}) "
                            f"tokens: saved {saved / 2**20:7.1f} MiB, peak {peak / 2**20:7.1f} MiB")
            be.checkpoint_blocks(False)
            if not extras:
                continue
            for rows, prompt in SHAPES:
                forwards.append((depth, rows, prompt, measure_forward(be, rows, prompt)))
            if depth == DEPTHS[-1]:
                head = be.lm_head()
                chunk = max(1, (64 << 20) // (4 * head.out_features))
                extra["head"] = [(m, measure_head(head, m, be.dtype)) for m in (chunk, 2 * chunk)]
                extra["sampling"] = {str(p): measure_sampling(head, 8, p, be.dtype) / (8 * head.out_features)
                                     for p in (1.0, 0.9)}
                extra["kv"] = measure_kv(be, 64) // depth
                formula = arch.kv_bytes_per_token(be.lm_head().weight.element_size()) // arch.layers
                if extra["kv"] != formula:
                    raise RuntimeError(f"{arch.name}: the KV cache holds {extra['kv']} bytes per token and layer, "
                                       f"the plan's formula says {formula}")
                log(f"  {arch.name}: LM head chunk {chunk} rows; KV cache {extra['kv']} B per token and layer "
                    "(= 2 × KV heads × head dim × dtype bytes)")
            del be, params
    entry = {"name": arch.name, "model_type": arch.model_type,
             "widths": {"hidden": arch.hidden, "intermediate": arch.intermediate, "heads": arch.heads,
                        "kv_heads": arch.kv_heads, "head_dim": arch.head_dim, "vocab": arch.vocab},
             "dtype": str(dtype).removeprefix("torch."), "lora": {"r": lora.r, "dropout": lora.dropout},
             "modalities": {}, "residuals": {}}
    for modality in modalities:
        entry["modalities"][modality] = {}
        for mode in ("full", "checkpoint"):
            pts = [p for p in points if p[0] == modality and p[1] == mode]
            feats = [[d * r * (p + c), r * (p + c), r * c, 1.0] for _, _, d, r, p, c, _, _ in pts]
            saved, res_s = _lstsq(feats, [p[6] for p in pts])
            dec = [p for p in pts if p[5] == 1]
            peak, res_p = _lstsq([[d * r * (p + c), r * (p + c), 1.0] for _, _, d, r, p, c, _, _ in dec],
                                 [p[7] for p in dec])
            entry["modalities"][modality][mode] = {
                "saved": dict(zip(("per_layer_token", "per_token", "per_completion_token", "constant"), saved)),
                "peak": dict(zip(("per_layer_token", "per_token", "constant"), peak))}
            entry["residuals"][f"{modality}/{mode}"] = {"saved": res_s, "peak": res_p}
    entry["points"] = [dict(zip(("modality", "mode", "blocks", "rows", "prompt", "completion", "saved", "peak"), p))
                       for p in points]
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    if not extras:
        return entry
    fw, res_f = _lstsq([[r * p, 1.0] for _, r, p, _ in forwards], [f[3] for f in forwards])
    entry["forward"] = dict(zip(("per_token", "constant"), fw))
    entry["residuals"]["forward"] = res_f
    (m1, b1), (m2, b2) = extra["head"]
    entry["head"] = {"per_row": (b2 - b1) / (m2 - m1), "constant": b1 - (b2 - b1) / (m2 - m1) * m1,
                     "chunk_rows": m1}
    entry["sampling_bytes_per_logit"] = extra["sampling"]
    entry["kv_bytes_per_token_and_layer_measured"] = extra["kv"]
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    return entry


def environment(device: torch.device | str = "cpu") -> dict:
    import transformers

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    return {"device": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d")}


OVERHEAD_NOTE = ("CUDA context + cuBLAS / NCCL workspaces: an allowance, not a measurement (no GPU was lent to the "
                 "calibration); a calibration on a GPU should replace it with torch.cuda.mem_get_info's used bytes "
                 "minus max_memory_allocated")


def published_targets():
    """The three architectures the 7B recipes name, with the recipes' dtype and LoRA."""
    from tars.plan.architecture import CLASSES, load_architecture, published
    from tars.models.lora import LoraSettings

    return [(load_architecture(name), "bfloat16", LoraSettings()) for name, e in published().items()
            if e["model_type"] in CLASSES]


def calibrate(targets, out: Path, log: Callable[[str], None] = print, device: torch.device | str = "cpu",
              command: str = "tars plan --calibrate") -> Path:
    """Measure each (architecture, dtype, LoraSettings) and write its entry into `out` (JSON), keeping
    the entries `out` already holds for other keys."""
    from tars.atomic import atomic_write_text

    out = Path(out)
    data = json_object(out, "a calibration file to add to (give one, or a new file's name)") if out.exists() else {}
    data.setdefault("entries", {})
    data["command"] = command
    data["environment"] = environment(device)
    data.setdefault("fixed_overhead_gib", 1.5)
    data["fixed_overhead_note"] = OVERHEAD_NOTE
    for arch, dtype, lora in targets:
        log(f"calibrating {arch.name} ({arch.key(dtype, lora.dropout > 0)}) ...")
        entry = calibrate_architecture(arch, getattr(torch, dtype), lora, log, device=device)
        entry["environment"] = environment(device)
        data["entries"][arch.key(dtype, lora.dropout > 0)] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(data, indent=1) + "\n")  # after each: a kill keeps what is done
        log(f"  done in {entry['seconds']:.0f} s")
    return out
