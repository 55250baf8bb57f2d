"""Metrics over predictions: pure functions over plain rows, so they are tested on hand-made data.

A prediction row: `{"dataset", "modality", "id", "subject", "answer", "pred" (letter | None),
"format" (format_score), "n_options", ...}`. Unparseable answers (`pred` None) count as wrong, never as
a guess, and are reported separately.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence


def mrr(avg_speech: float, backbone_text: float) -> float:
    """Modality Recovery Rate (DESIGN §3): the model's average speech accuracy as a share (%) of the
    ORIGINAL text backbone's average text accuracy — not the trained model's own text accuracy, so
    it can exceed 100 %."""
    if backbone_text <= 0:
        raise ValueError(f"backbone text accuracy must be > 0, got {backbone_text}")
    return 100.0 * avg_speech / backbone_text


def summarize(rows: Iterable[dict], backbone_text: float | None = None) -> dict:
    """Per dataset and modality: n, accuracy, unparseable rate, strict-format rate, chance level (%),
    and accuracy per subject where rows have one; per dataset: gap = text − speech accuracy (points);
    the unweighted averages over datasets; and MRR when `backbone_text` (the text backbone's average
    text accuracy, %) is given."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["modality"])].append(r)
    out: dict = {"datasets": {}}
    for (ds, mod), rs in sorted(groups.items()):
        n = len(rs)
        out["datasets"].setdefault(ds, {})[mod] = {
            "n": n,
            "accuracy": 100.0 * sum(r["pred"] == r["answer"] for r in rs) / n,
            "unparseable": 100.0 * sum(r["pred"] is None for r in rs) / n,
            "format": 100.0 * sum(r["format"] == 1.0 for r in rs) / n,
            "chance": 100.0 * sum(1.0 / r["n_options"] for r in rs) / n,
        }
        by_subject: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            if r.get("subject"):
                by_subject[r["subject"]].append(r)
        if by_subject:
            out["datasets"][ds][mod]["subjects"] = {
                subj: {"n": len(x), "accuracy": 100.0 * sum(r["pred"] == r["answer"] for r in x) / len(x)}
                for subj, x in sorted(by_subject.items())}
    avg: dict[str, float] = {}
    for mod in ("speech", "text", "cascade"):
        accs = [d[mod]["accuracy"] for d in out["datasets"].values() if mod in d]
        if accs:
            avg[mod] = sum(accs) / len(accs)
    for ds, d in out["datasets"].items():
        if "speech" in d and "text" in d:
            d["gap"] = d["text"]["accuracy"] - d["speech"]["accuracy"]
    out["average"] = avg
    if "speech" in avg and "text" in avg:
        out["gap"] = avg["text"] - avg["speech"]
    if backbone_text is not None and "speech" in avg:
        out["backbone_text"] = backbone_text
        out["mrr"] = mrr(avg["speech"], backbone_text)
    return out


def backbone_text_accuracy(arg: str) -> float:
    """`--backbone-text`: a number (%), or an earlier `tars eval` folder whose average text accuracy is
    the backbone's."""
    import json
    from pathlib import Path

    from tars.errors import UserError

    try:
        value = float(arg)
    except ValueError:
        f = Path(arg) / "metrics.json"
        if not f.exists():
            raise UserError(f"--backbone-text {arg}: neither a number nor an eval folder with metrics.json") from None
        try:
            value = float(json.loads(f.read_text())["average"]["text"])
        except (KeyError, ValueError, TypeError, json.JSONDecodeError):
            raise UserError(f"{f}: has no average text accuracy (was text evaluated?)") from None
    if not 0 < value <= 100:
        raise UserError(f"--backbone-text: {value} is not an accuracy in (0, 100]")
    return value


def paired_bootstrap(base: Sequence[float], other: Sequence[float], n_boot: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """The mean of `other − base` over the same questions (each a 0/1 correctness, or any score) and its
    percentile bootstrap interval: questions are resampled with replacement, pairs kept together, so the
    interval reflects how much of the difference the particular questions could explain. Paired, it is
    much narrower than two separate accuracies' intervals when the models agree on most questions."""
    import numpy as np

    if len(base) != len(other) or not base:
        raise ValueError(f"need two equal, non-empty lists of paired scores (got {len(base)} and {len(other)})")
    d = np.asarray(other, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


def correct_by_question(rows: Iterable[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (dataset, modality), each question id's correctness (1.0 or 0.0): the unit every paired
    comparison resamples."""
    out: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in rows:
        out[(r["dataset"], r["modality"])][r["id"]] = float(r["pred"] is not None and r["pred"] == r["answer"])
    return out


def mean_correct_by_question(runs: Sequence[Iterable[dict]]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (dataset, modality), each question's correctness averaged over `runs` (the predictions of one
    method's seeds: 0, ½ or 1 for two), over the questions every run answered. Comparing methods on these
    averages pools their seeds question by question instead of picking one run of each."""
    per: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rows in runs:
        for key, ids in correct_by_question(rows).items():
            for i, c in ids.items():
                per[key][i].append(c)
    return {key: {i: sum(v) / len(v) for i, v in ids.items() if len(v) == len(runs)} for key, ids in per.items()}


def paired_accuracy_differences(base: Iterable[dict], other: Iterable[dict], **kw) -> dict[tuple[str, str], dict]:
    """Per (dataset, modality) that both prediction sets hold: accuracy of `other` minus `base` in points
    over the questions both answered (matched by id), with its 95 % paired bootstrap interval."""
    return paired_correct_differences(correct_by_question(base), correct_by_question(other), **kw)


def paired_correct_differences(base: dict[tuple[str, str], dict[str, float]],
                               other: dict[tuple[str, str], dict[str, float]], **kw) -> dict[tuple[str, str], dict]:
    """`paired_accuracy_differences` over per-question correctness already computed
    (`correct_by_question`, or `mean_correct_by_question` for several seeds)."""
    result = {}
    for key in sorted(base.keys() & other.keys()):
        ids = sorted(base[key].keys() & other[key].keys())
        if ids:
            mean, lo, hi = paired_bootstrap([base[key][i] for i in ids], [other[key][i] for i in ids], **kw)
            result[key] = {"n": len(ids), "diff": 100 * mean, "lo": 100 * lo, "hi": 100 * hi}
    return result
