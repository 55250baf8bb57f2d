"""Data parallelism for the TARS loop: each process takes a share of a step's questions, and the
processes agree on everything that crosses questions — the loss normaliser, the LoRA gradients, the
logged metrics.

Started by `accelerate launch` (any of `configs/accelerate/*.yaml`) or torchrun: accelerate's
`PartialState` reads the launcher's environment and opens the process group (gloo on CPU, NCCL on
GPUs). How the processes hold the weights and the optimizer (ddp / fsdp / zero2) is
`rl/strategies.py`; this file is what all three share.

Equivalence with one process holds when every random draw is per question, not per batch: rollouts
are sampled with per-row seeds (`Backend.generate(row_seeds=…)`), references are drawn per question.
LoRA dropout masks are drawn per forward, so with `lora.dropout > 0` a split run equals a single one
in distribution, not bit for bit.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist


class Group:
    """This process's place among `world` processes (world 1: no process group, every call a no-op)."""

    def __init__(self) -> None:
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, end) of this rank's share of n items: contiguous, sizes differing by at most one."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return start, start + per + (self.rank < extra)

    def shard(self, items: Sequence[Any]) -> list[Any]:
        a, b = self.bounds(len(items))
        return list(items[a:b])

    def _device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo takes CPU ones.
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, value: float) -> float:
        if not self.on:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return float(t)

    def max(self, value: int) -> int:
        if not self.on:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def sum_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum each parameter's gradient over processes (a missing one counts as zero), in place."""
        if not self.on:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).to(device=self._device(), dtype=torch.float64) for p in params])
        dist.all_reduce(flat)
        i = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[i : i + n].view_as(p.grad))
            i += n

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a per-question tensor → every rank's rows, in rank order."""
        if not self.on:
            return t
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, t.detach().cpu())
        return torch.cat(parts, 0)

    def gather_lists(self, items: list[Any]) -> list[Any]:
        if not self.on:
            return items
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, items)
        return [x for p in parts for x in p]

    def barrier(self) -> None:
        if self.on:
            dist.barrier()


def start() -> Group:
    """Join the launcher's process group when there is one (accelerate launch / torchrun)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process loads the whole model, then fsdp shards the blocks (rl/strategies.py). accelerate's
        # FSDP launch turns on "CPU-RAM-efficient loading" by default, with which transformers 5.17 leaves
        # every process but the first holding zeros, for a broadcast from rank 0 that tars never does
        # (5.24 loads the weights on every process either way).
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        from accelerate import PartialState

        PartialState()
    return Group()
