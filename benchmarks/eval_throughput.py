"""`tars eval` throughput on the mini model: length-sorted batches vs one question at a time.

    .venv/bin/python benchmarks/eval_throughput.py [--model mini:ctc/model] [--n 32] [--modality text]

The same questions (the first --n held-out synthetic items), greedy, through `run_eval` itself into
fresh folders: batch size 1, then --batch; questions per second and the ratio side by side. Greedy
answers must not depend on the batch, so the script also reports how many predictions differ (ties
and padding round-off can flip a few tokens; a large number would mean a bug).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini:ctc/model")
    ap.add_argument("--data", default="runs/heldout.jsonl")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--modality", default="text", choices=["text", "speech"])
    ap.add_argument("--max-new-tokens", type=int, default=192)
    args = ap.parse_args()

    from tars.eval.evaluate import EvalConfig, run_eval

    rates, preds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for bs in (1, args.batch):
            out = Path(tmp) / f"b{bs}"
            cfg = EvalConfig(model=args.model, data=[args.data], out=str(out), modalities=[args.modality],
                             limit=args.n, batch_size=bs, max_new_tokens=args.max_new_tokens)
            t = time.perf_counter()
            run_eval(cfg, progress=False)
            dt = time.perf_counter() - t
            rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
            preds[bs] = {r["id"]: r["pred"] for r in rows}
            rates[bs] = len(rows) / dt
            print(f"batch {bs:3d}: {len(rows)} questions in {dt:6.1f} s = {rates[bs]:.2f} q/s", flush=True)
    differ = sum(preds[1][k] != preds[args.batch][k] for k in preds[1])
    print(f"predictions that differ between batch 1 and {args.batch}: {differ} of {len(preds[1])}")
    print(f"eval batched ({args.batch}) vs one at a time: {rates[args.batch] / rates[1]:.2f}x questions/s")


if __name__ == "__main__":
    main()
