"""The three multi-process strategies of `tars train` side by side: the same run under
`accelerate launch --config_file configs/accelerate/{ddp,fsdp,zero2}.yaml --num_processes 2`.

    .venv/bin/python benchmarks/parallel_strategies.py [--model mini:demo] [--steps 3] [--questions 2]

Each strategy trains the same model on the same questions for --steps steps (2 processes, one thread
each, gloo on CPU). Reported per strategy: the weights one process holds (what fsdp saves), the median
step time after the first step and its phases (rank 0's clock), and whether every logged metric equals
ddp's (all three compute the same update; the test suite checks it on a tiny model, this checks it on
a real one). On this 2-core CPU the times say what the strategies' communication costs where it is
cheapest to run them side by side, not what an 8-GPU node would see.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("generate", "score", "rewards", "update")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini:demo", help="model folder or mini:STAGE (default mini:demo, unpacked on first use)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--questions", type=int, default=2, help="questions per step (one per process)")
    ap.add_argument("--rollouts", type=int, default=2, help="speech and text rollouts per question")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--strategies", default="ddp,fsdp,zero2")
    args = ap.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies.split(","):
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / f"{name}.yaml"), "--num_processes", "2",
                   "-m", "tars.cli", "train", "--config", str(ROOT / "configs" / "mini.yaml"),
                   f"model={args.model}", f"out={out}", "data.file=null",
                   "data.families=[facts, comparison, arithmetic]", "data.n=16", f"steps={args.steps}",
                   f"questions_per_step={args.questions}", f"speech_rollouts={args.rollouts}",
                   f"text_rollouts={args.rollouts}", f"max_new_tokens={args.max_new_tokens}",
                   "save_merged=false", "tensorboard=false", "lora.dropout=0.0"]
            print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            held = re.search(r"held by this process: ([\d.,]+) of ([\d.,]+) MiB", done.stdout)
            metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
            rows[name] = (held.groups(), metrics)

    ref = "ddp" if "ddp" in rows else next(iter(rows))
    base = rows[ref][1]
    step = {}
    print(f"\n{'strategy':9} {'weights/process':>22} {'step s':>7} " + " ".join(f"{p:>9}" for p in PHASES)
          + f"  metrics = {ref}'s")
    for name, ((here, whole), metrics) in rows.items():
        timed = metrics[1:] or metrics
        med = lambda k: statistics.median(m[k] for m in timed)  # noqa: E731
        step[name] = med("time/step")
        worst = max(abs(a[k] - b[k]) for a, b in zip(base, metrics) for k in a if not k.startswith("time/"))
        print(f"{name:9} {here + ' / ' + whole + ' MiB':>22} {step[name]:7.2f} "
              + " ".join(f"{med('time/' + p):9.2f}" for p in PHASES) + f"  max |diff| {worst:.1e}")
    print("step time ratios: " + ", ".join(f"{n}/{ref} {step[n] / step[ref]:.3f}" for n in rows if n != ref))

if __name__ == "__main__":
    main()
