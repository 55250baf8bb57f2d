"""What TARS costs on top of standard GRPO: the same batch, model and rollouts, method=tars vs method=grpo.

    .venv/bin/python benchmarks/step_overhead.py [--model mini:demo] [--questions 2] [--rollouts 4]

TARS adds R_rep (per-layer pooled hidden states, taken by hooks from the forward that already gives
the log-probs: no extra pass) and R_beh (a sentence-embedding model over every completion). Each
variant runs in a fresh process (so neither reuses memory the other freed): one warm-up step, then
--steps timed steps on the same questions, with a learning rate of 1e-12 so both methods sample the
same rollouts at every step (the policy does not move). Variants alternate for --rounds rounds so that
load from other processes hits both alike; reported: the median step time and its phases, and the
process's peak RSS during the timed steps (a 1 ms sampler thread), whole and as the increase over the
loaded process. The last line is the ratio of the two, peak memory as the whole process's (weights,
the sentence-embedding model of R_beh, activations) — the quantity a GPU's memory limit is about.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

PHASES = ("generate", "score", "rewards", "update")


def one_variant(args) -> None:
    import torch

    from mini_backend import PeakRSS
    from tars.config import validate
    from tars.data.sources import load_data
    from tars.rl.tars import TarsConfig, TarsTrainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = validate(TarsConfig, dict(
            model=args.model, out=tmp, method=args.variant,
            data={"families": ["comparison", "facts", "units"], "n": args.questions, "seed": 11},
            steps=args.steps + 1, questions_per_step=args.questions, speech_rollouts=args.rollouts,
            text_rollouts=args.rollouts, max_new_tokens=args.new_tokens, lr=1e-12, warmup_frac=0.0,
            lora={"dropout": 0.0}, tensorboard=False, device="cpu"))
        records, base_dir = load_data(cfg.data, "speech")
        trainer = TarsTrainer(cfg, cfg.steps)
        trainer.step(records, base_dir, 0)  # warm-up (and the encoder cache)
        rows = []
        with PeakRSS() as mem:
            for s in range(1, args.steps + 1):
                rows.append(trainer.step(records, base_dir, s))
    out = {p: statistics.median(r[f"time/{p}"] for r in rows) for p in PHASES}
    out["step"] = statistics.median(r["time/step"] for r in rows)
    out["peak_mb"] = mem.delta_mb
    out["peak_total_mb"] = mem.peak / 2**20
    out["tokens"] = sum(r["speech/length"] + r["text/length"] for r in rows) / len(rows)
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini:demo", help="model folder or mini:STAGE/model")
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=4, help="per modality")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", choices=["tars", "grpo"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return one_variant(args)

    results: dict[str, list[dict]] = {"grpo": [], "tars": []}
    for r in range(args.rounds):
        for variant in ("grpo", "tars"):
            cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--questions",
                   str(args.questions), "--rollouts", str(args.rollouts), "--new-tokens", str(args.new_tokens),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[7:])
            results[variant].append(row)
            print(f"round {r + 1} {variant:4s}: step {row['step']:.2f} s ("
                  + ", ".join(f"{p} {row[p]:.2f}" for p in PHASES) + f"), peak RSS {row['peak_total_mb']:.0f} MB (+{row['peak_mb']:.0f} MB over the loaded process)",
                  flush=True)
    med = {v: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for v, rows in results.items()}
    g, t = med["grpo"], med["tars"]
    learn = lambda m: m["score"] + m["rewards"] + m["update"]  # noqa: E731  (what the methods change)
    print(f"score+rewards+update: tars {learn(t):.2f} s vs grpo {learn(g):.2f} s = {learn(t) / learn(g):.3f}x")
    print(f"tars/grpo step time ratio: {t['step'] / g['step']:.3f}, peak memory ratio: "
          f"{t['peak_total_mb'] / g['peak_total_mb']:.3f}")


if __name__ == "__main__":
    main()
