"""Supervised stages: teach the LLM the think/answer format (text SFT), or align the projector (speech).

One loop serves both, because both are "maximise the log-likelihood of a target completion given a
prompt" and differ only in which parameters train and which prompt is shown:

- `train: llm`, `modality: text` — the mini model's text SFT: the LLM learns the task families in the
  think/answer format from their gold chains of thought;
- `train: projector`, `modality: speech` — projector alignment: encoder and LLM frozen, the projector
  learns to turn speech into embeddings from which the frozen LLM produces the same gold completion
  (`completion_weight`) and can repeat the spoken words (`transcript_weight`, a second prompt that asks
  for the words), the usual recipe for a fresh adapter.

The log-likelihood comes from `Backend.score(grad=True)`, the same forward every other stage uses. Runs
resume after a kill: a checkpoint of the trained parameters, optimizer, step and RNG state is written
atomically every `save_every` steps, and the data order is a function of (seed, epoch) alone.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from tars.config import Config
from tars.data.prompts import gold_completion, spoken_text
from tars.data.schema import Record
from tars.errors import UserError
from tars.data.sources import DataConfig, load_data
from tars.train.checkpoint import finish_stage, open_stage, resume, save_checkpoint, warmup_cosine

TRANSCRIBE_PROMPT = "Repeat exactly what the user said, word for word."


class SupervisedConfig(Config):
    model: str
    out: str
    modality: Literal["text", "speech"] = "text"
    train: Literal["llm", "projector"] = "llm"
    data: DataConfig = DataConfig()
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = 0.0
    warmup_frac: float = Field(0.05, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    completion_weight: float = 1.0
    transcript_weight: float = 0.0
    #: How the gold reasoning reaches the letter (see `sft_target`): `scan` walks the options in order.
    letter_style: Literal["none", "name", "scan"] = "scan"
    seed: int = 0
    save_every: int = Field(25, ge=1)
    threads: int | None = Field(None, ge=1)


def sft_target(rec: Record, letter_style: str = "scan") -> str:
    """The gold completion. A 135M model computes the value far more often than it finds its letter
    (measured: 19 of 23 arithmetic values right, 12 letters right), so the reasoning can spell the
    lookup out. `name`: "… That is option B."; `scan`: "… Checking the options: A is 6, no. B is 4,
    yes. That is option B." — each step is a copy from the prompt or a comparison with the value just
    computed, which small models learn far more easily than a one-step value → letter lookup."""
    cot = (rec.cot or "").strip()
    if letter_style == "name":
        cot = f"{cot} That is option {rec.answer}.".strip()
    elif letter_style == "scan":
        steps = []
        for letter, option in zip(rec.letters, rec.options):
            hit = letter == rec.answer
            steps.append(f"{letter} is {option}, {'yes' if hit else 'no'}.")
            if hit:
                break
        cot = f"{cot} Checking the options: {' '.join(steps)} That is option {rec.answer}.".strip()
    return gold_completion(rec, cot)


def run(cfg: SupervisedConfig, progress: bool = True) -> Path:
    from tqdm import tqdm

    from tars.models.loading import load_backend

    out, finished = open_stage(cfg)
    if finished:
        return out / "model"
    if cfg.modality == "text" and cfg.train == "projector":
        raise UserError("config: train=projector needs modality=speech (text prompts never reach the projector)")
    records, base = load_data(cfg.data, cfg.modality)
    backend = load_backend(cfg.model)
    params = _trainable(backend, cfg.train)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(records) / cfg.batch_size)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_frac * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warmup))
    start = resume(out, params, opt, sched)
    stop_id = backend.stop_token_ids[0]
    tok = backend.tokenizer
    log = out / "metrics.jsonl"
    bar = tqdm(total=total, initial=start, desc=f"{cfg.train} {cfg.modality}", unit="step", disable=not progress)
    backend.train()
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        order = list(range(len(records)))
        random.Random(f"{cfg.seed}:{epoch}").shuffle(order)
        batch = [records[i] for i in order[k * cfg.batch_size : (k + 1) * cfg.batch_size]]
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        loss_parts = {}
        loss = torch.zeros(())
        if cfg.completion_weight:
            targets = [tok(sft_target(r, cfg.letter_style), add_special_tokens=False)["input_ids"] + [stop_id]
                       for r in batch]
            inputs = backend.build_inputs(batch, cfg.modality, base_dir=base)
            s = backend.score(inputs, targets, range(len(batch)), grad=True)
            nll = -(s.logprobs.sum() / s.mask.sum())
            loss = loss + cfg.completion_weight * nll
            loss_parts["completion_nll"] = nll.item()
        if cfg.transcript_weight:
            targets = [tok(spoken_text(r), add_special_tokens=False)["input_ids"] + [stop_id] for r in batch]
            inputs = backend.build_inputs(batch, "speech", base_dir=base, system=TRANSCRIBE_PROMPT)
            s = backend.score(inputs, targets, range(len(batch)), grad=True)
            nll = -(s.logprobs.sum() / s.mask.sum())
            loss = loss + cfg.transcript_weight * nll
            loss_parts["transcript_nll"] = nll.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        row = {"step": step + 1, "epoch": epoch, "loss": loss.item(), **loss_parts, "grad_norm": float(gnorm),
               "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 3)}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        bar.update(1)
        if (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save_checkpoint(out, step + 1, params, opt, sched)
    bar.close()
    return finish_stage(backend, out, total)


def _trainable(backend, what: str) -> list[torch.nn.Parameter]:
    for p in backend.parameters():
        p.requires_grad_(False)
    if what == "projector":
        mods = [backend.projector]
    else:
        mods = [backend.decoder(), backend.lm_head()]
    params: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen:
                p.requires_grad_(True)
                params.append(p)
                seen.add(id(p))
    return params
