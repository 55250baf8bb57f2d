"""Phi-4-multimodal (`Phi4MultimodalForCausalLM`, transformers' native port): audio + text in, text out.

Prompt, as the model card and the released tokenizer's chat template write it:
`<|system|>…<|end|><|user|><|audio_1|><|end|><|assistant|>`, where the processor turns `<|audio_1|>` into
one audio placeholder (`<|endoftext11|>`, id 200011) per audio embedding. There are no wrapper tokens
around the audio. A turn ends with `<|end|>`; `<|endoftext|>` ends the text.

Audio, exactly as the processor and `Phi4MultimodalAudioEmbedding` do it for one clip:

- features: `Phi4MultimodalFeatureExtractor` (from the folder's preprocessor_config.json) on the clip
  alone: 80 log-mel bands, 25 ms windows every 10 ms with pre-emphasis, `(samples − 400) // 160 + 1`
  frames. The processor pads several clips to the longest and masks the padding, but the conformer's
  convolutions still see it, so a clip's embeddings depend on its batch-mates; one clip per call is what
  a single-audio prompt gets, and what makes the per-clip cache exact;
- encoder: the conformer (`audio_embed.encoder`), 8× time reduction: `ceil(frames / 8)` states, which is
  the extractor's `audio_embed_sizes`, i.e. the number of placeholders the processor writes;
- projector: the *speech* projection (`up_proj_for_speech` → GELU → `down_proj_for_speech`), the one the
  model picks when there is no image (`audio_projection_mode="speech"`). The encoder output is cached per
  clip; the projector runs per forward.

The speech LoRA. Phi-4-multimodal is Phi-4-mini with the LLM frozen plus modality LoRAs; its speech
abilities come from the speech LoRA (rank 320, on the LLM's linear layers) being active whenever the
input holds audio, and the original (remote-code) model switches it off for text-only prompts
(`input_mode` LANGUAGE → `unset_lora_adapter()`). The native transformers class knows nothing of it: the
weights of `Phi4MultimodalForCausalLM` are the frozen base LLM, and the checkpoint ships the adapter as a
PEFT folder, `speech-lora/`, that its docs load with `model.load_adapter(..., adapter_kwargs={"subfolder":
"speech-lora"})` + `set_adapter("speech")`, after which it applies to every prompt, text ones included
(and that `set_adapter` wants peft >= 0.22, newer than the pinned one). tars follows the original model:
when the folder has `speech-lora/`, its LoRA is added (by forward hooks, the model's own modules
untouched) to the speech condition's forwards and left out of the text condition's, chosen per batch by
`PromptBatch.modality` in `generate` and `score`. A direct call of `decoder()` runs the base LLM. A model
folder's `tars_audio.json` may say `{"speech_lora": "always"}` to apply it to text prompts too, as the
native class's documented route does (docs/fidelity.md row 8); the default is `speech_only`.

Audio length: the conformer attends over blocks of 500 states (40 s) and splits longer audio into
independent blocks, so tars accepts clips up to 40 s by default (a question cut across blocks is not
seen whole); a model folder may set another limit in `tars_audio.json` (`{"max_audio_s": …}`).

Context: the released config uses LongRoPE, whose frequencies switch once a sequence passes
`original_max_position_embeddings` (4096). transformers recomputes the whole KV cache at that point; a
cache built with one set of frequencies is not valid under the other, so tars caps the context at 4096
tokens, where generation with a cache and one-forward scoring agree.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from tars.data.audio import SAMPLE_RATE
from tars.errors import UserError
from tars.models.audio_cache import AudioCache
from tars.models.backend import Backend, Generation, PromptBatch, Scores, stop_tokens
from tars.models.loading import load_tokenizer, read_config, require_architecture
from tars.models.qwen2_audio import default_cache_dir, encoder_fingerprint

LORA_DIR = "speech-lora"
AUDIO_LIMIT_FILE = "tars_audio.json"
#: Which prompts the speech LoRA applies to: the original model's (`speech_only`) or every prompt
#: (`always`, the native class after `set_adapter`).
SPEECH_LORA_MODES = ("speech_only", "always")
#: A PEFT LoRA tensor name: the adapted module, A or B (the adapter's name, when saved with one, skipped).
_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
#: States per conformer attention block (hard-coded in transformers' `Phi4MultimodalAudioModel`).
ENCODER_BLOCK = 500
#: The documented prompt format, used when a tokenizer has no chat template.
PHI4_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class SpeechProjector(nn.Module):
    """Phi-4-multimodal's speech-mode audio projection, sharing the model's two linear layers."""

    def __init__(self, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, h: Tensor) -> Tensor:
        return self.down(nn.functional.gelu(self.up(h)))


class LoRA(nn.Module):
    """A frozen PEFT LoRA adapter applied through forward hooks: `y += scale · B(A(x))` on each adapted
    linear layer while `active`. Hooks rather than PEFT's module injection keep the model's modules,
    parameter names and `save_pretrained` output exactly those of the base checkpoint, and make
    switching per batch a flag."""

    def __init__(self, model: nn.Module, folder: Path):
        super().__init__()
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        try:
            cfg = json.loads(cfg_file.read_text())
            state = load_file(str(weights))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as e:
            raise UserError(f"{folder}: unreadable LoRA adapter ({str(e).splitlines()[0][:160]})") from None
        unsupported = [k for k in ("use_dora", "alpha_pattern", "rank_pattern", "lora_bias") if cfg.get(k)]
        if cfg.get("peft_type", "LORA") != "LORA" or unsupported:
            raise UserError(f"{cfg_file}: tars applies plain LoRA adapters only (this one sets "
                            f"{unsupported or cfg.get('peft_type')})")
        pairs: dict[str, dict[str, Tensor]] = {}
        for key, t in state.items():
            m = _LORA_KEY.fullmatch(key)
            if m is None:
                raise UserError(f"{weights}: unexpected tensor {key!r} in a LoRA adapter")
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        modules = dict(model.named_modules())
        self.config = cfg
        self.keys = sorted(state)
        self.names = sorted(pairs)
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        self.active = False
        self._handles = []
        for i, name in enumerate(self.names):
            target = modules.get(name)
            if not isinstance(target, nn.Linear) or set(pairs[name]) != {"A", "B"}:
                raise UserError(f"{weights}: LoRA weights for {name!r} do not match a linear layer of the model")
            A, B = pairs[name]["A"], pairs[name]["B"]
            if A.shape[1] != target.in_features or B.shape[0] != target.out_features or A.shape[0] != B.shape[1]:
                raise UserError(f"{weights}: LoRA shapes for {name!r} do not match the model")
            self.A.append(nn.Parameter(A, requires_grad=False))
            self.B.append(nn.Parameter(B, requires_grad=False))
            rank = A.shape[0]
            alpha = float(cfg.get("lora_alpha", rank))
            scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            self._handles.append(target.register_forward_hook(self._hook(i, scale)))

    def _hook(self, i: int, scale: float):
        def hook(_mod, args, out):
            if not self.active:
                return out
            A, B = self.A[i], self.B[i]
            x = args[0].to(A.dtype)
            return out + (x @ A.t() @ B.t() * scale).to(out.dtype)

        return hook

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps(self.config, indent=2))
        by_name = {n: i for i, n in enumerate(self.names)}
        state = {}
        for key in self.keys:
            m = _LORA_KEY.fullmatch(key)
            i = by_name[m.group(1)]
            state[key] = (self.A[i] if m.group(2) == "A" else self.B[i]).detach().contiguous().cpu()
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


class Phi4MMBackend(Backend):
    def __init__(self, model: nn.Module, tokenizer, feature_extractor, cache: AudioCache | None = None,
                 speech_lora: LoRA | None = None, max_audio_s: float | None = None, name: str = "phi4-mm",
                 speech_lora_on: str = "speech_only"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.speech_lora = speech_lora
        if speech_lora_on not in SPEECH_LORA_MODES:
            raise ValueError(f"speech_lora_on must be one of {SPEECH_LORA_MODES}, got {speech_lora_on!r}")
        self.speech_lora_on = speech_lora_on
        audio = model.config.audio_config
        self.max_audio_s = float(max_audio_s or ENCODER_BLOCK * audio.time_reduction * 160 / SAMPLE_RATE)
        self.cache = cache or AudioCache(f"{name}-enc")
        self.stop_token_ids = stop_tokens(tokenizer, ("<|end|>", "<|endoftext|>"))

    # ---- modules ---------------------------------------------------------------------------------
    def decoder(self) -> nn.Module:
        """`Phi4MultimodalModel`: called with `inputs_embeds` it is the plain LLM. It also holds the audio
        and vision towers (they only run on `input_ids`), so its parameters include theirs; they never
        receive a gradient through this path."""
        return self.model.model

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def _audio(self) -> nn.Module:
        return self.model.model.embed_tokens_extend.audio_embed

    @property
    def projector(self) -> nn.Module:
        a = self._audio
        return SpeechProjector(a.up_proj_for_speech, a.down_proj_for_speech)

    @property
    def max_positions(self) -> int:
        cfg = self.model.config
        limit = int(cfg.max_position_embeddings)
        rope = cfg.rope_parameters or {}
        original = (rope.get("original_max_position_embeddings")
                    or getattr(cfg, "original_max_position_embeddings", None))
        if rope.get("rope_type") == "longrope" and original:
            limit = min(limit, int(original))
        return limit

    # ---- the speech LoRA, per batch ----------------------------------------------------------------
    @contextlib.contextmanager
    def adapters_for(self, modality: str) -> Iterator[None]:
        """The speech LoRA on for speech prompts, off for text ones unless `speech_lora_on` is `always`
        (no-op without an adapter)."""
        lora = self.speech_lora
        if lora is None:
            yield
            return
        before, lora.active = lora.active, modality == "speech" or self.speech_lora_on == "always"
        try:
            yield
        finally:
            lora.active = before

    def generate(self, inputs: PromptBatch, *args, **kwargs) -> Generation:
        with self.adapters_for(inputs.modality):
            return super().generate(inputs, *args, **kwargs)

    def score(self, inputs: PromptBatch, *args, **kwargs) -> Scores:
        with self.adapters_for(inputs.modality):
            return super().score(inputs, *args, **kwargs)

    def can_mix(self, modalities) -> bool:
        """Speech and text rows share a decode batch only when they run the same weights."""
        return self.speech_lora is None or self.speech_lora_on == "always" or len(set(modalities)) <= 1

    def generate_paired(self, parts, *args, **kwargs) -> list[Generation]:
        modalities = {inp.modality for inp, _, _ in parts}
        if not self.can_mix(modalities):  # part by part, each through `generate` and its adapters
            return super().generate_paired(parts, *args, **kwargs)
        with self.adapters_for(modalities.pop() if len(modalities) == 1 else "speech"):
            return super().generate_paired(parts, *args, **kwargs)

    # ---- audio ----------------------------------------------------------------------------------
    def features(self, wav) -> tuple[Tensor, int]:
        """The extractor's features [1, frames, 80] of one clip and its number of audio embeddings."""
        out = self.feature_extractor(wav, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return out["audio_input_features"], int(out["audio_embed_sizes"][0])

    @torch.no_grad()
    def _encode(self, paths: list[Path]) -> list[Tensor]:
        enc = self._audio.encoder
        dtype = self._audio.up_proj_for_speech.weight.dtype
        win = int(self.feature_extractor.win_length)
        out = []
        for p in paths:
            wav = self.load_clip(p)
            if len(wav) < win:
                raise UserError(f"{p}: audio is {len(wav)} samples, too short for the encoder (at least {win})")
            x, n = self.features(wav)
            h = enc(x.to(device=self.device, dtype=dtype), None)[0]
            if h.shape[0] < n:
                raise UserError(f"{p}: the encoder gave {h.shape[0]} states for {n} audio embeddings "
                                "(preprocessor_config.json does not match the model's audio config)")
            out.append(h[:n].float())
        return out

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, cache_dir: Path | None = None) -> "Phi4MMBackend":
        from safetensors import SafetensorError
        from transformers import Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM

        path = Path(path)
        config = read_config(path)
        require_architecture(path, config, "phi4_multimodal")
        tokenizer = load_tokenizer(path)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = PHI4_TEMPLATE
        try:
            model, info = Phi4MultimodalForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise UserError(f"{path}: could not load the weights ({str(e).splitlines()[0][:200]})") from None
        missing = sorted(info["missing_keys"])
        if missing:
            raise UserError(f"{path}: weights do not match the config ({len(missing)} missing, e.g. {missing[0]})")
        if (path / "preprocessor_config.json").exists():
            try:
                fe = Phi4MultimodalFeatureExtractor.from_pretrained(str(path))
            except (OSError, ValueError) as e:
                raise UserError(f"{path}: could not load the feature extractor "
                                f"({str(e).splitlines()[0][:200]})") from None
        else:
            fe = Phi4MultimodalFeatureExtractor()
        if fe.sampling_rate != SAMPLE_RATE or fe.feature_size != model.config.audio_config.input_size:
            raise UserError(f"{path}/preprocessor_config.json: {fe.sampling_rate} Hz, {fe.feature_size} bands do not "
                            f"match the model ({SAMPLE_RATE} Hz, {model.config.audio_config.input_size} bands)")
        max_audio_s, speech_lora_on = _audio_settings(path / AUDIO_LIMIT_FILE)
        model.to(device=device, dtype=dtype).eval()
        lora = None
        if (path / LORA_DIR).is_dir():
            lora = LoRA(model, path / LORA_DIR).to(device=device, dtype=dtype)
        enc = model.model.embed_tokens_extend.audio_embed.encoder
        cache = AudioCache(f"phi4mm-enc-{encoder_fingerprint(enc)}",
                           cache_dir if cache_dir is not None else default_cache_dir())
        return cls(model, tokenizer, fe, cache, lora, max_audio_s, name=path.name, speech_lora_on=speech_lora_on)

    def save_pretrained(self, path: str | Path) -> None:
        """Save model + tokenizer + feature extractor (+ the speech LoRA, the audio limit), atomically."""
        from tars.atomic import atomic_dir

        with atomic_dir(Path(path)) as tmp:
            self.model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            self.feature_extractor.save_pretrained(str(tmp))
            (tmp / AUDIO_LIMIT_FILE).write_text(
                json.dumps({"max_audio_s": self.max_audio_s, "speech_lora": self.speech_lora_on}) + "\n")
            if self.speech_lora is not None:
                self.speech_lora.save(tmp / LORA_DIR)


def _audio_settings(file: Path) -> tuple[float | None, str]:
    """(max_audio_s or None, speech_lora mode) from a model folder's `tars_audio.json`; both keys
    optional, anything else in the file an error that names it."""
    if not file.exists():
        return None, "speech_only"
    try:
        got = json.loads(file.read_text())
        if not isinstance(got, dict):
            raise ValueError("not a JSON object")
        unknown = sorted(set(got) - {"max_audio_s", "speech_lora"})
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}")
        max_audio_s = float(got["max_audio_s"]) if got.get("max_audio_s") is not None else None
        mode = got.get("speech_lora", "speech_only")
        if mode not in SPEECH_LORA_MODES:
            raise ValueError(f"speech_lora must be one of {', '.join(SPEECH_LORA_MODES)}, got {mode!r}")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise UserError(f'{file}: expected {{"max_audio_s": seconds, "speech_lora": "speech_only"|"always"}} '
                        f"({e})") from None
    return max_audio_s, mode
