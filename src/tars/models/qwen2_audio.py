"""Qwen2-Audio (`Qwen2AudioForConditionalGeneration`), and the bundled mini model built in its image.

Prompt, as Qwen2-Audio-Instruct is trained: ChatML with the audio as
`Audio 1: <|audio_bos|>[audio frames]<|audio_eos|>` in the user turn. The encoder (Whisper-style, frozen)
takes log-mels padded to its window (`2 × max_source_positions` frames = 30 s for real checkpoints),
masks the padding as the HF model does, and keeps only the clip's real output frames:
`((L − 1) // 2 + 1 − 2) // 2 + 1` for L mel frames. Clips longer than the window are refused with a
clear message (not silently truncated: a truncated question is a different question).

The projector is the checkpoint's linear `multi_modal_projector`, or — when the model folder holds a
`tars_projector.json` (the mini model) — a `StackingProjector`, `CTCProjector` or `SoftCTCProjector`
that replaces it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask

from tars.data.audio import SAMPLE_RATE
from tars.data.features import log_mel
from tars.errors import UserError
from tars.models.audio_cache import AudioCache
from tars.models.backend import Backend, stop_tokens
from tars.models.loading import load_tokenizer, read_config, require_architecture
from tars.models.projector import CTCProjector, SoftCTCProjector, StackingProjector

PROJECTOR_FILE = "tars_projector.json"
PROJECTOR_WEIGHTS = "tars_projector.safetensors"


class Qwen2AudioBackend(Backend):
    speech_template = "Audio 1: {audio}\n"

    def __init__(self, model: nn.Module, tokenizer, projector: nn.Module | None = None,
                 cache: AudioCache | None = None, name: str = "qwen2-audio"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        if projector is not None:
            model.model.multi_modal_projector = projector
        enc = model.model.audio_tower
        self.n_mels = enc.config.num_mel_bins
        self.window_frames = enc.config.max_source_positions * 2
        self.max_audio_s = self.window_frames * 160 / SAMPLE_RATE
        self.cache = cache or AudioCache(f"{name}-enc")
        self.stop_token_ids = stop_tokens(tokenizer, ("<|im_end|>", "<|endoftext|>"))

    # ---- modules ---------------------------------------------------------------------------------
    def decoder(self) -> nn.Module:
        return self.model.model.language_model

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def audio_wrap(self) -> tuple[str, str]:
        return "<|audio_bos|>", "<|audio_eos|>"

    def render(self, record, modality, system=None):
        text = super().render(record, modality, system)
        if modality == "speech":
            from tars.models.backend import AUDIO_SLOT

            text = text.replace(AUDIO_SLOT, self.speech_template.format(audio=AUDIO_SLOT), 1)
        return text

    # ---- audio ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, paths: list[Path]) -> list[Tensor]:
        enc = self.model.model.audio_tower
        feats, lengths = [], []
        for p in paths:
            wav = self.load_clip(p)
            feats.append(log_mel(wav, n_mels=self.n_mels, pad_to_s=self.max_audio_s))
            lengths.append(min(math.ceil(len(wav) / 160), self.window_frames))
        x = torch.stack(feats).to(device=self.device, dtype=next(enc.parameters()).dtype)
        L = torch.tensor(lengths, device=x.device)
        conv_len, out_len = enc._get_feat_extract_output_lengths(L)
        n = self.window_frames // 2
        valid = (torch.arange(n, device=x.device)[None, :] < conv_len[:, None]).long()
        mask = create_bidirectional_mask(config=enc.config, inputs_embeds=x.new_zeros(len(paths), n, 1),
                                         attention_mask=valid)
        out = enc(x, attention_mask=mask).last_hidden_state
        return [out[i, : int(out_len[i])].float() for i in range(len(paths))]

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, cache_dir: Path | None = None) -> "Qwen2AudioBackend":
        from transformers import Qwen2AudioForConditionalGeneration

        path = Path(path)
        config = read_config(path)
        require_architecture(path, config, "qwen2_audio")
        tokenizer = load_tokenizer(path)
        from safetensors import SafetensorError
        from transformers.utils import logging as hf_logging

        ours = (path / PROJECTOR_FILE).exists()
        verbosity = hf_logging.get_verbosity()
        if ours:  # the checkpoint's projector keys are ours, not the linear one: expected, not news
            hf_logging.set_verbosity_error()
        try:
            model = Qwen2AudioForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise UserError(f"{path}: could not load the weights ({str(e).splitlines()[0][:200]})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        if ours:
            model.model.multi_modal_projector = _load_projector(path, model.get_input_embeddings())
        model.to(device=device, dtype=dtype).eval()
        cache = AudioCache(f"enc-{encoder_fingerprint(model.model.audio_tower)}",
                           cache_dir if cache_dir is not None else default_cache_dir())
        return cls(model, tokenizer, None, cache, name=path.name)

    def save_pretrained(self, path: str | Path) -> None:
        """Save model + tokenizer (+ the projector spec when it is ours), atomically as a folder."""
        from tars.atomic import atomic_dir

        with atomic_dir(Path(path)) as tmp:
            self.model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            if isinstance(self.projector, (StackingProjector, CTCProjector)):
                from safetensors.torch import save_file

                (tmp / PROJECTOR_FILE).write_text(json.dumps(self.projector.config(), indent=2))
                save_file({k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()},
                          str(tmp / PROJECTOR_WEIGHTS))


def encoder_fingerprint(encoder: nn.Module) -> str:
    """Identifies an encoder by its weights (a strided sample of every tensor), not by the folder it came
    from: the mini model's stages (base, SFT, aligned, trained) share one encoder and so one cache.

    The dtype and device kind the encoder runs in are part of it: the same weights give outputs that
    differ by round-off in float16 or on a GPU, and a cache shared across them would make a run's
    speech prompts depend on which run filled the cache first (Whisper's fp16-born weights sample the
    same in float16 and float32, so the weights alone could not tell those apart)."""
    import hashlib

    h = hashlib.sha1()
    first = next(encoder.parameters(), None)
    if first is not None:
        h.update(f"{first.dtype}|{first.device.type}".encode())
    for name, t in sorted(encoder.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    from tars.paths import tars_home

    return tars_home() / "cache" / "encoder"


def _load_projector(path: Path, embedding: nn.Embedding) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    spec = json.loads((path / PROJECTOR_FILE).read_text())
    weights = path / PROJECTOR_WEIGHTS
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"{weights}: missing or corrupt projector weights ({str(e).splitlines()[0][:160]})") from None
    return projector_from_spec(spec, state, embedding, str(path / PROJECTOR_FILE))


def projector_from_spec(spec: dict, state: dict, embedding: nn.Embedding, where: str) -> nn.Module:
    """A tars projector from its `config()` and weights; `where` names the source in errors."""
    kind = spec.get("type", "stack")
    if kind == "stack":
        proj = StackingProjector(spec["d_audio"], spec["d_model"], spec["stack"], spec["d_hidden"])
    elif kind in ("ctc", "soft_ctc"):
        cls = CTCProjector if kind == "ctc" else SoftCTCProjector
        proj = cls(spec["d_audio"], spec["d_model"], embedding, spec["stack"], spec["d_hidden"])
    else:
        raise UserError(f"{where}: unknown projector type {kind!r} (expected 'stack', 'ctc' or 'soft_ctc')")
    try:
        proj.load_state_dict(state, strict=True)
    except RuntimeError:
        raise UserError(f"{where}: projector weights do not match its spec") from None
    return proj
