"""Time `tars.data.features` against `transformers.WhisperFeatureExtractor` on the same clips.

Why a harness: the speedup claim (and the 1e-4 equality it rests on) has to be re-checkable in one run
on whatever machine the features are computed on. It builds `--n` deterministic clips of 3-15 s (real
synthetic speech from espeak-ng when it is on PATH, else speech-like harmonic/noise signals), then for
80 and 128 mel bins times, best of `--repeat` passes over all clips:

* per clip: the extractor padded to 30 s (as Qwen2-Audio feeds it) vs `log_mel(..., pad_to_s=30)`,
  and `log_mel(..., pad_to_s=None)` (unpadded);
* batched in chunks of `--batch`: the extractor on a list vs `log_mel_batch`.

It prints the max |difference| of our padded features from the extractor's over every clip, and checks
that the unpadded features are the padded ones' first `len // 160` frames. The headline speedup is the
per-clip one (how dataset preprocessing calls it).

    .venv/bin/python benchmarks/logmel.py [--n 100] [--repeat 3] [--batch 16] [--source auto]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tars.data.audio import SAMPLE_RATE, load_audio
from tars.data.features import log_mel, log_mel_batch

_WORDS = (
    "the a river mountain quickly seven students answered question about energy because light travels "
    "faster than sound when storms arrive over distant hills and farmers count seconds between flash "
    "thunder which number is larger forty two or thirty nine please choose option before evening "
    "market opens bread costs three coins while apples cost two how many remain after selling half"
).split()


def _fit(x: np.ndarray, n: int, gap: int) -> np.ndarray:
    """Repeat `x` with `gap` samples of silence between copies, then cut to exactly `n` samples."""
    if len(x) == 0:
        return np.zeros(n, np.float32)
    unit = np.concatenate([x, np.zeros(gap, np.float32)])
    reps = -(-n // len(unit))
    return np.tile(unit, reps)[:n].astype(np.float32)


def espeak_clips(n: int, seed: int) -> list[np.ndarray]:
    """Real (synthetic-voice) speech of 3-15 s: espeak-ng to temp wavs, loaded like user audio."""
    rng = np.random.default_rng(seed)
    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            dur = rng.uniform(3.0, 15.0)
            words = rng.choice(_WORDS, size=max(4, int(dur * 3.2))).tolist()
            wav = Path(tmp) / f"c{i}.wav"
            subprocess.run(
                ["espeak-ng", "-w", str(wav), "-s", str(int(rng.integers(140, 200))),
                 "-p", str(int(rng.integers(20, 80))), " ".join(words)],
                check=True, capture_output=True,
            )
            clips.append(_fit(load_audio(wav), int(dur * SAMPLE_RATE), gap=SAMPLE_RATE // 4))
    return clips


def synthetic_clips(n: int, seed: int) -> list[np.ndarray]:
    """Speech-like signals of 3-15 s: voiced syllables (harmonics through formant bumps, gliding f0),
    fricative noise bursts and pauses, so spectra and the dynamic-range floor behave like speech."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        total = int(rng.uniform(3.0, 15.0) * SAMPLE_RATE)
        parts: list[np.ndarray] = []
        size = 0
        while size < total:
            kind = rng.choice(3, p=[0.6, 0.25, 0.15])
            m = int(rng.uniform(0.08, 0.3) * SAMPLE_RATE)
            t = np.arange(m) / SAMPLE_RATE
            env = np.sin(np.pi * np.arange(m) / m) ** 2
            if kind == 0:
                f0 = rng.uniform(90, 250) * (1 + 0.15 * t / t[-1] * rng.choice([-1, 1]))
                phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
                formants = rng.uniform([300, 900, 2200], [900, 2200, 3400])
                seg = np.zeros(m)
                for h in range(1, int(4000 / f0.max())):
                    gain = sum(np.exp(-((h * f0.mean() - f) / 150.0) ** 2) for f in formants) + 0.05
                    seg += gain / h * np.sin(h * phase)
                seg *= 0.3 * env / max(np.abs(seg).max(), 1e-9)
            elif kind == 1:
                seg = rng.standard_normal(m) * 0.05 * env
                seg = np.diff(seg, prepend=0.0)  # high-pass: hiss, not rumble
            else:
                seg = np.zeros(m)
            parts.append(seg)
            size += m
        clips.append(np.concatenate(parts)[:total].astype(np.float32))
    return clips


