"""Peak memory of one TARS step on the mini model, each memory saving on and off, side by side.

    .venv/bin/python benchmarks/step_memory.py [--before REV] [--questions 2] [--rollouts 4] [--new-tokens 160]

Variants (each in a fresh process, one after the other, the same questions, rollouts forced to
--new-tokens tokens each so every variant backpropagates through the same sequences):

  before       the code at git revision REV (default: none), run from a temporary worktree
  joint        log-probs in chunks; both modalities' graphs alive until one backward (joint_groups=true)
  text_first   + text's forward and backward before speech's forward (the default order)
  checkpoint   + activation_checkpointing=true (the 7B recipes' setting)
  release      + release_memory=true (freed memory back to the OS at once: tars/host_memory.py)
  release_mb1  release_memory=true, one question per micro-batch, no checkpointing (prompts then
               scored once per question: what checkpointing rules out)

Per variant: one warm-up step, then --steps measured steps; the peak RSS of the process during the
measured steps (a 1 ms sampler thread) and its rise over the process before them, the process's
lifetime peak (`ru_maxrss`: the warm-up step included; glibc's heap rarely shrinks, so without
`release` the measured steps reuse what the warm-up grew), and the median step time and its phases.
Memory, not time, is what this benchmark is about: the times show what checkpointing's recompute
and `release`'s page faults cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PHASES = ("generate", "score", "rewards", "update")
VARIANTS = {
    "before": {},
    "joint": {"joint_groups": True},
    "text_first": {},
    "checkpoint": {"activation_checkpointing": True},
    "release": {"activation_checkpointing": True, "release_memory": True},
    "release_mb1": {"release_memory": True, "micro_batch_questions": 1},
}


def one_variant(args) -> None:
    import torch

    from forced_rollouts import force_lengths
    from mini_backend import PeakRSS
    from tars.config import validate
    from tars.data.sources import load_data
    from tars.rl.tars import TarsConfig, TarsTrainer

    torch.set_num_threads(args.threads)
    force_lengths(args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = validate(TarsConfig, dict(
            model=args.model, out=tmp, method="tars",
            data={"families": ["comparison", "facts", "units"], "n": args.questions, "seed": 11},
            steps=args.steps + 1, questions_per_step=args.questions, speech_rollouts=args.rollouts,
            text_rollouts=args.rollouts, max_new_tokens=args.new_tokens, lr=1e-12, warmup_frac=0.0,
            tensorboard=False, device="cpu", **VARIANTS[args.variant]))
        records, base_dir = load_data(cfg.data, "speech")
        trainer = TarsTrainer(cfg, cfg.steps)
        trainer.step(records, base_dir, 0)  # warm-up (and the encoder cache)
        rows = []
        with PeakRSS() as mem:
            for s in range(1, args.steps + 1):
                rows.append(trainer.step(records, base_dir, s))
    out = {p: statistics.median(r[f"time/{p}"] for r in rows) for p in PHASES}
    out["step"] = statistics.median(r["time/step"] for r in rows)
    out["rise_mb"] = mem.delta_mb
    out["peak_mb"] = mem.peak / 2**20
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["tokens"] = sum(r["speech/length"] + r["text/length"] for r in rows) / len(rows)
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini:demo", help="model folder or mini:STAGE/model")
    ap.add_argument("--before", help="git revision to measure as `before` (e.g. the commit before the change)")
    ap.add_argument("--variants", default="joint,text_first,checkpoint,release")
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=4, help="per modality")
    ap.add_argument("--new-tokens", type=int, default=160, help="every completion's length")
    ap.add_argument("--steps", type=int, default=1, help="measured steps per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return one_variant(args)

    variants = (["before"] if args.before else []) + args.variants.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        for v in variants:
            run_env = env
            if v == "before":
                tree = Path(tmp) / "before"
                subprocess.run(["git", "-C", str(HERE.parent), "worktree", "add", "-q", "--detach", str(tree),
                                args.before], check=True)
                run_env = {**env, "PYTHONPATH": str(tree / "src")}
            cmd = [sys.executable, __file__, "--variant", v, "--model", args.model, "--questions",
                   str(args.questions), "--rollouts", str(args.rollouts), "--new-tokens", str(args.new_tokens),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env)
            if v == "before":
                subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force", str(tree)])
            if proc.returncode != 0:
                sys.exit(f"{v} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[7:])
            results[v] = row
            print(f"{v:11s} peak RSS {row['peak_mb']:7.0f} MB (lifetime {row['maxrss_mb']:7.0f}), step's rise "
                  f"{row['rise_mb']:6.0f} MB; step "
                  f"{row['step']:6.2f} s (" + ", ".join(f"{p} {row[p]:.2f}" for p in PHASES) + ")", flush=True)
    base = results["before"] if "before" in results else results[variants[0]]
    name = "before" if "before" in results else variants[0]
    for v, row in results.items():
        print(f"{v:11s} vs {name}: peak {base['peak_mb'] / row['peak_mb']:.2f}x lower (lifetime "
              f"{base['maxrss_mb'] / row['maxrss_mb']:.2f}x), "
              f"rise {base['rise_mb'] / max(row['rise_mb'], 1):.2f}x lower, step time {row['step'] / base['step']:.2f}x")


if __name__ == "__main__":
    main()
