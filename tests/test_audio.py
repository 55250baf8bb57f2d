"""Audio loading: any wav/flac/ogg to 16 kHz mono float32; stereo and 44.1 kHz converted, not refused."""

import numpy as np
import pytest
import soundfile as sf

from conftest import tone, write_wav
from tars.data.audio import check_audio, load_audio
from tars.errors import UserError


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_formats_load_to_16k_mono(tmp_path, fmt, subtype):
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(str(path), tone(1.0, 16000), 16000, format=fmt, subtype=subtype)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1 and abs(len(x) - 16000) <= 1


def test_stereo_44k_is_averaged_and_resampled(tmp_path):
    left = tone(0.5, 44100, freq=300.0)
    right = np.zeros_like(left)
    sf.write(str(tmp_path / "s.wav"), np.stack([left, right], 1), 44100, subtype="FLOAT")
    x = load_audio(tmp_path / "s.wav")
    assert len(x) == 8000
    # Averaging halves the amplitude of a one-sided tone: peak ~0.15, not 0.3.
    assert 0.13 < np.abs(x[100:-100]).max() < 0.17


def test_resampled_tone_keeps_its_pitch(tmp_path):
    sf.write(str(tmp_path / "t.wav"), tone(1.0, 22050, freq=1000.0), 22050, subtype="FLOAT")
    x = load_audio(tmp_path / "t.wav")
    spec = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spec) * 16000 / len(x) - 1000.0) < 2.0


def test_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.wav: audio file not found"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF nonsense")
    with pytest.raises(UserError, match="bad.wav: not a readable audio file"):
        load_audio(tmp_path / "bad.wav")
    sf.write(str(tmp_path / "zero.wav"), np.zeros(0, np.float32), 16000)
    with pytest.raises(UserError, match="zero.wav: audio is empty"):
        load_audio(tmp_path / "zero.wav")
    with pytest.raises(UserError, match="empty"):
        check_audio(tmp_path / "zero.wav")
    write_wav(tmp_path / "long.wav", 2.0)
    with pytest.raises(UserError, match="over the 1.5 s limit"):
        check_audio(tmp_path / "long.wav", max_s=1.5)
    assert check_audio(tmp_path / "long.wav", max_s=None).duration_s == 2.0
