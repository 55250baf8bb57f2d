"""A model's architecture without its weights: the class built from its config on PyTorch's `meta`
device, so parameters are counted exactly (what `sum(p.numel())` of the loaded model gives) and the
shapes the memory model needs are read off the modules, for a 7B model in well under a second.

Where the config comes from, in order: a local model folder's `config.json` (and, for Phi-4, its
`speech-lora/adapter_config.json`); the Hugging Face cache, when it holds the hub id's `config.json`;
the published configs shipped in `published_configs.json` for the models the recipes name (offline
machines have no hub). Anything else is a one-line `UserError` naming the `model` key.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from tars.errors import UserError

PUBLISHED_FILE = Path(__file__).with_name("published_configs.json")
#: model_type → (transformers class, tars backend): the architectures tars trains.
CLASSES = {
    "qwen2_audio": "Qwen2AudioForConditionalGeneration",
    "qwen2_5_omni_thinker": "Qwen2_5OmniThinkerForConditionalGeneration",
    "phi4_multimodal": "Phi4MultimodalForCausalLM",
}
#: Longest clip each backend accepts by default, seconds (models/*.py: the encoder windows).
MAX_AUDIO_S = {"qwen2_audio": 30.0, "qwen2_5_omni_thinker": 300.0, "phi4_multimodal": 40.0}
#: System prompt + chat template tokens when nothing better is known (published_configs.json notes).
DEFAULT_TEMPLATE_TOKENS = 70


@functools.cache
def published() -> dict:
    data = json.loads(PUBLISHED_FILE.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


@dataclass
class Architecture:
    """What the memory plan needs to know about a model, all counted from its modules."""

    name: str
    model_type: str
    #: Where the config came from (a file, or the published configs).
    source: str
    #: Every parameter the backend holds: the model as `load_backend` builds it, plus Phi-4's frozen
    #: speech LoRA (tied weights once).
    params: int
    #: The same split: decoder blocks, embeddings + LM head + final norm, encoders (audio, projector,
    #: vision), speech LoRA.
    parts: dict[str, int]
    #: Trainable LoRA parameters for the `lora` settings given (tars's add_lora on the decoder blocks).
    lora_params: int
    lora_modules: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    template_tokens: int
    max_audio_s: float
    #: Phi-4's speech LoRA (r, target_modules) when the model has one, else None.
    speech_lora: dict | None = None
    #: Whether speech and text rows share one decode batch (`Backend.can_mix`): not for Phi-4 with a
    #: speech LoRA applied to speech prompts only.
    can_mix: bool = True
    #: The config the class was built from (a transformers PretrainedConfig), for calibration.
    config: object = field(default=None, repr=False)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token in every decoder layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def audio_tokens(self, seconds: float) -> int:
        """LLM positions a clip of `seconds` takes, exactly as the backends count them."""
        samples = int(round(seconds * 16000))
        if self.model_type == "phi4_multimodal":
            frames = (samples - 400) // 160 + 1  # Phi4MultimodalFeatureExtractor
            return math.ceil(frames / 8)
        frames = math.ceil(samples / 160)  # Whisper log-mels; Qwen2-Audio and Omni pool 4 → 1
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1

    def key(self, dtype: str, lora_dropout: bool) -> str:
        """Which calibration applies: the decoder's widths, the dtype and whether LoRA dropout keeps
        copies of its inputs (depth is what the calibration varies, so it is not part of it)."""
        parts = [self.model_type, f"h{self.hidden}", f"i{self.intermediate}", f"a{self.heads}", f"kv{self.kv_heads}",
                 f"d{self.head_dim}", f"v{self.vocab}", dtype, "dropout" if lora_dropout else "nodropout"]
        if self.speech_lora:
            parts.append(f"slora{self.speech_lora['r']}")
        return "/".join(parts)


# ---- finding the config --------------------------------------------------------------------------------
def _folder_of(model: str) -> Path | None:
    """The local folder holding `model`'s config.json: the path itself (a shipped mini stage unpacked
    first), an adapter folder's base model's (training on an adapter merges it into its base, so the
    base's architecture is what is trained), or the hub id's snapshot in the Hugging Face cache (never
    the network)."""
    from tars.models.loading import local_model
    from tars.models.lora import adapter_base, is_adapter, read_adapter_meta

    path = local_model(model).expanduser()
    if is_adapter(path):
        try:
            return _folder_of(str(adapter_base(read_adapter_meta(path))))
        except KeyError as e:
            raise UserError(f"{path}: its adapter json has no {e} field") from None
    if (path / "config.json").is_file():
        return path
    from tars.models.loading import looks_like_hub_id

    if looks_like_hub_id(str(model)):
        try:
            from huggingface_hub import try_to_load_from_cache

            got = try_to_load_from_cache(str(model), "config.json")
        except Exception:
            got = None
        if isinstance(got, str):
            return Path(got).parent
    return None


def json_object(path: Path, what: str = "a JSON object") -> dict:
    """A JSON file that may have been edited by hand, or be something else (a model folder's side file,
    a calibration file), as a dict; a one-line error saying it is not `what`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not {what} ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not {what} (a JSON object)")
    return data


def _config_from_dict(model_type: str, data: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **data)


def load_architecture(model: str, lora=None, where: str = "config: model") -> Architecture:
    """The architecture of `model` (a folder, `mini:NAME`, or a hub id) with `lora` (LoraSettings; None =
    tars's defaults) counted on its decoder blocks."""
    from tars.models.lora import LoraSettings

    lora = lora or LoraSettings()
    folder = _folder_of(model)
    speech_lora, template, can_mix_always = None, DEFAULT_TEMPLATE_TOKENS, False
    if folder is not None:
        from transformers import AutoConfig

        try:
            raw = json.loads((folder / "config.json").read_text())
            config = AutoConfig.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise UserError(f"{folder / 'config.json'}: could not read it ({str(e).splitlines()[0][:160]})") from None
        model_type = raw.get("model_type")
        if model_type == "qwen2_5_omni":
            config, model_type = config.thinker_config, "qwen2_5_omni_thinker"
        source = str(folder / "config.json")
        adapter = folder / "speech-lora" / "adapter_config.json"
        if model_type == "phi4_multimodal" and adapter.is_file():
            a = json_object(adapter)
            targets = a.get("target_modules") or []
            if isinstance(targets, str):  # a regex over module names, as the released adapter's may be
                targets = [t for t in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj") if t in targets]
            speech_lora = {"r": int(a["r"]), "target_modules": list(targets)}
            settings = folder / "tars_audio.json"
            if settings.is_file():
                can_mix_always = json_object(settings).get("speech_lora") == "always"
    elif str(model) in published():
        entry = published()[str(model)]
        model_type = entry["model_type"]
        config = _config_from_dict(model_type, entry["config"])
        source = f"published config ({PUBLISHED_FILE.name})"
        speech_lora = entry.get("speech_lora")
        template = entry.get("template_tokens", template)
    else:
        known = ", ".join(k for k in published() if published()[k]["model_type"] in CLASSES)
        raise UserError(f"{where}: {model}: no config.json there (nor in the Hugging Face cache), and not one of the "
                        f"published models tars knows ({known}): give the folder of a downloaded copy")
    if model_type not in CLASSES:
        raise UserError(f"{where}: {model}: model_type {model_type!r} is not one tars trains "
                        f"({', '.join(sorted(CLASSES))})")
    return _count(str(model), model_type, config, source, lora, speech_lora, template, can_mix_always)


# ---- counting on the meta device ---------------------------------------------------------------------------
def build_meta(model_type: str, config) -> nn.Module:
    """The transformers model of `config` with every tensor on the meta device (no memory, no init)."""
    import transformers

    cls = getattr(transformers, CLASSES[model_type])
    with torch.device("meta"):
        return cls(config)


def decoder_parts(model: nn.Module, model_type: str) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """(decoder, its blocks, LM head) of a model, where each backend finds them (models/*.py)."""
    if model_type == "qwen2_audio":
        dec = model.model.language_model
    elif model_type == "qwen2_5_omni_thinker":
        from tars.models.qwen2_5_omni import thinker_parts

        dec = thinker_parts(model)[1]
    else:
        dec = model.model
    return dec, dec.layers, model.lm_head


def _numel(modules: Sequence[nn.Module]) -> int:
    seen, n = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def adapted_linears(blocks: nn.Module, names: Sequence[str]) -> list[nn.Linear]:
    """The linear layers inside the decoder blocks whose own name is in `names` (as rl/tars.py's
    `lora_targets` picks them)."""
    wanted = set(names)
    return [m for n, m in blocks.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted]


def _count(name, model_type, config, source, lora, speech_lora, template, can_mix_always) -> Architecture:
    model = build_meta(model_type, config)
    dec, blocks, head = decoder_parts(model, model_type)
    total = _numel([model])
    n_blocks = _numel([blocks])
    n_lm = _numel([dec.embed_tokens, dec.norm, head])
    lora_linears = adapted_linears(blocks, lora.target_modules)
    lora_params = sum(lora.r * (m.in_features + m.out_features) for m in lora_linears)
    n_speech = 0
    if speech_lora:
        n_speech = sum(speech_lora["r"] * (m.in_features + m.out_features)
                       for m in adapted_linears(blocks, speech_lora["target_modules"]))
    attn = blocks[0].self_attn
    text = getattr(config, "text_config", None) or config
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_dim = int(getattr(attn, "head_dim", None) or getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    return Architecture(
        name=name, model_type=model_type, source=source, params=total + n_speech,
        parts={"decoder blocks": n_blocks, "embeddings + LM head": n_lm,
               "encoders + projector": total - n_blocks - n_lm, "speech LoRA (frozen)": n_speech},
        lora_params=lora_params, lora_modules=len(lora_linears), layers=len(blocks), hidden=hidden,
        intermediate=int(text.intermediate_size), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        vocab=int(head.out_features), template_tokens=int(template),
        speech_lora=speech_lora, can_mix=speech_lora is None or can_mix_always, config=config,
        max_audio_s=_max_audio_s(model_type, config))


def _max_audio_s(model_type: str, config) -> float:
    if model_type == "qwen2_audio":  # the encoder's window: 2 mel frames per position, 100 frames a second
        return config.audio_config.max_source_positions * 2 / 100
    return MAX_AUDIO_S[model_type]


def embedder_params(spec: str | None) -> tuple[int, str]:
    """Parameters of R_beh's sentence embedder (`embedder` key) and where the count comes from: its
    folder's config.json (a local folder, the Hugging Face cache, or the packaged all-MiniLM-L6-v2),
    else the published config of the paper's Qwen3-Embedding-0.6B."""
    from transformers import AutoConfig, AutoModel

    if spec is None:
        from tars.rewards.alignment import _default_model_path

        folder = _default_model_path()
    else:
        folder = _folder_of(str(spec))
    if folder is not None and (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(folder))
        source = str(folder / "config.json")
    elif spec is not None and str(spec) in published():
        entry = published()[str(spec)]
        config = _config_from_dict(entry["model_type"], entry["config"])
        source = f"published config ({PUBLISHED_FILE.name})"
    else:
        raise UserError(f"config: embedder: {spec}: no config.json there (nor in the Hugging Face cache) and not "
                        f"a published model tars knows; give a downloaded folder or embedder=null")
    with torch.device("meta"):
        m = AutoModel.from_config(config)
    return _numel([m]), source
