"""`tars speak`: real espeak-ng synthesis, content-addressed cache, resume after a kill."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from conftest import good_row, needs_espeak, run_cli, write_jsonl
from tars.data.jsonl import read_records
from tars.data.schema import Record
from tars.data.speech import EspeakEngine, clip_key, plan_jobs, speak
from tars.errors import UserError


def records(n):
    return [Record(id=f"q{i}", question=f"What is {i} plus {i + 1}?", options=[str(2 * i + 1), str(2 * i), "7", "9"],
                   answer="A") for i in range(n)]


def test_missing_espeak_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="espeak-ng not found on PATH: install it with `apt-get install espeak-ng`"):
        EspeakEngine()


@needs_espeak
def test_voices_are_seeded_per_item_and_keys_depend_on_voice_and_text():
    eng = EspeakEngine()
    a = plan_jobs(records(20), eng, seed=0)
    b = plan_jobs(records(25), eng, seed=0)
    c = plan_jobs(records(20), eng, seed=1)
    assert [j.voice for j in a] == [j.voice for j in b[:20]]  # adding items never re-voices the others
    assert [j.voice for j in a] != [j.voice for j in c]
    assert len({j.voice.name for j in a}) > 5
    assert len({j.key for j in a}) == 20
    assert clip_key(eng, a[0].voice, "x") != clip_key(eng, a[0].voice, "y")


@needs_espeak
def test_speak_writes_16k_mono_wavs_and_a_valid_manifest(tmp_path):
    manifest, counts = speak(records(4), tmp_path / "out", EspeakEngine(), seed=0, workers=2)
    assert counts == {"synthesized": 4, "cached": 0}
    recs = read_records(tmp_path / "out" / "manifest.jsonl", check_audio_files=True)
    assert [r.id for r in recs] == ["q0", "q1", "q2", "q3"]
    for r in recs:
        info = sf.info(str(tmp_path / "out" / r.audio))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert abs(info.duration - r.duration_s) < 1e-3 and r.duration_s > 1.0
        assert r.voice.startswith("espeak-ng:en")
        x, _ = sf.read(str(tmp_path / "out" / r.audio))
        assert np.abs(x).max() > 0.05  # real speech, not silence


@needs_espeak
def test_shared_cache_serves_other_output_folders(tmp_path):
    cache = tmp_path / "cache"
    eng = EspeakEngine()
    speak(records(3), tmp_path / "a", eng, cache_dir=cache)
    _, counts = speak(records(3), tmp_path / "b", eng, cache_dir=cache)
    assert counts == {"synthesized": 0, "cached": 3}
    _, counts = speak(records(3), tmp_path / "c", eng, seed=5, cache_dir=cache)  # other voices: new clips
    assert counts["synthesized"] == 3


@needs_espeak
def test_cli_speak_rerun_comes_from_cache(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", [good_row(i) for i in range(3)])
    first = run_cli("speak", src, "--out", tmp_path / "o")
    assert first.returncode == 0, first.stderr
    assert "3 synthesized, 0 from cache" in first.stdout
    again = run_cli("speak", src, "--out", tmp_path / "o")
    assert "0 synthesized, 3 from cache" in again.stdout


@needs_espeak
def test_killed_speak_resumes_without_redoing_finished_clips(tmp_path):
    # 120 questions take a few seconds with one worker: kill once some clips are on disk.
    rows = [good_row(i, question=f"Question number {i}: which number is the largest of these four?")
            for i in range(120)]
    src = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "o"
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "tars.cli", "speak", str(src), "--out", str(out),
                             "--workers", "1", "--no-cache"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        done = list((out / "audio").glob("*.wav")) if (out / "audio").exists() else []
        if len(done) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "audio").glob("*.wav")}
    assert 10 <= len(finished) < 120, "the run must be killed half-way for this test to mean anything"
    assert not (out / "manifest.jsonl").exists()
    res = run_cli("speak", src, "--out", out, "--no-cache")
    assert res.returncode == 0, res.stderr
    assert f"{120 - len(finished)} synthesized, {len(finished)} from cache" in res.stdout
    for name, mtime in finished.items():
        assert (out / "audio" / name).stat().st_mtime_ns == mtime  # never rewritten
    assert len(read_records(out / "manifest.jsonl", check_audio_files=True)) == 120
    assert not list((out / "audio").glob(".*")), "temp files of the killed run are cleaned up"


def test_piper_engine_missing_is_a_clear_error():
    import importlib.util
    if importlib.util.find_spec("piper") is not None:
        pytest.skip("piper is installed here")
    with pytest.raises(UserError, match=r"piper is not installed: `pip install 'tars\[piper\]'`"):
        from tars.data.speech import make_engine
        make_engine("piper")


@pytest.mark.skipif(__import__("importlib").util.find_spec("piper") is None, reason="optional piper not installed")
def test_piper_engine_speaks(tmp_path):
    from tars.data.speech import PiperEngine
    _, counts = speak(records(2), tmp_path / "o", PiperEngine())
    assert counts["synthesized"] == 2
    assert len(read_records(tmp_path / "o" / "manifest.jsonl", check_audio_files=True)) == 2


def test_unknown_engine():
    from tars.data.speech import make_engine
    with pytest.raises(UserError, match="unknown speech engine 'festival'"):
        make_engine("festival")
