"""`tars experiment mini-table`: the paper's ablation table, reproduced on the mini model.

Every trained row starts from the same aligned mini model (`configs/mini.yaml`'s `model`) with the same
questions, seeds and step budget, and differs only in `method`; every row is evaluated greedily on the
same held-out questions (and, with `--obqa N`, the first N of OpenBookQA). Rows:

    base     the aligned model, no RL (its system prompt already asks for step-by-step thinking, so the
             paper's "Base + CoT prompt" row is this one for a model SFT'd on the think/answer format)
    cascade  Whisper tiny.en transcript → the same LLM (eval --modality cascade)
    sft, dpo, grpo, grpo_rep, grpo_beh, tars   `tars train --config configs/mini.yaml method=…`

Everything lands in `runs/mini_table/<row>/` (training run) and `runs/mini_table/<row>/eval/`; each piece
is resumable and skipped when done, so the command can be killed and rerun, or run row by row
(`--rows grpo,tars`). The last step writes `runs/mini_table/table.md` (+ the report page) from whatever
rows have finished, with the CPU time of each row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tars.atomic import atomic_write_text

ROWS = ("base", "cascade", "sft", "dpo", "grpo", "grpo_rep", "grpo_beh", "tars")
TRAINED = ("sft", "dpo", "grpo", "grpo_rep", "grpo_beh", "tars")


def run_table(config: Path, heldout: Path, out: Path, rows: Sequence[str] = ROWS, overrides: Sequence[str] = (),
              obqa: int = 0, progress: bool = True) -> Path:
    from tars.config import load_config
    from tars.eval.evaluate import EvalConfig, run_eval
    from tars.eval.report import build_report
    from tars.rl.tars import TarsConfig
    from tars.rl.tars import run as train

    out = Path(out)
    base_model = load_config(TarsConfig, config, list(overrides)).model
    for row in rows:
        folder = out / row
        if row in TRAINED:
            cfg = load_config(TarsConfig, config, list(overrides) + [f"method={row}", f"out={folder}"])
            model = str(train(cfg, progress=progress))
        else:
            model = base_model
        mods = ["cascade"] if row == "cascade" else ["speech", "text"]
        evals = [("eval", str(heldout), None)] + ([("eval_obqa", "openbookqa", obqa)] if obqa else [])
        for name, data, limit in evals:
            if not (folder / name / "metrics.json").exists():
                run_eval(EvalConfig(model=model, data=[data], out=str(folder / name), modalities=mods, limit=limit),
                         progress=progress)
    table = write_table(out)
    done = [out / r / "eval" for r in ROWS if (out / r / "eval" / "metrics.json").exists()]
    runs = [out / r for r in TRAINED if (out / r / "metrics.jsonl").exists()]
    build_report(done + runs, out / "report")
    return table


def row_minutes(folder: Path) -> float:
    """CPU wall time of a row: its training steps (metrics.jsonl) plus its evaluations (metrics.json)."""
    total = 0.0
    log = folder / "metrics.jsonl"
    if log.exists():
        total += sum(json.loads(l).get("time/step", 0.0) for l in log.read_text().splitlines() if l.strip())
    for m in folder.glob("eval*/metrics.json"):
        total += sum(json.loads(m.read_text()).get("seconds", {}).values())
    return total / 60


def write_table(out: Path) -> Path:
    """The table from every finished row (accuracy %; A = speech, or the transcript for the cascade)."""
    lines = ["| row | held-out A | held-out T | gap | unparseable A % | OpenBookQA A | OpenBookQA T | CPU min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def acc(folder: Path, row: str) -> tuple[str, str, str, str]:
        f = folder / "metrics.json"
        if not f.exists():
            return "–", "–", "", ""
        d = next(iter(json.loads(f.read_text())["datasets"].values()))
        a, t = d.get("cascade" if row == "cascade" else "speech"), d.get("text")
        gap = f"{t['accuracy'] - a['accuracy']:+.1f}" if a and t else ""
        return (f"{a['accuracy']:.1f}" if a else "–", f"{t['accuracy']:.1f}" if t else "–", gap,
                f"{a['unparseable']:.1f}" if a else "")

    for row in ROWS:
        if not (out / row / "eval" / "metrics.json").exists():
            lines.append(f"| {row} | not run | | | | | | |")
            continue
        a, t, gap, unp = acc(out / row / "eval", row)
        oa, ot, _, _ = acc(out / row / "eval_obqa", row)
        lines.append(f"| {row} | {a} | {t} | {gap} | {unp} | {oa} | {ot} | {row_minutes(out / row):.1f} |")
    path = out / "table.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