def float64_features(x: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """The extractor's maths end to end in float64: how much float32 round-off costs us (and it)."""
    padded = np.zeros(30 * SAMPLE_RATE)
    padded[: min(len(x), len(padded))] = x[: len(padded)]
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(padded, 200, mode="reflect"), 400)[::160]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    power = np.abs(np.fft.rfft(frames * hann, axis=1)) ** 2
    log = np.log10(np.maximum(power[:-1] @ filters, 1e-10)).T
    return (np.maximum(log, log.max() - 8.0) + 4.0) / 4.0


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of `repeat` timed calls after one warm-up: least disturbed by the other core's load."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="number of clips (default 100)")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes per variant; best is kept (default 3)")
    ap.add_argument("--batch", type=int, default=16, help="clips per call in the batched comparison (default 16)")
    ap.add_argument("--source", choices=("auto", "espeak", "synthetic"), default="auto",
                    help="clip source: espeak-ng speech if available (auto), or synthesized signals")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import WhisperFeatureExtractor  # import after argparse: --help stays instant

    source = args.source
    if source == "auto":
        source = "espeak" if shutil.which("espeak-ng") else "synthetic"
    t0 = time.perf_counter()
    clips = espeak_clips(args.n, args.seed) if source == "espeak" else synthetic_clips(args.n, args.seed)
    secs = [len(c) / SAMPLE_RATE for c in clips]
    print(f"{len(clips)} {source} clips, {min(secs):.1f}-{max(secs):.1f} s (total {sum(secs):.0f} s), "
          f"built in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")
    chunks = [clips[i: i + args.batch] for i in range(0, len(clips), args.batch)]

    speedups: dict[int, float] = {}
    worst = 0.0
    print(f"{'bins':>4} {'variant':<30} {'total ms':>9} {'ms/clip':>8} {'vs extractor':>12}")
    for n_mels in (80, 128):
        fe = WhisperFeatureExtractor(feature_size=n_mels)

        def theirs_single() -> list[np.ndarray]:
            return [fe(c, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][0] for c in clips]

        def theirs_batch() -> list[np.ndarray]:
            return [fe(ch, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"] for ch in chunks]

        def ours_single() -> list[torch.Tensor]:
            return [log_mel(c, n_mels) for c in clips]

        def ours_unpadded() -> list[torch.Tensor]:
            return [log_mel(c, n_mels, pad_to_s=None) for c in clips]

        def ours_batch() -> list[torch.Tensor]:
            return [log_mel_batch(ch, n_mels).features for ch in chunks]

        ref = theirs_single()
        ours = ours_single()
        unpadded = ours_unpadded()
        diff = max(float(np.abs(o.numpy() - r).max()) for o, r in zip(ours, ref))
        batch_diff = max(float(np.abs(o.numpy() - r).max()) for o, r in zip(ours_batch(), theirs_batch()))
        prefix_diff = max(float((u - o[:, : u.shape[1]]).abs().max()) for u, o in zip(unpadded, ours))
        f64_diff = max(float(np.abs(o.numpy() - float64_features(c, fe.mel_filters)).max())
                       for o, c in zip(ours, clips))
        ref_f64_diff = max(float(np.abs(r - float64_features(c, fe.mel_filters)).max())
                           for r, c in zip(ref, clips))
        worst = max(worst, diff, batch_diff)

        t_ref = best_of(theirs_single, args.repeat)
        rows = [
            ("extractor, per clip (30 s)", t_ref),
            ("ours log_mel (30 s)", best_of(ours_single, args.repeat)),
            ("ours log_mel (unpadded)", best_of(ours_unpadded, args.repeat)),
        ]
        t_ref_b = best_of(theirs_batch, args.repeat)
        rows_b = [
            (f"extractor, batch {args.batch} (30 s)", t_ref_b),
            ("ours log_mel_batch (30 s)", best_of(ours_batch, args.repeat)),
        ]
        for name, t in rows:
            print(f"{n_mels:>4} {name:<30} {t * 1e3:9.1f} {t * 1e3 / len(clips):8.2f} {t_ref / t:11.2f}×")
        for name, t in rows_b:
            print(f"{n_mels:>4} {name:<30} {t * 1e3:9.1f} {t * 1e3 / len(clips):8.2f} {t_ref_b / t:11.2f}×")
        print(f"{n_mels:>4} max |ours - extractor|: per clip {diff:.3g}, batched {batch_diff:.3g}; "
              f"max |unpadded - padded[:, :len//160]| {prefix_diff:.3g}")
        print(f"{n_mels:>4} max |x - float64 reference|: ours {f64_diff:.3g}, extractor {ref_f64_diff:.3g}")
        speedups[n_mels] = t_ref / rows[1][1]

    print(f"logmel ours vs WhisperFeatureExtractor: speedup 80-bin {speedups[80]:.2f}×, "
          f"128-bin {speedups[128]:.2f}×, max |diff| {worst:.3g}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
