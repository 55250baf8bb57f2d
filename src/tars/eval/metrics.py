"""Metrics over predictions: pure functions over plain rows, so they are tested on hand-made data.

A prediction row: `{"dataset", "modality", "id", "subject", "answer", "pred" (letter | None),
"format" (format_score), "n_options", ...}`. Unparseable answers (`pred` None) count as wrong, never as
a guess, and are reported separately.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable


def summarize(rows: Iterable[dict]) -> dict:
    """Per dataset and modality: n, accuracy, unparseable rate, strict-format rate, chance level (%);
    per dataset: gap = text − speech accuracy (points); and the unweighted averages over datasets."""
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
    avg: dict[str, float] = {}
    for mod in ("speech", "text"):
        accs = [d[mod]["accuracy"] for d in out["datasets"].values() if mod in d]
        if accs:
            avg[mod] = sum(accs) / len(accs)
    for ds, d in out["datasets"].items():
        if "speech" in d and "text" in d:
            d["gap"] = d["text"]["accuracy"] - d["speech"]["accuracy"]
    out["average"] = avg
    if "speech" in avg and "text" in avg:
        out["gap"] = avg["text"] - avg["speech"]
    return out
