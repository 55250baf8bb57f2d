"""One TARS run on a tiny model with lively rollouts, for the multi-process equivalence test:
`python dist_worker.py MODEL OUT [key=value ...]` alone, or under `accelerate launch --num_processes 2`.

3 questions per step over 2 processes (2 + 1) in micro-batches of 1: the processes run different
numbers of micro-batches, which the lockstep strategies (fsdp, zero2) must even out.
With TARS_TEST_EXIT_AFTER_CHECKPOINT=1 every process stops right after the first checkpoint, as a
killed run would (the resume test)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from lively import make_lively  # noqa: E402
from tars.config import parse_overrides, validate  # noqa: E402
from tars.rl.tars import TarsConfig, run  # noqa: E402

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    make_lively(setattr)
    cfg = validate(TarsConfig, {**dict(
        model=sys.argv[1], out=sys.argv[2], method="tars", data={"families": ["facts", "comparison"], "n": 8, "seed": 5},
        steps=2, questions_per_step=3, micro_batch_questions=1, speech_rollouts=3, text_rollouts=3, max_new_tokens=6, lr=1e-4,
        warmup_frac=0.0, seed=3, lora={"dropout": 0.0}, save_merged=False, tensorboard=False, device="cpu"),
        **parse_overrides(sys.argv[3:])})
    from tars.rl.distributed import start

    print(f"world {start().world}", flush=True)
    if os.environ.get("TARS_TEST_EXIT_AFTER_CHECKPOINT"):
        import tars.rl.tars as tars_mod

        save = tars_mod._save_checkpoint

        def save_and_stop(*a, **k):
            save(*a, **k)
            os._exit(0)

        tars_mod._save_checkpoint = save_and_stop
    run(cfg, progress=False)
