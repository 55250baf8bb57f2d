"""`tars experiment mini-table`: the paper's ablation table, reproduced on the mini model.

Every trained row starts from the same aligned mini model (`configs/mini.yaml`'s `model`) with the same
questions, seeds and step budget, and differs only in `method`; every row is evaluated greedily on the
same held-out questions (and, with `--obqa N`, the first N of OpenBookQA). Rows:

    base     the aligned model, no RL (its system prompt already asks for step-by-step thinking, so the
             paper's "Base + CoT prompt" row is this one for a model SFT'd on the think/answer format)
    cascade  Whisper tiny.en transcript → the same LLM (eval --modality cascade)
    sft, dpo, grpo, grpo_rep, grpo_beh, tars   `tars train --config configs/mini.yaml method=…`

Everything lands in `runs/mini_table/<row>/` (training run) and `runs/mini_table/<row>/eval/`; with
several `seeds`, seed s ≠ 0 of a trained row lands in `<row>_s<s>/` (the config's `seed` overridden:
other questions' order, other rollouts). Each piece is resumable and skipped when done, so the command
can be killed and rerun, or run row by row (`--rows grpo,tars`). The last step writes
`runs/mini_table/table.md` (+ the report page) from whatever rows have finished: per row speech / text
accuracy, gap, MRR against the base row's text accuracy (the backbone: alignment never changes the
LLM), wall and CPU time, and a row with several seeds also as their mean; then TARS − GRPO and
TARS − base as paired differences on the same questions with 95 % bootstrap intervals (each
question's correctness averaged over the seeds a row has), every other trained row against GRPO and
against base the same way, and each further seed of a row against its seed 0 (the chance spread
between runs). Once base, GRPO and TARS (seed 0) are finished, `layers/`
holds their speech-vs-text cosine per layer (`layer_plot`), which the report shows beside every
row's evaluation (a row with several seeds also pooled).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tars.atomic import atomic_write_text

ROWS = ("base", "cascade", "sft", "dpo", "grpo", "grpo_rep", "grpo_beh", "tars")
TRAINED = ("sft", "dpo", "grpo", "grpo_rep", "grpo_beh", "tars")
#: The paired comparisons table.md states first with intervals: (row, against).
COMPARISONS = (("tars", "grpo"), ("tars", "base"))
#: Then every other trained row against GRPO and against base: the paper's ablations, so that a row
#: other than TARS that moves the model (SFT did, on mini:soft) shows its interval in table.md too.
ABLATIONS = (("grpo", "base"),) + tuple((row, against) for row in TRAINED if row not in ("grpo", "tars")
                                        for against in ("grpo", "base"))
#: The rows whose speech-vs-text cosine per layer the table plots (seed 0), on the first
#: LAYER_QUESTIONS held-out questions: enough for a curve (the per-token cosine is averaged over every
#: token of every chain), a few CPU-minutes per model.
LAYER_ROWS = ("base", "grpo", "tars")
LAYER_QUESTIONS = 100


def row_folder(row: str, seed: int) -> str:
    """`row` for seed 0 (the single-seed layout), `row_s<seed>` otherwise."""
    return row if seed == 0 else f"{row}_s{seed}"


def run_table(config: Path, heldout: Path, out: Path, rows: Sequence[str] = ROWS, overrides: Sequence[str] = (),
              obqa: int = 0, progress: bool = True, seeds: Sequence[int] = (0,)) -> Path:
    from tars.config import load_config
    from tars.eval.evaluate import EvalConfig, run_eval
    from tars.rl.tars import TarsConfig
    from tars.rl.tars import run as train

    out = Path(out)
    base_model = load_config(TarsConfig, config, list(overrides)).model
    for row in rows:
        for seed in seeds if row in TRAINED else (0,):
            folder = out / row_folder(row, seed)
            if row in TRAINED:
                cfg = load_config(TarsConfig, config,
                                  list(overrides) + [f"method={row}", f"out={folder}"] + ([f"seed={seed}"] if seed else []))
                model = str(train(cfg, progress=progress))
            else:
                model = base_model
            mods = ["cascade"] if row == "cascade" else ["speech", "text"]
            evals = [("eval", str(heldout), None)] + ([("eval_obqa", "openbookqa", obqa)] if obqa else [])
            for name, data, limit in evals:
                if not (folder / name / "metrics.json").exists():
                    run_eval(EvalConfig(model=model, data=[data], out=str(folder / name), modalities=mods,
                                        limit=limit), progress=progress)
    table = write_table(out)
    write_report(out, layer_plot(out, str(heldout), base_model, progress))
    return table


def write_report(out: Path, layers: Path | None = None) -> Path:
    """`tars report` of every finished row, its training curves and the layer plot, with every row's MRR
    against the base row's text accuracy, as in table.md."""
    from tars.eval.metrics import backbone_text_accuracy
    from tars.eval.report import build_report

    runs = [f for r in TRAINED for f in row_folders(out, r) if (f / "metrics.jsonl").exists()]
    base_eval = out / "base" / "eval"
    backbone = backbone_text_accuracy(str(base_eval)) if (base_eval / "metrics.json").exists() else None
    return build_report(report_evals(out) + runs + ([layers] if layers else []), out / "report", backbone)


