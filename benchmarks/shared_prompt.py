"""Prefix sharing in `Backend.score`: the training step's grad-enabled scoring with each prompt run once
per question (`share_prompt=True`) against once per completion row (`share_prompt=False`), side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shared_prompt.py [--model mini:soft] [--questions 4]
        [--rollouts 4] [--new-tokens 80] [--repeats 2] [--threads 1]

Variants (each in a fresh process, one after the other, the same inputs):

  unshared   one decoder forward over prompt + completion per row: each prompt runs --rollouts times
  shared     the prompts once, then the completions against their prompt's KV cache

Both load the model with the trainer's LoRA (default settings: r 8, dropout 0.05, train mode around the
forward as in the step), take the first --questions questions of mini:rl_train, and per modality (text,
then speech, the step's order) score --rollouts completions per question with grad, entropies and every
decoder layer pooled (what tars's R_rep asks), then run that modality's backward before the next one's
forward. The completions are --new-tokens ordinary tokens drawn at random once (the last one a stop
token), the same in both variants: the cost of scoring depends on the lengths only, and no generation
is timed. Per repeat, score and backward times summed over both modalities; the median over
--repeats, and the process's peak RSS during them (a 1 ms sampler) and over its lifetime (ru_maxrss).
With the defaults it runs about 6 minutes at one thread on a 2-core machine (the unshared variant
two thirds of it) and peaks near 17 GB RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = {"unshared": False, "shared": True}
MODALITIES = ("text", "speech")


def one_variant(args) -> None:
    import torch

    from mini_backend import PeakRSS
    from tars.data.sources import DataConfig, load_data
    from tars.models.loading import load_backend
    from tars.models.lora import LoraSettings, add_lora

    torch.set_num_threads(args.threads)
    be = load_backend(args.model)
    torch.manual_seed(0)
    add_lora(be, LoraSettings())
    records, base_dir = load_data(DataConfig(file="mini:rl_train"), "speech")
    records = records[: args.questions]
    prompts = {m: be.build_inputs(records, m, base_dir=base_dir) for m in MODALITIES}
    special = torch.tensor(sorted(set(be.tokenizer.all_special_ids)))
    ordinary = torch.tensor([t for t in range(len(be.tokenizer)) if t not in set(special.tolist())])
    g = torch.Generator().manual_seed(0)
    rows = args.questions * args.rollouts
    comps = ordinary[torch.randint(len(ordinary), (rows, args.new_tokens - 1), generator=g)].tolist()
    comps = [c + [be.stop_token_ids[0]] for c in comps]
    index = [q for q in range(args.questions) for _ in range(args.rollouts)]
    layers = list(range(1, len(be.decoder_layers()) + 1))

    score_s, backward_s = [], []
    with PeakRSS() as mem:
        for rep in range(args.repeats):
            torch.manual_seed(rep)
            t_score = t_backward = 0.0
            for m in MODALITIES:
                be.train()
                t0 = time.perf_counter()
                sc = be.score(prompts[m], comps, index, layers, grad=True, entropy=True,
                              share_prompt=VARIANTS[args.variant])
                t1 = time.perf_counter()
                be.eval()
                sc.logprobs.sum().backward()
                t2 = time.perf_counter()
                t_score, t_backward = t_score + t1 - t0, t_backward + t2 - t1
                del sc
            score_s.append(t_score)
            backward_s.append(t_backward)
    out = {"score": statistics.median(score_s), "backward": statistics.median(backward_s),
           "total": statistics.median(a + b for a, b in zip(score_s, backward_s)),
           "repeats": [round(a + b, 2) for a, b in zip(score_s, backward_s)],
           "peak_mb": mem.peak / 2**20, "rise_mb": mem.delta_mb,
           "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "prompt_lengths": {m: prompts[m].lengths for m in MODALITIES}}
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini:soft", help="model folder or mini:STAGE")
    ap.add_argument("--variants", default="unshared,shared")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--rollouts", type=int, default=4, help="completions per question and modality")
    ap.add_argument("--new-tokens", type=int, default=80, help="every completion's length")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return one_variant(args)

    variants = args.variants.split(",")
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for v in variants:
        cmd = [sys.executable, __file__, "--variant", v, "--model", args.model, "--questions", str(args.questions),
               "--rollouts", str(args.rollouts), "--new-tokens", str(args.new_tokens), "--repeats",
               str(args.repeats), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{v} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[7:])
        results[v] = row
        if len(results) == 1:
            print("prompt lengths: " + ", ".join(f"{m} {row['prompt_lengths'][m]}" for m in MODALITIES))
        print(f"{v:9s} score {row['score']:6.2f} s + backward {row['backward']:6.2f} s = {row['total']:6.2f} s "
              f"(repeats {row['repeats']}); peak RSS {row['peak_mb']:6.0f} MB (lifetime {row['maxrss_mb']:6.0f}, "
              f"rise {row['rise_mb']:5.0f})", flush=True)
    base_name = variants[0]
    base = results[base_name]
    for v, row in results.items():
        if v == base_name:
            continue
        print(f"{v} vs {base_name}: score {row['score'] / base['score']:.2f}x, backward "
              f"{row['backward'] / base['backward']:.2f}x, total {row['total'] / base['total']:.2f}x the time; "
              f"peak RSS {row['peak_mb'] / base['peak_mb']:.2f}x, rise {row['rise_mb'] / max(base['rise_mb'], 1):.2f}x")


if __name__ == "__main__":
    main()
