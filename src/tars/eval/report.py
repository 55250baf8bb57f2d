"""`tars report`: one page (markdown and HTML) from evaluation folders, training runs and layer analyses.

Each input folder is recognised by what it holds: `metrics.json` (a `tars eval` folder → a row of the
results table), `metrics.jsonl` (a `tars train` run → training curves), `layers.json` (a `tars analyze
layers` folder → the layer plot); `NAME=DIR,DIR,…` pools one method's evaluations (its seeds) into one
row and one side of each paired comparison. The results table has the paper's layout: per benchmark speech (A)
and text (T) accuracy, then Avg(A), Avg(T), gap and MRR (when the evaluation was given the backbone's
text accuracy). Figures are PNGs beside the page; the HTML embeds them, so it travels as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Sequence

from tars.atomic import atomic_write_bytes, atomic_write_text
from tars.errors import UserError

CURVES = {
    "accuracy": ["speech/acc", "text/acc"],
    "rewards": ["speech/base", "speech/rep", "speech/beh", "text/base"],
    "alignment spread": ["speech/rep_spread", "speech/beh_spread"],
}
#: Each panel's y axis: the step's sampled rollouts, not the greedy evaluation of the results table.
YLABELS = {"accuracy": "share of rollouts correct (0–1)", "rewards": "mean reward per rollout",
           "alignment spread": "std within a question's speech rollouts"}
#: Under every training figure: a reader compares its accuracy with the table's and should not.
TRAINING_NOTE = ("Per step, over that step's sampled rollouts (at the run's temperature): the share that chose "
                 "the right option, and each reward's mean (base = R_acc + λ·R_fmt; rep, beh: the alignment "
                 "rewards of speech rollouts; their spread: the std of each within a question's speech rollouts, "
                 "the part that can move an advantage). The results table above is greedy decoding, in %.")


def results_table(evals: dict[str, dict], backbone_text: float | None = None) -> list[str]:
    """Markdown lines: one row per evaluation, the paper's columns. With `backbone_text` every row's MRR
    is computed against that one figure (so rows evaluated without it, or against another, are
    comparable); without it, each row shows the MRR its evaluation stored."""
    from tars.eval.metrics import mrr

    benches = sorted({ds for m in evals.values() for ds in m["datasets"]})
    head = ["model"] + [f"{b} {k}" for b in benches for k in ("A", "T")] + ["Avg(A)", "Avg(T)", "Gap", "MRR"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def cell(x):
        return "–" if x is None else f"{x:.1f}"

    for name, m in evals.items():
        cells = [name]
        for b in benches:
            d = m["datasets"].get(b, {})
            heard = d.get("speech", d.get("cascade", {}))  # the cascade's A is its transcript condition
            cells += [cell(heard.get("accuracy")), cell(d.get("text", {}).get("accuracy"))]
        avg = m.get("average", {})
        heard = avg.get("speech", avg.get("cascade"))
        row_mrr = m.get("mrr") if backbone_text is None else None if heard is None else mrr(heard, backbone_text)
        cells += [cell(heard), cell(avg.get("text")), cell(m.get("gap")), cell(row_mrr)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def predictions(folder: Path) -> list[dict] | None:
    """An evaluation folder's answers (`predictions.jsonl`), None when it has none."""
    p = folder / "predictions.jsonl"
    if not p.exists():
        return None
    try:
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e})") from None


def paired_differences(eval_dirs: dict[str, Path | Sequence[Path]]) -> list[tuple[str, str, str, dict]]:
    """(model, benchmark, modality, difference) for each evaluation against the first one, on the
    questions both answered: the accuracy difference in points and its 95 % paired bootstrap interval
    (eval/metrics.py). Two accuracies a few points apart on a few hundred questions can be noise; the
    interval says whether they are. An entry with several folders (a method's seeds) is compared by
    each question's correctness averaged over them."""
    from tars.eval.metrics import paired_correct_differences

    names = list(eval_dirs)
    base = pooled_correct(eval_dirs[names[0]]) if names else None
    if base is None or len(names) < 2:
        return []
    out = []
    for name in names[1:]:
        other = pooled_correct(eval_dirs[name])
        if other is not None:
            out += [(name, ds, mod, d) for (ds, mod), d in paired_correct_differences(base, other).items()]
    return out


def pooled_correct(dirs: Path | Sequence[Path]) -> dict[tuple[str, str], dict[str, float]] | None:
    """Each question's correctness averaged over the evaluation folders `dirs` (one method's seeds;
    `metrics.mean_correct_by_question`); None when none of them kept its predictions."""
    from tars.eval.metrics import mean_correct_by_question

    dirs = [dirs] if isinstance(dirs, Path) else list(dirs)
    runs = [predictions(d) for d in dirs]
    if all(r is None for r in runs):
        return None
    if any(r is None for r in runs):
        missing = next(d for d, r in zip(dirs, runs) if r is None)
        raise UserError(f"{missing}: no predictions.jsonl, which the other runs of its group have")
    return mean_correct_by_question(runs)


