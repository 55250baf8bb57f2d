"""Output is tars's own lines and bars: no DeepSpeed CPU warning, no transformers load / save bars, from
the `tars` command and from tars's Python functions alike (tars.quiet)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, good_row, run_cli, write_jsonl
from tiny_models import tiny_qwen2_audio

NOISE = ("Loading weights", "Writing model shards", "Setting accelerator", "[WARNING]")
GPU_LESS = not any(os.path.exists(d) for d in ("/dev/nvidiactl", "/dev/kfd"))


def python(code: str, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    for key in ("DS_ACCELERATOR", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        env.pop(key, None)  # as a user's fresh shell has them
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_qwen2_audio(tmp_path_factory.mktemp("tiny") / "m")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None or not GPU_LESS,
                    reason="needs DeepSpeed installed on a machine without a GPU driver")
def test_importing_tars_spares_deepspeed_s_cpu_warning():
    # accelerate imports DeepSpeed on every save_pretrained; DeepSpeed then guesses its accelerator aloud.
    bare = python("import deepspeed")
    assert "Setting accelerator" in bare.stdout + bare.stderr  # the warning tars prevents (on stdout)
    res = python("import tars, deepspeed")
    assert res.returncode == 0 and "Setting accelerator" not in res.stdout + res.stderr, res.stdout


def test_load_backend_draws_no_transformers_bar_and_restores_them(model):
    res = python("from transformers.utils import logging as l\n"
                 "from huggingface_hub import utils as h\n"
                 "from tars.models.loading import load_backend\n"
                 f"load_backend({str(model)!r})\n"
                 "print(l.is_progress_bar_enabled(), h.are_progress_bars_disabled())")
    assert res.returncode == 0, res.stderr
    assert not any(n in res.stderr + res.stdout for n in NOISE), res.stderr
    assert res.stdout.split() == ["True", "False"]  # the caller's own loads still draw their bars


def test_progress_bars_stay_off_where_they_were_off():
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from tars.quiet import hf_progress_off

    on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with hf_progress_off():
            assert not hf_logging.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
    finally:
        if on:
            hf_logging.enable_progress_bar()


def test_a_training_run_that_saves_its_model_prints_no_library_noise(tmp_path, model):
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "ok.wav", np.zeros(8000, dtype=np.float32), 16000)
    m = write_jsonl(tmp_path / "manifest.jsonl", [good_row(0, audio="audio/ok.wav")])
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "HF_HUB_DISABLE_PROGRESS_BARS")}
    res = run_cli("train", "--config", "configs/mini.yaml", f"model={model}", f"out={tmp_path / 'run'}",
                  f"data.file={m}", "steps=1", "questions_per_step=1", "max_new_tokens=4", "method=grpo", env=env)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "model" / "config.json").exists()  # save_pretrained ran (DeepSpeed imported)
    assert not any(n in res.stderr + res.stdout for n in NOISE), res.stderr
