"""Log-mel features: equal to WhisperFeatureExtractor (80 and 128 bins), batch == single, unpadded mode."""

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from tars.data.features import _fill, log_mel, log_mel_batch, slaney_mel_filter_bank

SR = 16000
TOL = 1e-4


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise bursts of syllable length with pauses: loud and silent frames, like speech."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    x = rng.standard_normal(n) * 0.1
    gate = np.repeat(rng.random(n // 2400 + 1) < 0.6, 2400)[:n]
    return (x * gate).astype(np.float32)


def silence_tone(seconds: float = 4.0) -> np.ndarray:
    """1 s of digital silence then a pure tone: the widest dynamic range, where the floor matters."""
    t = np.arange(int((seconds - 1) * SR)) / SR
    return np.concatenate([np.zeros(SR), 0.3 * np.sin(2 * np.pi * 440 * t)]).astype(np.float32)


SIGNALS = {
    "speech_like_7s": lambda: speech_like(7.0, 1),
    "silence_tone": silence_tone,
    "exactly_30s": lambda: speech_like(30.0, 2),
    "longer_31s": lambda: speech_like(31.3, 3),
    "short_0.1s": lambda: speech_like(0.1, 4),
    "all_zeros_2s": lambda: np.zeros(2 * SR, np.float32),
}


@pytest.fixture(scope="module", params=[80, 128])
def extractor(request) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=request.param)


def reference(fe: WhisperFeatureExtractor, x: np.ndarray, **kw) -> np.ndarray:
    return fe(x, sampling_rate=SR, return_tensors="np", **kw)["input_features"][0]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filter_bank_matches_transformers(n_mels):
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                          max_frequency=8000.0, sampling_rate=SR, norm="slaney", mel_scale="slaney")
    ours = slaney_mel_filter_bank(n_mels)
    assert ours.shape == (201, n_mels)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert np.array_equal(ours.astype(np.float32), ref.astype(np.float32))


@pytest.mark.parametrize("name", list(SIGNALS))
def test_padded_equals_extractor(extractor, name):
    x = SIGNALS[name]()
    ref = reference(extractor, x)
    ours = log_mel(x, extractor.feature_size)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape == (extractor.feature_size, 3000)
    assert np.abs(ours.numpy() - ref).max() <= TOL


def float64_features(x: np.ndarray, fe: WhisperFeatureExtractor) -> np.ndarray:
    """The extractor's maths end to end in float64 (its NumPy path still stores the FFT as complex64)."""
    padded = np.zeros(30 * SR)
    padded[: min(len(x), 30 * SR)] = x[: 30 * SR]
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(padded, 200, mode="reflect"), 400)[::160]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    power = np.abs(np.fft.rfft(frames * hann, axis=1)) ** 2
    log = np.log10(np.maximum(power[:-1] @ fe.mel_filters, 1e-10)).T
    return (np.maximum(log, log.max() - 8.0) + 4.0) / 4.0


@pytest.mark.parametrize("name", ["silence_tone", "speech_like_7s", "exactly_30s"])
def test_float32_is_within_tolerance_of_float64(extractor, name):
    """float32 is enough: its STFT round-off shows only just above the max - 8 floor, under 1e-4."""
    x = SIGNALS[name]()
    assert np.abs(log_mel(x, extractor.feature_size).numpy() - float64_features(x, extractor)).max() <= TOL


def test_input_types_agree():
    x = speech_like(2.0, 6)
    base = log_mel(x)
    assert torch.equal(log_mel(torch.from_numpy(x)), base)
    assert torch.equal(log_mel(x.astype(np.float64)), base)  # rounded to float32 first, like the extractor


@pytest.mark.parametrize("pad_to_s", [30.0, None])
def test_batch_equals_single(pad_to_s):
    clips = [speech_like(s, i) for i, s in enumerate([3.2, 0.1, 9.75, 31.0])]
    batch = log_mel_batch(clips, 128, pad_to_s)
    assert batch.n_frames.tolist() == [min(len(c), 480000 if pad_to_s else len(c)) // 160 for c in clips]
    for row, clip, n in zip(batch.features, clips, batch.n_frames.tolist()):
        single = log_mel(clip, 128, pad_to_s)
        assert torch.equal(row[:, : single.shape[1]], single)
        if pad_to_s is None:  # the rest of the row is this clip's silence tail: its padded frames
            longest = batch.features.shape[2]
            padded = log_mel(np.concatenate([clip, np.zeros(longest * 160 + 400, np.float32)]), 128, None)
            assert torch.equal(row, padded[:, :longest]) and n == single.shape[1]


@pytest.mark.parametrize("pad", [480000, None])
def test_joint_stft_kernel_equals_per_clip(pad):
    """The one-STFT path that accelerators take (CPU loops per clip), run here on CPU."""
    clips = [torch.from_numpy(speech_like(s, 20 + i))[:pad] for i, s in enumerate([2.0, 0.1, 6.5, 30.5])]
    frames = 3000 if pad else max(len(c) for c in clips) // 160
    joint = torch.empty(len(clips), 80, frames)
    _fill(joint, clips, pad)
    single = log_mel_batch(clips, 80, 30.0 if pad else None).features
    assert (joint - single).abs().max() <= 1e-6


def test_batch_matches_extractor_batch():
    fe = WhisperFeatureExtractor(feature_size=80)
    clips = [speech_like(s, 10 + i) for i, s in enumerate([4.0, 12.5, 0.3])]
    ref = fe(clips, sampling_rate=SR, return_tensors="np")["input_features"]
    assert np.abs(log_mel_batch(clips, 80).features.numpy() - ref).max() <= TOL


@pytest.mark.parametrize("n", [1600, 1601, 160000, 160123, 30 * SR - 201])
def test_unpadded_is_prefix_of_padded(n):
    x = speech_like(n / SR, 7)[:n]
    unpadded = log_mel(x, 80, pad_to_s=None)
    assert tuple(unpadded.shape) == (80, n // 160)
    assert torch.equal(unpadded, log_mel(x, 80)[:, : n // 160])


def test_unpadded_floor_counts_tail_frames():
    """A click in the last 30 samples peaks in a frame past len // 160: the floor still uses it."""
    x = speech_like(10.0, 8) * 0.1
    x[-30:] = 0.9
    padded = log_mel(x, 80)
    unpadded = log_mel(x, 80, pad_to_s=None)
    assert padded[:, 1000:].max() > unpadded.max()  # the maximum sits in an unreturned tail frame
    assert torch.equal(unpadded, padded[:, :1000])


@pytest.mark.parametrize("n", [160000, 160050, 1600])
def test_unpadded_vs_extractor_do_not_pad(n):
    """Same frame count; only the last frame may differ, and only when its window passes the end."""
    fe = WhisperFeatureExtractor(feature_size=80)
    x = speech_like(n / SR, 9)[:n]
    ref = reference(fe, x, padding="do_not_pad")
    ours = log_mel(x, 80, pad_to_s=None).numpy()
    assert ours.shape == ref.shape == (80, n // 160)
    assert np.abs(ours[:, :-1] - ref[:, :-1]).max() <= TOL
    assert (np.abs(ours[:, -1] - ref[:, -1]).max() <= TOL) == (n % 160 >= 40)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="1-D"):
        log_mel(np.zeros((2, 1600), np.float32))
    with pytest.raises(ValueError, match="at least one"):
        log_mel_batch([])
