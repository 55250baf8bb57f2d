"""Projector alignment by knowledge distillation: the LLM's own text-conditioned predictions teach the
projector what speech should make it predict.

Stage b of the mini model, third design (`tars mini kd`). The CTC projector (train/ctc.py) made speech
work, but by handing the LLM near-exact token embeddings: speech- and text-conditioned states agree at
every layer (cosine ≥ 0.987), which leaves a representation reward nothing to close. This stage gives
the LLM continuous features instead — a `SoftCTCProjector`, one embedding per stacked frame, initialised
from the trained CTC projector — and aligns them the way real Speech LLMs are aligned: the frozen LLM,
shown the *text* prompt and a gold chain of thought, gives a next-token distribution at every
completion position (the teacher); shown the *speech* prompt and the same completion, it should give the
same distributions (the student). By default only the projector trains, so the text condition — the
backbone's accuracy — is untouched by construction. A projector is frame-wise, and a frozen LLM cannot
learn to read a frame-rate sequence of soft tokens and blanks; with `lora` set, a LoRA on the LLM
trains beside it on the speech prompt (the teacher runs with the adapters off, so it stays the original
LLM) and is merged into the LLM at the end — a speech LoRA merged into the LLM, as Speech LLMs are
usually aligned. Then the text condition changes too, and must be measured again.

Loss per completion token (Hinton et al.'s distillation, temperature τ):

    L_kd = τ² · KL( softmax(z_text / τ) ‖ softmax(z_speech / τ) )

plus `ce_weight` × the gold token's NLL under the speech prompt. The last `val_n` items never train: the
KD loss and the student/teacher top-1 agreement on them are logged every `val_every` steps and at the
end. Resumable like every stage (atomic checkpoints; data order a function of seed and epoch).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Literal, Sequence

import torch
from pydantic import Field
from torch import Tensor
from torch.nn import functional as F

from tars.config import Config
from tars.data.schema import Record
from tars.data.sources import DataConfig, load_data
from tars.errors import UserError
from tars.train.checkpoint import finish_stage, open_stage, resume, save_checkpoint, warmup_cosine
from tars.models.lora import LoraSettings, adapters_disabled, add_lora, merge_lora
from tars.train.supervised import sft_target


class KDConfig(Config):
    model: str
    out: str
    data: DataConfig = DataConfig()
    #: `soft_ctc`: turn the model's CTC projector into a `SoftCTCProjector` first (`from_ctc`);
    #: `keep`: train the model's projector as it is (a soft projector from an earlier run).
    init: Literal["soft_ctc", "keep"] = "soft_ctc"
    #: A LoRA on the LLM trained beside the projector and merged at the end (None: projector only).
    lora: LoraSettings | None = None
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    #: End the run after this many steps of the schedule `max_steps` / `epochs` set (the learning rate
    #: still follows that longer schedule): a run stopped early, rerun exactly.
    stop_after: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = 0.0
    warmup_frac: float = Field(0.05, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    temperature: float = Field(1.0, gt=0)
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    letter_style: Literal["none", "name", "scan"] = "scan"
    val_n: int = Field(32, ge=0)
    val_every: int = Field(25, ge=1)
    seed: int = 0
    save_every: int = Field(10, ge=1)
    threads: int | None = Field(None, ge=1)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over tokens of τ² · KL(softmax(teacher / τ) ‖ softmax(student / τ)); logits [n, V].

    The τ² keeps the gradient's scale independent of τ (Hinton et al., 2015)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = F.log_softmax(teacher.float() / temperature, -1)
    s = F.log_softmax(student.float() / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def completion_logits(backend, inputs, completions: Sequence[Sequence[int]]) -> Tensor:
    """The LM head's logits at every completion token's predicting position, [Σ len, vocab], in row
    order: one forward over prompt + completion (completion i follows prompt i). Gradients flow when
    the caller enables them (the speech prompt's projector)."""
    device = inputs.embeds.device
    N, T = len(completions), max(len(c) for c in completions)
    P = inputs.embeds.shape[1]
    comp = torch.zeros(N, T, dtype=torch.long, device=device)
    cmask = torch.zeros(N, T, dtype=torch.bool, device=device)
    for r, c in enumerate(completions):
        comp[r, : len(c)] = torch.as_tensor(list(c), device=device)
        cmask[r, : len(c)] = True
    embeds = torch.cat([inputs.embeds, backend.embed_tokens(comp)], 1)
    mask = torch.cat([inputs.attention_mask, cmask.long()], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backend.decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=backend.positions(pos),
                               use_cache=False).last_hidden_state
    return backend.lm_head()(hidden[:, P - 1 : P + T - 1][cmask])


def prepare_projector(backend, init: str) -> None:
    """Install the projector this stage trains (see `KDConfig.init`)."""
    from tars.models.projector import CTCProjector, SoftCTCProjector

    proj = backend.projector
    if init == "soft_ctc":
        if isinstance(proj, SoftCTCProjector):
            raise UserError("config: init=soft_ctc, but the model's projector is soft already (use init=keep)")
        if not isinstance(proj, CTCProjector):
            raise UserError("config: init=soft_ctc needs a model with a CTC projector (`tars mini ctc`, mini:demo)")
        backend.model.model.multi_modal_projector = SoftCTCProjector.from_ctc(proj)
    elif not isinstance(proj, SoftCTCProjector):
        raise UserError("config: init=keep needs a model whose projector is a soft CTC projector")


def run(cfg: KDConfig, progress: bool = True) -> Path:
    from tqdm import tqdm

    from tars.models.loading import load_backend

    out, finished = open_stage(cfg)
    if finished:
        return out / "model"
    records, base = load_data(cfg.data, "speech")
    if len(records) <= cfg.val_n:
        raise UserError(f"config: data has {len(records)} items, not more than val_n={cfg.val_n}")
    train, val = records[: len(records) - cfg.val_n], records[len(records) - cfg.val_n :]
    backend = load_backend(cfg.model)
    if not hasattr(backend.model.model, "multi_modal_projector"):
        raise UserError(f"{cfg.model}: KD alignment needs a Qwen2-Audio-architecture model (the mini model)")
    prepare_projector(backend, cfg.init)
    for p in backend.parameters():
        p.requires_grad_(False)
    lora = list(add_lora(backend, cfg.lora).values()) if cfg.lora else []
    params = list(backend.projector.parameters()) + lora
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    end = min(total, cfg.stop_after or total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, max(1, int(cfg.warmup_frac * total))))
    start = resume(out, params, opt, sched)
    stop_id = backend.stop_token_ids[0]
    tok = backend.tokenizer

    def targets(batch: list[Record]) -> list[list[int]]:
        return [tok(sft_target(r, cfg.letter_style), add_special_tokens=False)["input_ids"] + [stop_id] for r in batch]

    def losses(batch: list[Record]) -> dict[str, Tensor]:
        comp = targets(batch)
        with torch.no_grad(), adapters_disabled(backend):  # the original LLM, whatever trains
            teacher = completion_logits(backend, backend.build_inputs(batch, "text"), comp)
        student = completion_logits(backend, backend.build_inputs(batch, "speech", base_dir=base), comp)
        gold = torch.tensor([t for c in comp for t in c], device=student.device)
        return {"kd": kd_loss(student, teacher, cfg.temperature),
                "nll": F.cross_entropy(student.float(), gold),
                "agree": (student.argmax(-1) == teacher.argmax(-1)).float().mean()}

    def validate(step: int) -> None:
        backend.eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for i in range(0, len(val), cfg.batch_size):
                batch = val[i : i + cfg.batch_size]
                for k, v in losses(batch).items():
                    sums[k] = sums.get(k, 0.0) + v.item() * len(batch)
        row = {"step": step, **{f"val/{k}": round(v / len(val), 5) for k, v in sums.items()}}
        _log(out, row)
        backend.train()

    bar = tqdm(total=end, initial=start, desc="kd projector", unit="step", disable=not progress)
    backend.train()
    if start == 0:
        validate(0)
    for step in range(start, end):
        epoch, k = divmod(step, steps_per_epoch)
        order = list(range(len(train)))
        random.Random(f"{cfg.seed}:{epoch}").shuffle(order)
        batch = [train[i] for i in order[k * cfg.batch_size : (k + 1) * cfg.batch_size]]
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        parts = losses(batch)
        loss = cfg.kd_weight * parts["kd"] + cfg.ce_weight * parts["nll"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        _log(out, {"step": step + 1, "epoch": epoch, "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                   "grad_norm": float(gnorm), "lr": sched.get_last_lr()[0],
                   "seconds": round(time.perf_counter() - t0, 3)})
        bar.set_postfix(kd=f"{parts['kd'].item():.3f}", agree=f"{parts['agree'].item():.2f}")
        bar.update(1)
        if (step + 1) % cfg.val_every == 0 or step + 1 == end:
            validate(step + 1)
        if (step + 1) % cfg.save_every == 0 and step + 1 < end:
            save_checkpoint(out, step + 1, params, opt, sched)
    bar.close()
    if cfg.lora:
        merge_lora(backend)
    return finish_stage(backend, out, end)


def _log(out: Path, row: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
