"""How the processes of a multi-process run share the model and the optimizer (`parallel` in the run
config; `auto` follows the `accelerate launch` config file, `configs/accelerate/*.yaml`).

* `ddp` — every process holds the whole model; the LoRA gradients are summed by hand
  (`Group.sum_grads`). The right choice whenever the model fits one device, as a 7B model in bf16 does
  on an 80 GB GPU.
* `fsdp` — torch FSDP2 (`fully_shard`) shards the frozen weights of every decoder block over the
  processes (the bulk of a 7B model: by parameter count ~77 % of Qwen2-Audio-7B, 32 blocks of
  ~0.2 B parameters out of ~8.4 B) and gathers a block for its forward and its
  backward. The LoRA stays whole on every process (ignored by FSDP: a few MB), so its gradients,
  optimizer and checkpoints are ddp's. Rollouts are generated with every block gathered: one
  all-gather per block per step instead of one per decoded token, and processes may then decode
  different numbers of tokens; generation thus needs ddp's memory, scoring and the update do not.
  Embeddings, LM head and speech encoder stay whole.
* `zero2` — DeepSpeed ZeRO stage 2: the optimizer state and the gradients of the trainable weights
  (the LoRA) are partitioned over the processes; the model is whole on each. With LoRA these are
  megabytes, so it saves little memory; it is here for setups built around DeepSpeed. Needs `pip install 'tars[deepspeed]'`.

fsdp and zero2 talk to the other processes inside every forward and backward, so every process must run
the same number of micro-batches: one with fewer questions (or, for sft/dpo, fewer targets) runs one of
its own again with weight zero (`lockstep`). ddp talks only at the update.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Sequence

import torch

from tars.errors import UserError
from tars.rl.distributed import Group

Parallel = Literal["auto", "ddp", "fsdp", "zero2"]


def launcher_choice() -> str:
    """What `accelerate launch`'s config file asked for, from the environment it sets for its workers."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage != "2":
            raise UserError(f"accelerate config: DeepSpeed ZeRO stage {stage} is not supported (tars runs ZeRO-2; "
                            "stage 3 shards the weights that generation reads directly: use configs/accelerate/fsdp.yaml)")
        return "zero2"
    return "ddp"


class DDP:
    """Whole model and optimizer on every process; gradients summed over processes at the update."""

    name = "ddp"
    lockstep = False

    def __init__(self, group: Group):
        self.group = group

    def prepare(self, backend, params: Sequence[torch.nn.Parameter], opt: torch.optim.Optimizer,
                grad_clip: float) -> None:
        self.params, self.opt, self.grad_clip = list(params), opt, grad_clip

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Around generation: every weight this process needs for a forward is local."""
        yield

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """One micro-batch's backward (`last`: the step's final one)."""
        loss.backward()

    def step(self) -> float:
        """Sum the gradients over processes, clip, update; returns the pre-clip gradient norm."""
        self.group.sum_grads(self.params)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        self.opt.step()
        return norm

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def optimizer_state(self) -> Any:
        """The optimizer's state for a checkpoint (every process calls it; the main one writes it)."""
        return self.opt.state_dict()

    def load_optimizer_state(self, state: Any) -> None:
        self.opt.load_state_dict(state)


class FSDP(DDP):
    name = "fsdp"
    lockstep = True

    def prepare(self, backend, params, opt, grad_clip) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        super().prepare(backend, params, opt, grad_clip)
        mesh = init_device_mesh(backend.device.type, (self.group.world,))
        lora = {id(p) for p in self.params}
        self.blocks = []
        for block in backend.decoder_layers():
            ignored = {p for p in block.parameters() if id(p) in lora}
            self.blocks.append(fully_shard(block, mesh=mesh, ignored_params=ignored))

    @contextmanager
    def gathered(self) -> Iterator[None]:
        for b in self.blocks:
            b.set_reshard_after_forward(False)
            b.unshard()
        try:
            yield
        finally:
            for b in self.blocks:
                b.reshard()
                b.set_reshard_after_forward(True)


class Zero2(DDP):
    name = "zero2"
    lockstep = True

    def prepare(self, backend, params, opt, grad_clip) -> None:
        try:
            import deepspeed
        except ImportError:
            raise UserError("parallel: zero2 needs DeepSpeed: pip install 'tars[deepspeed]'") from None
        super().prepare(backend, params, opt, grad_clip)
        config = {
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2, "contiguous_gradients": True},
            "gradient_clipping": grad_clip,
            # tars builds AdamW itself (LoRA weights in fp32 whatever the model's dtype).
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 62, "wall_clock_breakdown": False,
        }
        self.engine, self.zero, _, _ = deepspeed.initialize(model=backend, optimizer=opt, config=config)

    def backward(self, loss, last) -> None:
        # The loss is already normalised by the whole step's token count (every process's): the
        # processes' gradients must be summed, and ZeRO averages them.
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.group.world)

    def step(self) -> float:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()  # clips to `gradient_clipping`, updates, zeroes the gradients
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def zero_grad(self) -> None:
        self.zero.zero_grad(set_to_none=True)

    def optimizer_state(self) -> Any:
        # Each process holds its partition; a checkpoint keeps all of them, in rank order.
        return self.group.gather_lists([self.zero.state_dict()])

    def load_optimizer_state(self, state: Any) -> None:
        self.zero.load_state_dict(state, load_optimizer_states=True, load_from_fp32_weights=True)


def weight_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes of parameters this process holds, bytes of the whole model's): what fsdp saves."""
    from torch.distributed.tensor import DTensor

    here = whole = 0
    for p in module.parameters():
        whole += p.numel() * p.element_size()
        here += (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
    return here, whole


def make(choice: str, group: Group) -> DDP:
    """The strategy for `parallel` = `choice`; one process always runs ddp's plain path."""
    if not group.on:
        return DDP(group)
    name = launcher_choice() if choice == "auto" else choice
    return {"ddp": DDP, "fsdp": FSDP, "zero2": Zero2}[name](group)
