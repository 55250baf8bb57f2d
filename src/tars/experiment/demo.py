"""`tars demo`: the toolkit end to end on the bundled mini model, on a 2-core CPU, in under 15 minutes and 4 GB.

    model        the mini Speech LLM with a representational gap (`mini:soft`: the PyPI build, then the
                 packs shipped with tars unpacked onto it; cached under $TARS_HOME/mini)
    eval         held-out questions from speech and from text: the modality gap of the model
    eval         the same questions with the TARS adapter shipped with tars (`mini:soft-tars`: the
                 mini table's TARS row, 100 steps; docs/results.md) — the gap after real training,
                 paired with the model's answers question by question, with 95 % intervals
    train        a short live TARS run of a few steps: the workflow and its training curves
    layers       speech-vs-text similarity per decoder layer, with and without the shipped adapter
    report       one page (markdown + HTML): the table, the paired differences, the curves, the layer plot

The held-out set is the first `questions` of `mini:heldout` (seed 1000, no question of any stage's
training sets nor of the table's), the live run's questions the first of `mini:rl_train` (seed 4);
both are regenerated (data/mini_sets.py), so the demo needs no file but the packs and the adapter.
Every piece is skipped when done and resumes after a kill, so rerunning the command finishes the job.
The live run is too short to move accuracy measurably; the shipped adapter is what shows the effect.
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
from tars.models.mini import shipped_model


class DemoConfig(Config):
    out: str = "runs/demo"
    #: The model evaluated and trained: a shipped stage (`mini:soft`, `mini:demo`) or any model folder.
    model: str = "mini:soft"
    #: A LoRA adapter of `model` evaluated beside it (a shipped one by name, or an RL run's `adapter`
    #: folder); None = evaluate the model only.
    adapter: str | None = "mini:soft-tars"
    #: Held-out questions evaluated (each from speech and from text) with the model and with the adapter.
    questions: int = Field(48, ge=1, le=HELDOUT[0])
    #: The live TARS run: steps × questions_per_step questions × (rollouts speech + rollouts text).
    steps: int = Field(4, ge=1)
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
    if (out / "demo.yaml").exists():  # resuming: every finished piece is reused, so it must be this demo's
        try:
            old = load_config(DemoConfig, out / "demo.yaml")
        except UserError:
            raise UserError(f"{out} holds a demo of another tars version ({out / 'demo.yaml'} does not load); "
                            "pass another out=, or remove that folder") from None
        changed = [k for k in DemoConfig.model_fields if k != "low_memory" and getattr(old, k) != getattr(cfg, k)]
        if changed:
            k = changed[0]
            raise UserError(f"{out} holds a demo made with {k}={getattr(old, k)} (now {getattr(cfg, k)}); "
                            "pass another out=, or remove that folder")
    if cfg.low_memory:  # from the start: unpacking the stages peaks too
        release_freed_memory()
    step_log = _Clock(log)
    step_log("the model" + (" and the shipped adapter" if cfg.adapter else ""))
    model = str(shipped_model(cfg.model, log))  # before anything is written: a wrong name writes nothing
    adapter = str(shipped_model(cfg.adapter, log)) if cfg.adapter else None
    for name, path in (("model", model), ("adapter", adapter)):
        if path is not None and not Path(path).exists():
            raise UserError(f"{name}={getattr(cfg, name)}: {path} not found")
    if adapter:
        log(adapter_line(cfg.adapter, Path(adapter)))
    save_config(cfg, out, "demo.yaml")

    step_log("questions")
    heldout, questions = demo_questions(cfg.questions, cfg.steps * cfg.questions_per_step)
    write_records(out / "data" / "heldout.jsonl", heldout)
    write_records(out / "data" / "train.jsonl", questions)
    data = [str(out / "data" / "heldout.jsonl")]

    def evaluate(folder: str, what: str, path: str) -> dict:
        step_log(f"evaluation of {what}: {cfg.questions} held-out questions, speech and text")
        return run_eval(EvalConfig(model=path, data=data, out=str(out / folder),
                                   max_new_tokens=cfg.eval_max_new_tokens), progress=progress)

    before = evaluate("base", f"the model ({cfg.model})", model)
    after = evaluate("tars_adapter", f"the shipped TARS adapter ({cfg.adapter})", adapter) if adapter else None

    step_log(f"a live TARS run: {cfg.steps} steps × {cfg.questions_per_step} questions × ({cfg.rollouts} speech + "
             f"{cfg.rollouts} text rollouts)")
    tcfg = TarsConfig(model=model, out=str(out / "tars"), method="tars",
                      data=DataConfig(file=str(out / "data" / "train.jsonl")), steps=cfg.steps,
                      questions_per_step=cfg.questions_per_step, speech_rollouts=cfg.rollouts,
                      text_rollouts=cfg.rollouts, max_new_tokens=cfg.max_new_tokens, lr=cfg.lr,
                      warmup_frac=0.05, save_every=2, seed=cfg.seed, save_merged=False,
                      activation_checkpointing=cfg.low_memory, release_memory=cfg.low_memory)
    train(tcfg, progress=progress)

    # Both models teacher-forced on the same tokens (each question's gold chain of thought), so the
    # curves differ only by the model; it also skips a greedy generation per question and model.
    folders = [out / "base"] + ([out / "tars_adapter"] if adapter else []) + [out / "tars"]
    if adapter:
        step_log("layer analysis, with and without the adapter")
        if not (out / "layers" / "layers.json").exists():
            run_layers([model, adapter], str(out / "data" / "heldout.jsonl"), out / "layers", limit=cfg.questions,
                       completion="gold", progress=progress, names=["base", "TARS adapter"])
        folders.append(out / "layers")

    step_log("report")
    report = build_report(folders, out / "report")
    log(summary(out / "base", before, out / "tars_adapter" if after else None, after))
    step_log(f"done: {report} (and report.html beside it)")
    return report


def adapter_line(name: str, folder: Path) -> str:
    """What the adapter is, from its json: method, steps and, for a shipped one, the command that made it."""
    from tars.models.lora import ADAPTER_CONFIG

    try:
        meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return f"  {name}: {folder}"
    made = meta.get("provenance", {}).get("command")
    return (f"  {name}: {meta.get('method', '?')} LoRA (r {meta.get('r', '?')}), {meta.get('steps', '?')} steps on "
            f"{meta.get('base_model', '?')}" + (f"; made by `{made}`" if made else ""))


class _Clock:
    """Logs each piece of the demo, as it starts, with the minutes since the demo started and the
    process's peak memory so far: the 4 GB budget is the demo's tightest limit. The rise from one line
    to the next is the peak of the piece named on the first; the `done:` line holds the whole demo's."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.t0 = log, time.perf_counter()

    def __call__(self, name: str) -> None:
        from tars.host_memory import peak_rss_gb

        peak = peak_rss_gb()
        self.log(f"[{(time.perf_counter() - self.t0) / 60:4.1f} min" + (f", peak {peak:.2f} GB" if peak else "")
                 + f"] {name}")