def mean_metrics(ms: Sequence):
    """Several evaluations' `metrics.json` (or any part of them: a modality's dict, one number) as one:
    every number they all have, averaged (accuracy per benchmark and modality, averages, gap, MRR, per
    subject); what differs and is not a number, dropped (None at the top)."""
    first = ms[0]
    if all(isinstance(m, dict) for m in ms):
        return {k: v for k in first if all(k in m for m in ms)
                for v in [mean_metrics([m[k] for m in ms])] if v is not None}
    if all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in ms):
        return sum(ms) / len(ms)
    return first if all(m == first for m in ms) else None


def parse_group(spec: str) -> tuple[str, list[Path]] | None:
    """`NAME=DIR,DIR,…` (a method's runs, e.g. its seeds, reported as one row) → (NAME, folders); None for
    anything else."""
    name, sep, dirs = spec.partition("=")
    if not sep or not name or "/" in name:
        return None
    folders = [Path(d) for d in dirs.split(",") if d]
    if not folders:
        raise UserError(f"{spec}: a group needs NAME=DIR,DIR,… with at least one evaluation folder")
    return name, folders


def paired_section(against: str, diffs: list[tuple[str, str, str, dict]]) -> list[str]:
    """Markdown lines: `paired_differences` as a table."""
    if not diffs:
        return []
    lines = [f"### Paired differences against `{against}`", "",
             "Accuracy difference (points) on the same questions, with its 95 % bootstrap interval "
             "(10,000 resamples of the questions); an interval that excludes 0 is a difference the questions' "
             "draw does not explain.", "",
             "| model | benchmark | modality | n | Δ accuracy | 95 % interval |", "| --- | --- | --- | --- | --- | --- |"]
    for name, ds, mod, d in diffs:
        lines.append(f"| {name} | {ds} | {mod} | {d['n']} | {d['diff']:+.1f} | [{d['lo']:+.1f}, {d['hi']:+.1f}] |")
    return lines + [""]


