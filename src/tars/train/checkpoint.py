"""Resumable supervised loops: the learning-rate schedule, and atomic checkpoints of the trained
parameters, optimizer, scheduler and RNG state.

A run killed at any moment restarts from its newest checkpoint; the metrics lines of steps after it are
dropped, since those steps run again (their data order is a function of seed and epoch alone).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Callable

import torch

from tars.atomic import atomic_write_bytes, atomic_write_text
from tars.errors import UserError


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    return lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def save_checkpoint(out: Path, step: int, params, opt, sched) -> None:
    buf = io.BytesIO()
    torch.save({"step": step, "params": [p.detach().clone() for p in params], "opt": opt.state_dict(),
                "sched": sched.state_dict(), "rng": torch.get_rng_state()}, buf)
    atomic_write_bytes(out / "checkpoint.pt", buf.getvalue())


def resume(out: Path, params, opt, sched) -> int:
    """The step to start from: 0 for a fresh run (an old metrics file is removed), else the checkpoint's."""
    ck = out / "checkpoint.pt"
    if not ck.exists():
        (out / "metrics.jsonl").unlink(missing_ok=True)
        return 0
    state = torch.load(ck, map_location="cpu", weights_only=False)
    saved = [tuple(v.shape) for v in state["params"]]
    if saved != [tuple(p.shape) for p in params]:
        raise UserError(f"{ck}: saved by a run with other trainable shapes (did the config change?); "
                        "remove it or choose another `out`")
    with torch.no_grad():
        for p, v in zip(params, state["params"]):
            p.copy_(v)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["rng"])
    log = out / "metrics.jsonl"
    if log.exists():
        rows = [l for l in log.read_text().splitlines() if step_of(l) <= state["step"]]
        atomic_write_text(log, "".join(r + "\n" for r in rows))
    print(f"resuming {out} from step {state['step']}")
    return int(state["step"])


def step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def open_stage(cfg) -> tuple[Path, bool]:
    """A supervised stage's folder (`cfg.out` resolved, created) and whether the stage already finished;
    an unfinished one gets its resolved config (with package versions) written beside it."""
    from tars.config import save_config
    from tars.paths import resolve

    if getattr(cfg, "threads", None):
        torch.set_num_threads(cfg.threads)
    out = resolve(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "model" / "config.json").exists():
        print(f"{out / 'model'} exists: stage already finished")
        return out, True
    save_config(cfg, out)
    return out, False


def finish_stage(backend, out: Path, total: int) -> Path:
    """Save the trained model as `out/model`, drop the checkpoint, mark the stage DONE."""
    from tars.quiet import hf_progress_off

    backend.eval()
    with hf_progress_off():
        backend.save_pretrained(out / "model")
    (out / "checkpoint.pt").unlink(missing_ok=True)
    atomic_write_text(out / "DONE", f"{total} steps\n")
    return out / "model"
