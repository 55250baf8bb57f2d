"""`tars eval` throughput on the mini model: length-sorted batches vs one question at a time.

    .venv/bin/python benchmarks/eval_throughput.py [--model mini:demo] [--n 64] [--modality text]

The same questions (the first --n held-out synthetic items), greedy, through `run_eval` itself into
fresh folders: one at a time, fixed batches of --batch, then continuous batching with --batch slots
(`tars eval`'s default); questions per second and the ratios side by side. Greedy
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
    ap.add_argument("--model", default="mini:demo")
    ap.add_argument("--data", default="mini:heldout")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="slots (tars eval's default)")
    ap.add_argument("--modality", default="text", choices=["text", "speech"])
    ap.add_argument("--max-new-tokens", type=int, default=192)
    args = ap.parse_args()

    from tars.eval.evaluate import EvalConfig, run_eval

    rates, preds = {}, {}
    runs = {"one": (1, False), "fixed": (args.batch, False), "continuous": (args.batch, True)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (bs, continuous) in runs.items():
            out = Path(tmp) / name
            cfg = EvalConfig(model=args.model, data=[args.data], out=str(out), modalities=[args.modality],
                             limit=args.n, batch_size=bs, max_new_tokens=args.max_new_tokens, continuous=continuous)
            t = time.perf_counter()
            run_eval(cfg, progress=False)
            dt = time.perf_counter() - t
            rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
            preds[name] = {r["id"]: r["pred"] for r in rows}
            rates[name] = len(rows) / dt
            print(f"{name:>10} (batch {bs:3d}): {len(rows)} questions in {dt:6.1f} s = {rates[name]:.2f} q/s",
                  flush=True)
    for name in ("fixed", "continuous"):
        differ = sum(preds["one"][k] != preds[name][k] for k in preds["one"])
        print(f"predictions of {name} batches that differ from one at a time: {differ} of {len(preds['one'])}")
    print(f"fixed batches of {args.batch} vs one at a time: {rates['fixed'] / rates['one']:.2f}x questions/s")
    print(f"eval batched ({args.batch}, continuous: the default) vs one at a time: "
          f"{rates['continuous'] / rates['one']:.2f}x questions/s")


if __name__ == "__main__":
    main()
