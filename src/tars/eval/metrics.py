"""Metrics over predictions: pure functions over plain rows, so they are tested on hand-made data.

A prediction row: `{"dataset", "modality", "id", "subject", "answer", "pred" (letter | None),
"format" (format_score), "n_options", ...}`. Unparseable answers (`pred` None) count as wrong, never as
a guess, and are reported separately.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable


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
