"""Audio in: any wav / flac / ogg file to 16 kHz mono float32.

soundfile + soxr rather than torchaudio (which does not import on CPU-only machines with the pinned
torch) or librosa (numba, ~200 MB, seconds of import). Stereo is averaged and other rates resampled,
never refused: users bring 44.1 kHz stereo recordings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from tars.errors import UserError

SAMPLE_RATE = 16_000
#: Default longest clip accepted by validation: Whisper-style encoders see 30 s windows.
DEFAULT_MAX_AUDIO_S = 30.0


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    frames: int
    channels: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Header-only probe (no decoding); raises `UserError` naming the file when it is not audio."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: audio file not found")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise UserError(f"{path}: not a readable audio file ({_short(e)})") from None
    return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels))


def check_audio(path: str | os.PathLike, max_s: float | None = DEFAULT_MAX_AUDIO_S) -> AudioInfo:
    """`audio_info` plus the limits every consumer relies on: non-empty, not over `max_s` seconds."""
    info = audio_info(path)
    if info.frames == 0:
        raise UserError(f"{path}: audio is empty (0 samples)")
    if max_s is not None and info.duration_s > max_s:
        raise UserError(f"{path}: audio is {info.duration_s:.1f} s long, over the {max_s:g} s limit")
    return info


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode to mono float32 at `sample_rate` (averaging channels, resampling with soxr 'HQ')."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise UserError(f"{path}: not a readable audio file ({_short(e)})") from None
    if data.shape[0] == 0:
        raise UserError(f"{path}: audio is empty (0 samples)")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