def summary(base_dir: Path, base: dict, adapter_dir: Path | None, adapter: dict | None) -> str:
    """Speech and text accuracy of the model (→ with the adapter, and the paired difference with its 95 %
    interval), then the gap; one line each."""
    from tars.eval.metrics import paired_accuracy_differences
    from tars.eval.report import predictions

    b = next(iter(base["datasets"].values()))
    if adapter is None:
        lines = [f"{mod:>6}: {b[mod]['accuracy']:5.1f} %  (n {b[mod]['n']})" for mod in ("speech", "text")]
        return "\n".join(lines + [f"   gap: {b['text']['accuracy'] - b['speech']['accuracy']:+5.1f} points"])
    a = next(iter(adapter["datasets"].values()))
    pairs = paired_accuracy_differences(predictions(base_dir), predictions(adapter_dir))
    diffs = {mod: d for (_, mod), d in pairs.items()}
    lines = ["        model → with the shipped TARS adapter (paired difference, 95 % interval)"]
    for mod in ("speech", "text"):
        d = diffs[mod]
        lines.append(f"{mod:>6}: {b[mod]['accuracy']:5.1f} % → {a[mod]['accuracy']:5.1f} %   "
                     f"{d['diff']:+5.1f} points "
                     f"[{d['lo']:+.1f}, {d['hi']:+.1f}]  (n {d['n']})")
    gap_b = b["text"]["accuracy"] - b["speech"]["accuracy"]
    gap_a = a["text"]["accuracy"] - a["speech"]["accuracy"]
    lines.append(f"   gap: {gap_b:+5.1f}   → {gap_a:+5.1f}    points")
    return "\n".join(lines)
