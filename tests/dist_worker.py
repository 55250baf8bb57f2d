"""One TARS run on a tiny model with lively rollouts, for the multi-process equivalence test:
`python dist_worker.py MODEL OUT` alone, or under `accelerate launch --num_processes 2`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from lively import make_lively  # noqa: E402
from tars.config import validate  # noqa: E402
from tars.rl.tars import TarsConfig, run  # noqa: E402

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    make_lively(setattr)
    cfg = validate(TarsConfig, dict(
        model=sys.argv[1], out=sys.argv[2], method="tars", data={"families": ["facts", "comparison"], "n": 8, "seed": 5},
        steps=2, questions_per_step=4, speech_rollouts=3, text_rollouts=3, max_new_tokens=6, lr=1e-4,
        warmup_frac=0.0, seed=3, lora={"dropout": 0.0}, save_merged=False, tensorboard=False, device="cpu"))
    from tars.rl.distributed import start

    print(f"world {start().world}", flush=True)
    run(cfg, progress=False)