def report_evals(out: Path) -> list[str | Path]:
    """What the report compares with base: every finished row's evaluation, and a row with several seeds
    also pooled (`NAME=DIR,DIR`: its mean, compared seed-averaged like table.md)."""
    evals: list[str | Path] = []
    for row in ROWS:
        done = [f / "eval" for f in evaluated(out, row)]
        evals += done
        if len(done) > 1:
            evals.append(f"{row}={','.join(map(str, done))}")
    return evals


def layer_plot(out: Path, heldout: str, base_model: str, progress: bool = True) -> Path | None:
    """The layer plot of base / GRPO / TARS (seed 0) once both trained rows are finished: each model
    teacher-forced on the same gold chains of thought, so the curves differ only by the model. None
    until then; computed once (`out/layers/layers.json`)."""
    from tars.eval.layers import run_layers

    folder = out / "layers"
    if (folder / "layers.json").exists():
        return folder
    models = {}
    for row in LAYER_ROWS:
        if row == "base":
            models[row] = base_model
        elif (out / row / "DONE").exists():
            models[row] = str(out / row / "model")
        else:
            return None
    run_layers(list(models.values()), heldout, folder, limit=LAYER_QUESTIONS, completion="gold", progress=progress,
               names=list(models))
    return folder


def _row_logs(folder: Path) -> tuple[list[dict], list[dict]]:
    """A row's step metrics (metrics.jsonl) and its evaluations' metrics (eval*/metrics.json)."""
    log = folder / "metrics.jsonl"
    steps = [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.exists() else []
    return steps, [json.loads(m.read_text()) for m in folder.glob("eval*/metrics.json")]


def row_minutes(folder: Path) -> float:
    """Wall time of a row: its training steps plus its evaluations. A paused or crowded process counts
    here; `row_cpu_minutes` does not."""
    steps, evals = _row_logs(folder)
    return (sum(r.get("time/step", 0.0) for r in steps) + sum(sum(e.get("seconds", {}).values()) for e in evals)) / 60


def row_cpu_minutes(folder: Path) -> float | None:
    """CPU time of a row (its process over all threads: ~2× the wall time on 2 busy cores): steps plus
    evaluations; None when any piece ran before tars logged CPU time (`time/cpu`, `cpu_seconds`)."""
    steps, evals = _row_logs(folder)
    if any("time/cpu" not in r for r in steps) or any("cpu_seconds" not in e for e in evals):
        return None
    return (sum(r["time/cpu"] for r in steps) + sum(sum(e["cpu_seconds"].values()) for e in evals)) / 60


def row_folders(out: Path, row: str | None = None) -> list[Path]:
    """The finished or started folders of `row` (every row when None), seed 0 first, in ROWS order."""
    found = []
    for r in [row] if row else ROWS:
        seeded = sorted((f for f in out.glob(f"{r}_s*") if f.name[len(r) + 2:].isdigit()),
                        key=lambda f: int(f.name[len(r) + 2:]))
        found += ([out / r] if (out / r).exists() else []) + seeded
    return found


def evaluated(out: Path, row: str, file: str = "metrics.json") -> list[Path]:
    """The folders of `row` (seed 0 first) whose evaluation has written `file`."""
    return [f for f in row_folders(out, row) if (f / "eval" / file).exists()]


def write_table(out: Path) -> Path:
    """The table from every finished row (accuracy %; A = speech, or the transcript for the cascade),
    a line per seed and, for several, their mean; then the paired differences of `COMPARISONS`."""
    from tars.eval.report import mean_metrics

    lines = ["| row | held-out A | held-out T | gap | MRR % | unparseable A % | OpenBookQA A | OpenBookQA T | wall min "
             "| CPU min |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def acc(folder: Path, row: str) -> tuple[dict | None, dict | None]:
        f = folder / "metrics.json"
        if not f.exists():
            return None, None
        d = next(iter(json.loads(f.read_text())["datasets"].values()))
        return d.get("cascade" if row == "cascade" else "speech"), d.get("text")

    def pct(x: dict | None) -> str:
        return f"{x['accuracy']:.1f}" if x else "–"

    def line(name: str, a: dict | None, t: dict | None, oa: dict | None, ot: dict | None, wall: float,
             cpu: float | None) -> str:
        gap = f"{t['accuracy'] - a['accuracy']:+.1f}" if a and t else ""
        mrr = f"{100 * a['accuracy'] / backbone['accuracy']:.1f}" if a and backbone and backbone["accuracy"] else ""
        unp = f"{a['unparseable']:.1f}" if a else ""
        return (f"| {name} | {pct(a)} | {pct(t)} | {gap} | {mrr} | {unp} | {pct(oa)} | {pct(ot)} | "
                f"{wall:.1f} | {_minutes(cpu)} |")

    _, backbone = acc(out / "base" / "eval", "base")
    for row in ROWS:
        folders = evaluated(out, row)
        if not folders:
            lines.append(f"| {row} | not run | | | | | | | | |")
        seeds = []
        for folder in folders:
            seeds.append((*acc(folder / "eval", row), *acc(folder / "eval_obqa", row), row_minutes(folder),
                          row_cpu_minutes(folder)))
            lines.append(line(folder.name, *seeds[-1]))
        if len(seeds) > 1:  # what the paired differences below compare: the row averaged over its seeds
            lines.append(line(f"{row} (mean of {len(seeds)} seeds)", *map(mean_metrics, zip(*seeds))))
    lines += paired_lines(out)
    path = out / "table.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _minutes(m: float | None) -> str:
    return "–" if m is None else f"{m:.1f}"


def seed_mean_correct(folders: Sequence[Path]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (dataset, modality) and question id: the share of `folders`' evaluations (one per seed) that
    answered it right — only questions every seed answered."""
    from tars.errors import UserError
    from tars.eval.report import pooled_correct

    pooled = pooled_correct([f / "eval" for f in folders])
    if pooled is None:
        raise UserError(f"{folders[0] / 'eval'}: no predictions.jsonl to compare")
    return pooled


def paired_lines(out: Path) -> list[str]:
    """Markdown: each comparison of `COMPARISONS`, then of `ABLATIONS`, whose rows have predictions, as
    Δ accuracy (points) on the same questions with a 95 % paired bootstrap interval (eval/metrics.py);
    then, for a trained row with several seeds, each seed against seed 0 — how far two runs of one
    method land apart by chance, the yardstick for a difference between methods."""
    def kept(row: str) -> list[Path]:
        return evaluated(out, row, "predictions.jsonl")

    def compared(pairs) -> list[str]:
        sides = [(f"{row} − {against}", kept(row), kept(against)) for row, against in pairs]
        return [line for label, a, b in sides if a and b for line in _paired_rows(label, a, b)]

    rows, ablations = compared(COMPARISONS), compared(ABLATIONS)
    seeds = []
    for row in TRAINED:
        folders = kept(row)
        if folders and folders[0].name == row:  # seed 0 is evaluated: the others against it
            for other in folders[1:]:
                seeds += _paired_rows(f"{other.name} − {row}", [other], [folders[0]])
    lines = []
    if rows:
        lines += ["", "Paired differences on the same held-out questions (each question's correctness averaged "
                  "over a row's seeds), with 95 % bootstrap intervals (10,000 resamples of the questions):", "",
                  *PAIRED_HEADER, *rows]
    if ablations:
        lines += ["", "Every other trained row against GRPO and against base, the same way (with this many "
                  "intervals, about one in twenty excludes 0 by chance alone):", "", *PAIRED_HEADER, *ablations]
    if seeds:
        lines += ["", "Seed to seed: the same method run with another seed, on the same questions — how far two "
                  "runs land apart by chance alone:", "", *PAIRED_HEADER, *seeds]
    return lines


PAIRED_HEADER = ("| comparison | seeds | modality | n | Δ accuracy (points) | 95 % interval |",
                 "| --- | --- | --- | --- | --- | --- |")


def _paired_rows(label: str, a: Sequence[Path], b: Sequence[Path]) -> list[str]:
    """A table line per (dataset, modality) the two sides share: seed-averaged `a` − `b` with its interval."""
    from tars.eval.metrics import paired_correct_differences

    return [f"| {label} | {len(a)} vs {len(b)} | {key[1]} | {d['n']} | {d['diff']:+.1f} | "
            f"[{d['lo']:+.1f}, {d['hi']:+.1f}] |"
            for key, d in paired_correct_differences(seed_mean_correct(b), seed_mean_correct(a)).items()]
