"""Qwen2.5-Omni, its *thinker* (`Qwen2_5OmniThinkerForConditionalGeneration`): audio + text in, text out.

Only the thinker is loaded. A released checkpoint folder holds the whole `Qwen2_5OmniForConditionalGeneration`
(model_type "qwen2_5_omni": thinker, talker, token2wav); transformers loads the thinker alone from it (the
thinker config is found by its model_type inside `thinker_config`, the `thinker.` weight prefix is removed
and the talker / token2wav weights are skipped), so tars never builds the speech-output half. A saved
thinker folder (model_type "qwen2_5_omni_thinker") loads the same way.

Prompt, as the checkpoint's chat template writes an audio item (without `add_audio_id`): ChatML with
`<|audio_bos|>[audio frames]<|audio_eos|>` as the user turn's content. The wrapper tokens are read from
the config's `audio_start_token_id` / `audio_end_token_id`, not hard-coded.

Audio, exactly as `Qwen2_5OmniProcessor` + `get_audio_features` do it:

- features: Whisper log-mels with `feature_size` mels (128) of the clip zero-padded to the processor's
  window (`chunk_length` in preprocessor_config.json: 300 s for released checkpoints), of which the
  first `ceil(samples / 160)` frames are kept (the extractor's `attention_mask`, which the thinker
  uses to drop the padding). Our `log_mel` gives the extractor's numbers without computing the window's
  silent tail;
- encoder: the audio tower takes each clip *unpadded* (`feature_lens`), cuts it into blocks of
  `2 × n_window` frames (2 s) that attend only within themselves, then average-pools pairs of frames:
  a clip of L frames becomes `((L − 1) // 2 + 1 − 2) // 2 + 1` audio tokens (25 per second), exactly
  the number of `<|AUDIO|>` placeholders the processor writes;
- projector: the tower's last two modules, `ln_post` then `proj` (d_model → the LLM's width). The frozen
  part (everything before `ln_post`) is cached per clip; `projector` runs per forward, so it can be
  trained like Qwen2-Audio's.

Clips longer than the processor's window are refused (the processor would silently truncate them).

Positions: the thinker's LLM uses M-RoPE with three sections (time, height, width). For prompts of
audio and text only (no image / video grid), `get_rope_index` gives all three sections the same
sequential positions `cumsum(attention_mask) − 1`, audio tokens included, so `positions` expands the
1-D positions to [3, B, T]. (Audio gets time-aligned positions only when interleaved with video.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from tars.data.audio import SAMPLE_RATE
from tars.data.features import HOP_LENGTH, N_FFT, log_mel
from tars.errors import UserError
from tars.models.audio_cache import AudioCache
from tars.models.backend import Backend, stop_tokens
from tars.models.loading import load_tokenizer, read_config, require_architecture
from tars.models.qwen2_audio import default_cache_dir, encoder_fingerprint

PREPROCESSOR_FILE = "preprocessor_config.json"
#: The processor window of released checkpoints (their preprocessor_config.json), used when a folder
#: has none.
DEFAULT_WINDOW_S = 300
#: Qwen2.5-Omni's chat template reduced to what it writes for string contents (the fallback when a
#: folder has no template).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def thinker_parts(thinker: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(audio tower, text decoder) of a `Qwen2_5OmniThinkerForConditionalGeneration`, in either module
    layout: from transformers 5.21 both sit in `thinker.model` (`audio_tower`, `language_model`); before,
    the tower sits on the thinker itself and `thinker.model` is the text decoder. The saved weights are
    named alike in both (`audio_tower.*`, `model.*`), so a folder loads under either."""
    inner = thinker.model
    if hasattr(inner, "language_model"):
        return inner.audio_tower, inner.language_model
    return thinker.audio_tower, inner


