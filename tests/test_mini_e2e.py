"""End to end on the real mini model: build → short SFT → short alignment (both designs) → eval on 20 items;
and `tars demo` on the shipped pack.

Marked `slow` (several minutes on 2 cores): run with `pytest -m slow`.
"""

import json
from pathlib import Path

import pytest

from conftest import needs_espeak, run_cli

pytestmark = [pytest.mark.slow, needs_espeak]


def test_build_train_align_eval(tmp_path):
    r = run_cli("mini", "build")
    assert r.returncode == 0, r.stderr
    again = run_cli("mini", "build")
    assert "mini model ready" in again.stdout  # cached: no reconversion
    # The assembled encoder is Whisper tiny.en's (whose own decoder transcribes speech: test_convert.py),
    # and the LLM is the GGUF's SmolLM2 (logits equal: test_convert.py), weight for weight.
    import torch

    from tars.models.convert.gguf_llama import load_llama
    from tars.models.convert.whisper_ct2 import load_whisper
    from tars.models.loading import load_backend

    mini = load_backend("mini:base")
    whisper, _ = load_whisper()
    for k, v in whisper.model.encoder.state_dict().items():
        assert torch.equal(mini.model.model.audio_tower.state_dict()[k], v), k
    llm, _ = load_llama()
    dec = mini.decoder().state_dict()
    for k, v in llm.model.state_dict().items():
        if k == "embed_tokens.weight":  # three audio tokens were appended
            assert torch.equal(dec[k][: v.shape[0]], v)
        else:
            assert torch.equal(dec[k], v), k
    r = run_cli("mini", "sft", "--config", "configs/mini_sft.yaml", "max_steps=3", "data.n=24",
                f"out={tmp_path / 'sft'}")
    assert r.returncode == 0, r.stderr
    r = run_cli("mini", "align", "--config", "configs/mini_align.yaml", f"model={tmp_path / 'sft' / 'model'}",
                "max_steps=2", "data.n=16", "batch_size=4", f"out={tmp_path / 'aligned'}")
    assert r.returncode == 0, r.stderr
    r = run_cli("mini", "ctc", "--config", "configs/mini_ctc.yaml", f"model={tmp_path / 'sft' / 'model'}",
                "data.file=null", "data.n=24", "val_n=4", "max_steps=3", "save_every=2", f"out={tmp_path / 'ctc'}")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in (tmp_path / "ctc" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "val_token_error" in rows[-1]
    heldout = tmp_path / "heldout.jsonl"
    r = run_cli("data", "make", "--family", "all", "--n", "20", "--seed", "1000", "--out", heldout)
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", "--model", tmp_path / "ctc" / "model", "--data", heldout, "--out", tmp_path / "eval",
                "--max-new-tokens", "48")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    d = m["datasets"]["heldout"]
    assert d["speech"]["n"] == 20 and d["text"]["n"] == 20
    assert 0.0 <= d["speech"]["accuracy"] <= 100.0 and "gap" in d


def test_demo_on_the_shipped_pack(tmp_path):
    """`tars demo` itself, small: the shipped pack unpacked onto a fresh build, 4 questions, 1 step."""
    out = tmp_path / "demo"
    r = run_cli("demo", f"out={out}", "questions=4", "steps=1", "questions_per_step=1", "rollouts=2",
                "max_new_tokens=48", "eval_max_new_tokens=64")
    assert r.returncode == 0, r.stderr
    assert "done:" in r.stdout and str(out / "report" / "report.md") in r.stdout
    for png in ("training_tars.png", "layers_layers.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = json.loads((out / "before" / "metrics.json").read_text())["datasets"]["heldout"]
    assert before["speech"]["n"] == 4 and before["text"]["n"] == 4
    import os

    assert (Path(os.environ["TARS_HOME"]) / "mini" / "demo" / "PACK").exists()  # unpacked once, stamped
