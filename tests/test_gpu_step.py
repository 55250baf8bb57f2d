"""benchmarks/gpu_step.py at tiny size on the CPU (issue 13): the GPU harness's code path — random model
built in place, the real TarsTrainer step, every variant, the HF generate comparison — runs, and what
it prints adds up (phases, token counts, flops, MFU), so a lent GPU's one call is not spent on a bug."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_step.py"
PHASES = ("generate", "score", "rewards", "update")


def run(*args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    return [json.loads(l) for l in lines]  # stdout is JSON lines and nothing else


def check_step(row: dict, setup: dict, Q: int, G: int, n: int) -> None:
    assert set(row["time_s"]) == {*PHASES, "step"}
    assert all(row["time_s"][p] > 0 for p in ("generate", "score", "update"))
    # every completion is exactly n tokens (forced), none truncated
    assert row["rollout_tokens"] == Q * 2 * G * n
    assert row["truncated"] == 0
    # score with grad saw every row once: its prompt (unpadded) + its completion
    prompts = setup["prompt_tokens"]
    assert row["score_completion_tokens"] == row["rollout_tokens"]
    assert row["score_tokens"] == G * (sum(prompts["speech"]) + sum(prompts["text"])) + row["rollout_tokens"]
    assert row["score_tokens_padded"] >= row["score_tokens"]
    p = setup["params"]
    ckpt = "no_checkpointing" not in row["variant"]
    assert row["flop_factor"] == (8 if ckpt else 6)
    assert row["train_flops"] == row["flop_factor"] * p["llm"] * row["score_tokens"]
    assert row["executed_flops"] == ((6 if ckpt else 4) * p["blocks"] * row["score_tokens"]
                                     + 6 * p["lm_head"] * row["score_completion_tokens"])
    seconds = row["time_s"]["score"] + row["time_s"]["update"]
    for key, f in (("mfu", "train_flops"), ("mfu_executed", "executed_flops")):
        assert math.isfinite(row[key]) and row[key] > 0
        assert row[key] == pytest.approx(row[f] / (seconds * setup["peak_tflops"] * 1e12))


def test_one_variant_at_the_recipes_shape_through_a_saved_folder():
    Q, G, n = 8, 4, 5
    rows = run("--steps", "2", "--new-tokens", str(n), "--via-folder")
    kinds = [r["kind"] for r in rows]
    assert kinds == ["setup", "step", "step", "step", "summary", "compare"]
    setup = rows[0]
    assert setup["peak_source"] == "nominal (cpu)" and setup["peak_tflops"] == 1.0
    assert setup["variants"] == ["default"] and setup["via_folder"]
    assert [len(setup["prompt_tokens"][m]) for m in ("speech", "text")] == [Q, Q]
    steps = rows[1:4]
    assert [s["warmup"] for s in steps] == [True, False, False]
    for s in steps:
        check_step(s, setup, Q, G, n)
        assert s["score_calls"] == 2  # text's forward, then speech's: one each, nothing extra
    summary = rows[4]
    assert summary["steps"] == 2 and summary["rollout_tokens"] == Q * 2 * G * n
    assert summary["time_s"]["step"] == pytest.approx(statistics.median(s["time_s"]["step"] for s in steps[1:]))
    assert math.isfinite(summary["mfu"])


def test_every_variant_in_one_process():
    Q, G, n, warm = 2, 2, 5, 3
    variants = "default,no_checkpointing,joint,separate_rollouts,joint+no_checkpointing,static_decode,hf_generate"
    rows = run("--steps", "1", "--questions", str(Q), "--rollouts", str(G), "--new-tokens", str(n),
               "--warmup-new-tokens", str(warm), "--variants", variants, "--embedder", "random")
    setup = rows[0]
    assert setup["kind"] == "setup" and setup["variants"] == variants.split(",")
    assert setup["embedder"] == "random MiniLM-size"  # what a lent machine without the package gets
    assert not [r for r in rows if r["kind"] in ("error", "skipped")]
    training = [v for v in variants.split(",") if v != "hf_generate"]
    for v in training:
        steps = [r for r in rows if r["kind"] == "step" and r["variant"] == v]
        assert [s["warmup"] for s in steps] == [True, False]
        # the first variant warms up at full length, the later ones at --warmup-new-tokens
        assert steps[0]["rollout_tokens"] == Q * 2 * G * (n if v == training[0] else warm)
        check_step(steps[1], setup, Q, G, n)
        (summary,) = [r for r in rows if r["kind"] == "summary" and r["variant"] == v]
        assert summary["flop_factor"] == (6 if "no_checkpointing" in v else 8)
    (hf,) = [r for r in rows if r["kind"] == "hf_generate"]
    assert hf["rows"] == Q * 2 * G and hf["ours_tokens"] == hf["hf_tokens"] == Q * 2 * G * n
    assert hf["speedup"] == pytest.approx(hf["hf_s"] / hf["ours_s"]) and hf["met"] == (hf["speedup"] >= 4)
    compare = rows[-1]
    assert compare["kind"] == "compare"
    assert set(compare) == {"kind", *variants.split(",")} - {"default"}
    assert all(math.isfinite(compare[v]["step_time"]) for v in training[1:])


def _module():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flags_name_the_variants_and_peaks_come_from_the_card_name():
    import argparse

    mod = _module()
    ns = lambda **kw: argparse.Namespace(**{"variants": None, "no_checkpointing": False, "joint": False,  # noqa: E731
                                            "separate_rollouts": False, "hf_generate": False, **kw})
    assert mod.variants_of(ns()) == ["default"]
    assert mod.variants_of(ns(joint=True, no_checkpointing=True, hf_generate=True)) == \
        ["no_checkpointing+joint", "hf_generate"]
    assert mod.variants_of(ns(variants="joint, separate_rollouts")) == ["joint", "separate_rollouts"]
    for bad in ("foo", "joint+hf_generate"):
        with pytest.raises(SystemExit):
            mod.variants_of(ns(variants=bad))
    table = dict(mod.PEAK_TFLOPS)
    first = lambda name: next(tf for key, tf in mod.PEAK_TFLOPS if key in name)  # noqa: E731
    assert first("NVIDIA H100 80GB HBM3") == 989.0 and first("NVIDIA H100 PCIe") == 756.0
    assert first("NVIDIA H200") == 989.0 and first("NVIDIA GH200 480GB") == 989.0
    assert first("NVIDIA A100-SXM4-80GB") == table["A100"] == 312.0