class Qwen25OmniBackend(Backend):
    #: The folder's preprocessor_config.json, written back by `save_pretrained` (None: there was none).
    preprocessor: dict | None = None

    def __init__(self, model: nn.Module, tokenizer, cache: AudioCache | None = None,
                 window_s: float = DEFAULT_WINDOW_S, name: str = "qwen2.5-omni"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        enc = thinker_parts(model)[0]
        self.n_mels = enc.config.num_mel_bins
        self.max_audio_s = float(window_s)
        self.cache = cache or AudioCache(f"{name}-enc")
        wrap = [tokenizer.convert_ids_to_tokens(int(i)) for i in (cfg.audio_start_token_id, cfg.audio_end_token_id)]
        if any(w is None for w in wrap):
            raise UserError(f"{name}: the tokenizer lacks the audio start/end tokens the config names "
                            f"(ids {cfg.audio_start_token_id}, {cfg.audio_end_token_id})")
        self._wrap = (wrap[0], wrap[1])
        self.stop_token_ids = stop_tokens(tokenizer, ("<|im_end|>", "<|endoftext|>"))

    # ---- modules ---------------------------------------------------------------------------------
    def decoder(self) -> nn.Module:
        return thinker_parts(self.model)[1]

    def decoder_layers(self) -> nn.ModuleList:
        return thinker_parts(self.model)[1].layers

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def projector(self) -> nn.Module:
        """The audio tower's output head (`ln_post` → `proj`), shared with the model, not a copy."""
        enc = thinker_parts(self.model)[0]
        return nn.Sequential(enc.ln_post, enc.proj)

    def audio_wrap(self) -> tuple[str, str]:
        return self._wrap

    def positions(self, position_ids: Tensor) -> Tensor:
        """[B, T] → [3, B, T]: the same positions for the three M-RoPE sections (audio/text prompts)."""
        return position_ids.unsqueeze(0).expand(3, *position_ids.shape)

    # ---- audio ----------------------------------------------------------------------------------
    def n_audio_tokens(self, n_samples: int) -> int:
        """Audio tokens of a clip of `n_samples` (16 kHz): what the processor writes and the tower emits."""
        frames = math.ceil(n_samples / HOP_LENGTH)
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1

    @torch.no_grad()
    def _encode(self, paths: list[Path]) -> list[Tensor]:
        enc = thinker_parts(self.model)[0]
        feats, lengths = [], []
        for p in paths:
            wav = self.load_clip(p)
            if self.n_audio_tokens(len(wav)) < 1:
                raise UserError(f"{p}: audio is {len(wav)} samples, too short for the encoder (at least 321)")
            frames = math.ceil(len(wav) / HOP_LENGTH)
            feats.append(log_mel(wav, n_mels=self.n_mels, pad_to_s=self.max_audio_s)[:, :frames])
            lengths.append(frames)
        x = torch.cat(feats, 1).to(device=self.device, dtype=enc.conv1.weight.dtype)
        lens = torch.tensor(lengths, device=x.device)
        pooled: list[Tensor] = []
        handle = enc.ln_post.register_forward_pre_hook(lambda _m, args: pooled.append(args[0]))
        try:
            enc(x, feature_lens=lens)
        finally:
            handle.remove()
        _, out_len = enc._get_feat_extract_output_lengths(lens)
        return [h.float() for h in pooled[0].split(out_len.tolist(), 0)]

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, cache_dir: Path | None = None) -> "Qwen25OmniBackend":
        from safetensors import SafetensorError
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        path = Path(path)
        config = read_config(path)
        require_architecture(path, config, "qwen2_5_omni", "qwen2_5_omni_thinker")
        tokenizer = load_tokenizer(path)
        try:
            model, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
                str(path), dtype=dtype, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise UserError(f"{path}: could not load the weights ({str(e).splitlines()[0][:200]})") from None
        missing = sorted(info["missing_keys"])
        if missing:
            raise UserError(f"{path}: weights do not match the config ({len(missing)} missing, e.g. {missing[0]})")
        window, preprocessor = _audio_window(path, model.config.audio_config.num_mel_bins)
        _ensure_chat_template(tokenizer, path)
        model.to(device=device, dtype=dtype).eval()
        enc = thinker_parts(model)[0]
        # The cache holds the frozen part's output, so only that part names it: a retrained projector
        # (ln_post, proj) reuses the cached clips.
        frozen = nn.ModuleList([enc.conv1, enc.conv2, enc.layers])
        cache = AudioCache(f"omni-enc-{encoder_fingerprint(frozen)}",
                           cache_dir if cache_dir is not None else default_cache_dir())
        backend = cls(model, tokenizer, cache, window, name=path.name)
        backend.preprocessor = preprocessor
        return backend

    def save_pretrained(self, path: str | Path) -> None:
        """Save the thinker + tokenizer + the processor config (its audio window), atomically."""
        from transformers import WhisperFeatureExtractor

        from tars.atomic import atomic_dir

        with atomic_dir(Path(path)) as tmp:
            self.model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            if self.preprocessor is not None:
                (tmp / PREPROCESSOR_FILE).write_text(json.dumps(self.preprocessor, indent=2))
            else:
                window = int(self.max_audio_s) if float(self.max_audio_s).is_integer() else self.max_audio_s
                WhisperFeatureExtractor(feature_size=self.n_mels, chunk_length=window).save_pretrained(str(tmp))


def _audio_window(path: Path, n_mels: int) -> tuple[float, dict | None]:
    """The processor's audio window in seconds and the folder's preprocessor_config.json, after
    checking that its framing is the one `log_mel` computes."""
    file = path / PREPROCESSOR_FILE
    if not file.exists():
        return float(DEFAULT_WINDOW_S), None
    try:
        pre = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    expected = {"feature_size": n_mels, "sampling_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH, "n_fft": N_FFT}
    bad = {k: pre[k] for k, v in expected.items() if k in pre and pre[k] != v}
    if bad or float(pre.get("dither", 0.0) or 0.0) != 0.0:
        raise UserError(f"{file}: audio features {bad or {'dither': pre.get('dither')}} differ from the "
                        f"Whisper framing tars computes ({expected}, no dither)")
    return float(pre.get("chunk_length", DEFAULT_WINDOW_S)), pre


def _ensure_chat_template(tokenizer, path: Path) -> None:
    """A processor folder may keep the chat template beside the processor (chat_template.json) rather
    than in the tokenizer's files; for the string contents tars sends, Omni's template writes plain
    ChatML, the fallback when there is no template at all."""
    if getattr(tokenizer, "chat_template", None):
        return
    file = path / "chat_template.json"
    if file.exists():
        try:
            tokenizer.chat_template = json.loads(file.read_text())["chat_template"]
            return
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{file}: expected {{\"chat_template\": ...}} ({e})") from None
    tokenizer.chat_template = CHATML
