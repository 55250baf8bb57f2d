"""Generation time of one TARS step's rollouts on the mini model: the code before a revision vs now,
speech and text decoded apart vs in one batch.

    .venv/bin/python benchmarks/rollouts.py [--before REV] [--questions 2] [--rollouts 4] [--new-tokens 160]
        [--compiled] [--only paired,static] [--threads 2]

Variants, each in a fresh process, alternating over --rounds rounds (this machine is noisy):

  before     `generate` at git revision REV: each prompt prefilled once per sample, speech and text
             decoded in two passes (run from a temporary worktree)
  separate   now: one prefill per prompt, its KV cache repeated for the samples; two passes
  paired     now: `generate_paired`, speech and text rows in one decode batch (what `tars train` does)
  static     paired with a static KV cache (`decode_cache=static`: preallocated, every row to the end)
  compiled   static + `torch.compile` of the decode step (`compile_decode=true`; --compiled only, the
             compile itself is excluded: it happens in the warm-up pass)

The same questions, temperature 1 and per-row seeds: every variant samples the same tokens (checked:
each variant prints a digest of its completions, and the token count), so the times compare like with
like. `static` / `compiled` may differ from `paired` by a draw that float round-off puts across a token
boundary (on mini:demo one row of 16 at 64 tokens; docs/performance.md): same count, another digest.
`--only paired,static` runs just those variants (a loaded machine: add `--threads 1`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one_variant(args) -> None:
    import torch

    from tars.data.sources import DataConfig, load_data
    from tars.models.loading import load_backend

    try:
        from tars.models.backend import DecodeOptions
    except ImportError:  # a --before revision without it runs only `separate`
        DecodeOptions = None
    torch.set_num_threads(args.threads)
    records, base_dir = load_data(DataConfig(families=["comparison", "facts", "units", "arithmetic"],
                                             n=args.questions, seed=11), "speech")
    be = load_backend(args.model)
    G = args.rollouts
    seeds = {m: [int(hashlib.sha1(f"{m}:{r.id}:{g}".encode()).hexdigest()[:15], 16) for r in records
                 for g in range(G)] for m in ("speech", "text")}
    times, digest, tokens = [], None, 0
    for rep in range(args.repeat + 1):
        prompts = {"speech": be.build_inputs(records, "speech", base_dir=base_dir),
                   "text": be.build_inputs(records, "text")}
        t0 = time.perf_counter()
        if args.variant in ("paired", "static", "compiled"):
            decode = DecodeOptions("dynamic" if args.variant == "paired" else "static", args.variant == "compiled")
            gens = be.generate_paired([(prompts[m], G, seeds[m]) for m in ("speech", "text")], 1.0, 1.0,
                                      args.new_tokens, logprobs=True, decode=decode)
        else:
            gens = [be.generate(prompts[m], G, 1.0, 1.0, args.new_tokens, row_seeds=seeds[m], logprobs=True)
                    for m in ("speech", "text")]
        if rep:  # the first pass warms up (and fills the encoder cache)
            times.append(time.perf_counter() - t0)
        ids = [r for g in gens for r in g.token_ids]
        digest = hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:10]
        tokens = sum(len(r) for r in ids)
    print("RESULT " + json.dumps({"seconds": statistics.median(times), "digest": digest, "tokens": tokens}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini:demo")
    ap.add_argument("--before", help="git revision to measure as `before`")
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=4, help="per modality")
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--repeat", type=int, default=2, help="timed generations per process")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compiled", action="store_true", help="also time the compiled static decode")
    ap.add_argument("--only", help="comma-separated variants to run (e.g. paired,static), in this order")
    ap.add_argument("--variant", choices=["before", "separate", "paired", "static", "compiled"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return one_variant(args)
    variants = (["before"] if args.before else []) + ["separate", "paired", "static"] + (["compiled"] if args.compiled else [])
    if args.only:
        variants = [v.strip() for v in args.only.split(",")]
        known = ("before", "separate", "paired", "static", "compiled")
        if any(v not in known for v in variants) or ("before" in variants and not args.before):
            sys.exit(f"--only: unknown variant or `before` without --before: {args.only}")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        if args.before:
            subprocess.run(["git", "-C", str(HERE.parent), "worktree", "add", "-q", "--detach", str(tree),
                            args.before], check=True)
        try:
            for r in range(args.rounds):
                for v in variants:
                    env = dict(os.environ)
                    if v == "before":
                        env["PYTHONPATH"] = str(tree / "src")
                    cmd = [sys.executable, __file__, "--variant", "separate" if v == "before" else v,
                           "--model", args.model, "--questions", str(args.questions), "--rollouts",
                           str(args.rollouts), "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat),
                           "--threads", str(args.threads)]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if proc.returncode != 0:
                        sys.exit(f"{v} failed:\n{proc.stderr[-3000:]}")
                    row = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[7:])
                    results[v].append(row)
                    print(f"round {r + 1} {v:8s}: {row['seconds']:.2f} s for {row['tokens']} tokens "
                          f"({row['tokens'] / row['seconds']:.1f} tok/s), completions {row['digest']}", flush=True)
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force", str(tree)])
    med = {v: statistics.median(x["seconds"] for x in rows) for v, rows in results.items()}
    base = "before" if "before" in variants else "separate" if "separate" in variants else variants[0]
    for v in variants:
        print(f"{v:8s} median {med[v]:.2f} s; {base}/{v} = {med[base] / med[v]:.2f}x")


if __name__ == "__main__":
    main()