def plot_paired(against: str, diffs: list[tuple[str, str, str, dict]]) -> bytes:
    """`paired_differences` as a forest plot: one line per model × benchmark, its modalities one above
    the other, each difference with its interval around the 0 line — whether an interval crosses 0 reads at
    a glance, which a column of bracketed numbers does not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(f"{name} · {ds}" for name, ds, _, _ in diffs))
    mods = list(dict.fromkeys(mod for _, _, mod, _ in diffs))  # speech, text; cascade where evaluated
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.45 * len(labels)), dpi=120)
    for k, mod in enumerate(mods):
        pts = [(labels.index(f"{name} · {ds}"), d) for name, ds, m, d in diffs if m == mod]
        offset = 0.12 * ((len(mods) - 1) / 2 - k)  # the first modality on top within a line
        ys = [len(labels) - 1 - i + offset for i, _ in pts]
        xs = [d["diff"] for _, d in pts]
        err = [[d["diff"] - d["lo"] for _, d in pts], [d["hi"] - d["diff"] for _, d in pts]]
        ax.errorbar(xs, ys, xerr=err, fmt="o", capsize=3, label=mod)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(labels)), labels[::-1], fontsize=8)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xlabel(f"Δ accuracy against {against} (points), 95 % paired bootstrap interval", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7)
    return figure_png(fig)


def display_name(folder: Path) -> str:
    """An evaluation's row name: its folder, or for `ROW/eval…` folders (the mini table's layout) the row."""
    if folder.name in ("eval", "eval_obqa") and folder.parent.name:
        return folder.parent.name if folder.name == "eval" else f"{folder.parent.name} (OpenBookQA)"
    return folder.name


def _smooth(ys: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_training(rows: list[dict], title: str) -> bytes:
    """One panel per entry of CURVES (accuracy per modality; reward components; the alignment rewards'
    spread within a group), a running mean over ~5 % of the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    k = max(1, len(rows) // 20)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6), dpi=120)
    for ax, (panel, keys) in zip(axes, CURVES.items()):
        for key in keys:
            ys = [r[key] for r in rows if key in r]
            if len(ys) == len(steps) and any(y != 0 for y in ys):
                # a short run's few points would be invisible as a bare line
                ax.plot(steps, _smooth(ys, k), label=key, marker="o" if len(steps) <= 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(YLABELS[panel], fontsize=8)
        if len(steps) <= 10:  # whole steps only: no 0.96 … 1.04 ticks under a 1-step run
            ax.set_xticks(steps)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"{title}: {panel}" + (f" (running mean of {k})" if k > 1 else ""), fontsize=9)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "every value is 0", transform=ax.transAxes, ha="center", fontsize=8)
    return figure_png(fig)


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (closed after), for atomic writes and inlining."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def build_report(folders: Sequence[str | Path], out: Path, backbone_text: float | None = None) -> Path:
    """The page from `folders` (each recognised by what it holds, or `NAME=DIR,DIR,…` for one method's
    evaluations pooled: a results row of their means, compared seed-averaged question by question);
    `backbone_text` (%), when given, is the MRR denominator of every row."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evals: dict[str, dict] = {}
    eval_dirs: dict[str, Path | list[Path]] = {}
    figures: list[tuple[str, str, str]] = []  # (caption, file name, note under it)
    for f in map(Path, folders):
        group = None if f.is_dir() else parse_group(str(f))
        if group:
            name, members = group
            ms = []
            for m in members:
                if not (m / "metrics.json").exists():
                    raise UserError(f"{m}: not an evaluation folder (no metrics.json), in the group {name}")
                try:
                    ms.append(json.loads((m / "metrics.json").read_text()))
                except json.JSONDecodeError as e:
                    raise UserError(f"{m / 'metrics.json'}: not valid JSON ({e})") from None
            label = name if len(members) == 1 else f"{name} (mean of {len(members)})"
            evals[label], eval_dirs[label] = mean_metrics(ms), members
            continue
        if not f.is_dir():
            raise UserError(f"{f}: not a folder (expected an eval folder, a training run or a layers analysis)")
        found = False
        if (f / "metrics.json").exists():
            try:
                evals[display_name(f)] = json.loads((f / "metrics.json").read_text())
                eval_dirs[display_name(f)] = f
            except json.JSONDecodeError as e:
                raise UserError(f"{f / 'metrics.json'}: not valid JSON ({e})") from None
            found = True
        if (f / "metrics.jsonl").exists():
            rows = []
            for i, line in enumerate((f / "metrics.jsonl").read_text().splitlines(), 1):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UserError(f"{f / 'metrics.jsonl'}:{i}: not valid JSON") from None
            if rows and "speech/acc" in rows[0]:
                name = f"training_{f.name}.png"
                atomic_write_bytes(out / name, plot_training(rows, f.name))
                figures.append((f"Training curves of `{f.name}` ({len(rows)} step{'s' if len(rows) != 1 else ''})", name,
                                TRAINING_NOTE))
            found = True
        if (f / "layers.json").exists() and (f / "layers.png").exists():
            name = f"layers_{f.name}.png"
            atomic_write_bytes(out / name, (f / "layers.png").read_bytes())
            figures.append((f"Speech vs text states per decoder layer (`{f.name}`)", name, ""))
            found = True
        if not found:
            raise UserError(f"{f}: holds no metrics.json, metrics.jsonl or layers.json")

    md = ["# tars report", ""]
    if evals:
        given = (f"{backbone_text:.1f} %, given to the report" if backbone_text is not None
                 else "– where the evaluation had no backbone figure")
        md += ["## Results", "", "Accuracy % from speech (A) and text (T); Gap = Avg(T) − Avg(A); MRR = Avg(A) / "
               f"the text backbone's Avg(T) ({given}).", ""]
        md += results_table(evals, backbone_text) + [""]
        diffs, against = paired_differences(eval_dirs), next(iter(eval_dirs))
        if diffs:
            atomic_write_bytes(out / "paired.png", plot_paired(against, diffs))
            md += paired_section(against, diffs) + ["![Paired differences with 95 % intervals](paired.png)", ""]
    for caption, name, note in figures:
        md += [f"## {caption}", "", f"![{caption}]({name})", ""] + ([note, ""] if note else [])
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "report.html", _html(md, out))
    return out / "report.md"


def _html(md: list[str], out: Path) -> str:
    """The markdown page as standalone HTML: tables as tables, images inlined as base64."""
    body, table = [], []

    def flush():
        if table:
            rows = [[c.strip() for c in l.strip("|").split("|")] for l in table if not set(l) <= set("|- ")]
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rest)
                        + "</table>")
            table.clear()

    for line in md:
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("### "):
            body.append(f"<h3>{_inline(line[4:])}</h3>")
        elif line.startswith("## "):
            body.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.startswith("!["):
            name = line[line.rindex("(") + 1 : -1]
            data = base64.b64encode((out / name).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}" style="max-width:100%">')
        elif line:
            body.append(f"<p>{_inline(line)}</p>")
    flush()
    style = "body{font-family:sans-serif;max-width:1000px;margin:2em auto}td,th{border:1px solid #ccc;padding:4px 8px}" \
            "table{border-collapse:collapse}td.n{text-align:right}code{background:#f3f3f3;padding:0 3px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>tars report</title><style>{style}</style></head>" \
           f"<body>{''.join(body)}</body></html>\n"


def _inline(text: str) -> str:
    """Markdown's `code` spans as <code>, the rest escaped: a reader should not see stray backticks."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)) if len(parts) % 2 else html.escape(text)


def _td(cell: str) -> str:
    """Numbers right-aligned, so a column's digits line up."""
    try:
        float(cell.lstrip("+"))
        return f"<td class='n'>{html.escape(cell)}</td>"
    except ValueError:
        return f"<td>{_inline(cell)}</td>"
