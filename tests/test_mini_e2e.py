"""End to end on the real mini model: build → short SFT → short alignment (both designs) → eval on 20 items;
and `tars demo` on the shipped packs and adapter.

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


def test_demo_on_the_shipped_packs_and_adapter(tmp_path):
    """`tars demo` itself, small: the shipped packs unpacked onto a fresh build, the shipped adapter
    copied, 4 questions, 1 live step."""
    out = tmp_path / "demo"
    r = run_cli("demo", f"out={out}", "questions=4", "steps=1", "questions_per_step=1", "rollouts=2",
                "max_new_tokens=48", "eval_max_new_tokens=64")
    assert r.returncode == 0, r.stderr
    assert "done:" in r.stdout and str(out / "report" / "report.md") in r.stdout
    for png in ("training_tars.png", "layers_layers.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for folder in ("base", "tars_adapter"):
        d = json.loads((out / folder / "metrics.json").read_text())["datasets"]["heldout"]
        assert d["speech"]["n"] == 4 and d["text"]["n"] == 4
    import os

    home = Path(os.environ["TARS_HOME"]) / "mini"
    assert (home / "demo" / "PACK").exists() and (home / "soft" / "PACK").exists()  # unpacked once, stamped
    assert (home / "soft-tars" / "SHIPPED").exists()


def test_training_is_reproducible_whatever_the_caches_hold(tmp_path):
    """Two fresh `tars train` runs of configs/mini.yaml with one seed: the first builds the model,
    synthesises the speech and fills the encoder cache, the second finds all of it; a third runs with
    the encoder cache emptied. Their step-1 metrics (every reward, per modality) and the trained LoRA
    must be identical, bit for bit."""
    import os
    import shutil

    import torch
    from safetensors.torch import load_file

    def train(name):
        out = tmp_path / name
        r = run_cli("train", "--config", "configs/mini.yaml", "steps=1", "max_new_tokens=48", f"out={out}")
        assert r.returncode == 0, r.stderr
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        return ({k: v for k, v in row.items() if not k.startswith("time")},
                load_file(str(out / "adapter" / "adapter_model.safetensors")))

    cold, warm = train("cold"), train("warm")
    shutil.rmtree(Path(os.environ["TARS_HOME"]) / "cache" / "encoder")
    again = train("encoder_cold")
    for other in (warm, again):
        assert other[0] == cold[0]
        assert other[1].keys() == cold[1].keys()
        assert all(torch.equal(other[1][k], cold[1][k]) for k in cold[1])


def test_a_tars_step_runs_the_real_reward_path_on_the_mini_model(tmp_path):
    """One TARS step on the real mini model with nothing replaced: rollouts decoded by the model,
    R_acc from `extract_choice`, R_fmt from `format_score`, R_rep from the step's own pooled states,
    R_beh from the packaged sentence embedder. Each reward is checked against what the public reward
    functions give for the same completions, and the alignment terms against their definition."""
    import torch

    from tars.config import validate
    from tars.data.sources import load_data
    from tars.rewards import extract_choice
    from tars.rewards.format import format_score
    from tars.rl.tars import TarsConfig, TarsTrainer

    cfg = validate(TarsConfig, dict(model="mini:demo", out=str(tmp_path / "run"), method="tars", steps=1,
                                    data={"families": ["arithmetic", "comparison"], "n": 3, "seed": 11},
                                    questions_per_step=3, speech_rollouts=4, text_rollouts=4,
                                    max_new_tokens=160, lr=1e-4, seed=0))
    records, base_dir = load_data(cfg.data, "speech")
    tr = TarsTrainer(cfg, 1)
    row = tr.step(records, base_dir, 0)
    rec = tr.last
    G = 4
    with_reference = 0
    for q, r in enumerate(records):
        for texts, base in ((rec.speech_texts, rec.speech_base), (rec.text_texts, rec.text_base)):
            for g in range(G):
                t = texts[q * G + g]
                want = float(extract_choice(t, r.options) == r.answer) + 0.5 * format_score(t, "binary")
                assert base[q, g].item() == want, t
        correct = [extract_choice(t, r.options) == r.answer for t in rec.text_texts[q * G:(q + 1) * G]]
        if any(correct):
            with_reference += 1
            assert ((rec.rep[q] > 0) & (rec.rep[q] <= 1 + 1e-5)).all()
            assert ((rec.beh[q] > -1) & (rec.beh[q] <= 1 + 1e-5)).all() and rec.beh[q].any()
        else:
            assert not rec.rep[q].any() and not rec.beh[q].any()
    assert with_reference > 0, "no question had a correct text rollout: nothing to align to"
    torch.testing.assert_close(rec.speech_reward, rec.speech_base + rec.rep + rec.beh)
    torch.testing.assert_close(rec.text_term, (rec.rep + rec.beh).mean(1))
    torch.testing.assert_close(rec.speech_adv, rec.speech_reward - rec.speech_reward.mean(1, keepdim=True))
    assert row["grad_norm"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
