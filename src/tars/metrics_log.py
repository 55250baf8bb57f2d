"""A run's per-step metrics: `metrics.jsonl` (the record every tool reads) and TensorBoard events
(for watching a run live: `tensorboard --logdir RUN/tensorboard`).

On resume the JSONL is cut back to the checkpoint by the loop; TensorBoard is told the same with
`purge_step`, so the steps that run again are not drawn twice.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path


class MetricsLog:
    def __init__(self, out: Path, start_step: int = 0, tensorboard: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Always purge: a run killed before its first checkpoint restarts at step 0, and its old
            # events must go like its old metrics.jsonl.
            self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=start_step + 1)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, numbers.Real):
                    self.writer.add_scalar(k, float(v), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
