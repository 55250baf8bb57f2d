"""Projector alignment by CTC: the speech encoder's frames learn to spell the question in the LLM's tokens.

Stage b of the mini model, second design (the first, `supervised.py` with `train: projector`, left speech
below chance; docs/results.md). A fresh `CTCProjector` is trained with the CTC loss against the
tokenized question, written as the text condition shows it (`target: text_prompt`: question, blank
line, `A. …` options) or as it was spoken (`target: spoken`). Only the cached encoder outputs and the
projector run — no LLM forward — so an epoch over thousands of clips takes minutes on a CPU.

The last `val_n` items never train; the token error rate (edit distance of greedy CTC decoding against
the target, over target length) on them is logged at every checkpoint and at the end. Resumable like
every stage: atomic checkpoints every `save_every` steps, data order a function of (seed, epoch).
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
from torch import Tensor
from torch.nn import functional as F

from tars.config import Config
from tars.data.prompts import spoken_text, text_prompt
from tars.data.sources import DataConfig, load_data
from tars.errors import UserError
from tars.models.projector import CTCProjector, ctc_keep
from tars.train.checkpoint import finish_stage, open_stage, resume, save_checkpoint, warmup_cosine


class CTCConfig(Config):
    model: str
    out: str
    data: DataConfig = DataConfig()
    target: Literal["text_prompt", "spoken"] = "text_prompt"
    stack: int = Field(2, ge=1)
    d_hidden: int | None = Field(None, ge=1)
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = 0.01
    warmup_frac: float = Field(0.05, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    #: dtype of the vocabulary-sized product while training (bf16: several times faster on a CPU with
    #: avx512_bf16);
    #: validation and use run in the model's dtype.
    vocab_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    val_n: int = Field(64, ge=0)
    seed: int = 0
    save_every: int = Field(50, ge=1)
    threads: int | None = Field(None, ge=1)


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two token sequences."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def greedy_decode(logits: Tensor, blank: int) -> list[int]:
    """[T, V+1] CTC logits → the token ids greedy CTC decoding reads."""
    ids = logits.argmax(-1)
    return ids[ctc_keep(ids, blank)].tolist()


def pad_frames(frames: list[Tensor]) -> tuple[Tensor, Tensor]:
    n = torch.tensor([f.shape[0] for f in frames])
    out = frames[0].new_zeros(len(frames), int(n.max()), frames[0].shape[1])
    for i, f in enumerate(frames):
        out[i, : f.shape[0]] = f
    return out, n


def ctc_loss(proj: CTCProjector, frames: list[Tensor], targets: list[list[int]],
             vocab_dtype: torch.dtype | None = None) -> Tensor:
    """Mean CTC loss per target token over a batch of clips."""
    x, n = pad_frames(frames)
    logp = proj.logits(x, n, vocab_dtype).float().log_softmax(-1)
    out_len = torch.tensor([proj.n_frames(int(k)) for k in n])
    flat = torch.tensor([t for tgt in targets for t in tgt])
    tgt_len = torch.tensor([len(t) for t in targets])
    return F.ctc_loss(logp.transpose(0, 1), flat, out_len, tgt_len, blank=proj.blank_id,
                      reduction="mean", zero_infinity=True)


@torch.no_grad()
def token_error_rate(proj: CTCProjector, frames: list[Tensor], targets: list[list[int]]) -> float:
    errors = sum(edit_distance(greedy_decode(proj.logits(f), proj.blank_id), t) for f, t in zip(frames, targets))
    return errors / max(1, sum(len(t) for t in targets))


def run(cfg: CTCConfig, progress: bool = True) -> Path:
    from tqdm import tqdm

    from tars.models.loading import load_backend

    out, finished = open_stage(cfg)
    if finished:
        return out / "model"
    records, base = load_data(cfg.data, "speech")
    if len(records) <= cfg.val_n:
        raise UserError(f"config: data has {len(records)} items, not more than val_n={cfg.val_n}")
    backend = load_backend(cfg.model)
    if not hasattr(backend.model.model, "multi_modal_projector"):
        raise UserError(f"{cfg.model}: CTC alignment needs a Qwen2-Audio-architecture model (the mini model)")
    tok = backend.tokenizer
    write = text_prompt if cfg.target == "text_prompt" else spoken_text
    targets = [tok(write(r), add_special_tokens=False)["input_ids"] for r in records]
    paths = [Path(r.audio) if base is None else Path(base) / r.audio for r in records]
    frames: list[Tensor] = []
    for i in tqdm(range(0, len(paths), 8), desc="encoding (cached)", unit="batch", disable=not progress):
        frames += backend.encode_audio(paths[i : i + 8])

    torch.manual_seed(cfg.seed)
    enc_dim = frames[0].shape[1]
    emb = backend.decoder().get_input_embeddings()
    proj = backend.projector
    if not isinstance(proj, CTCProjector):
        proj = CTCProjector(enc_dim, emb.embedding_dim, emb, cfg.stack, cfg.d_hidden)
        backend.model.model.multi_modal_projector = proj
    for p in backend.parameters():
        p.requires_grad_(False)
    params = list(proj.parameters())
    for p in params:
        p.requires_grad_(True)
    # CTC needs a frame per target token plus a blank between two equal neighbours.
    too_short = [r.id for r, f, t in zip(records, frames, targets)
                 if proj.n_frames(f.shape[0]) < len(t) + sum(a == b for a, b in zip(t, t[1:]))]
    if too_short:
        print(f"note: {len(too_short)} clips have fewer frames than target tokens (first: {too_short[0]}); "
              "their loss is zeroed — lower `stack` if this is common")

    train_idx = list(range(len(records) - cfg.val_n))
    val_idx = list(range(len(records) - cfg.val_n, len(records)))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, max(1, int(cfg.warmup_frac * total))))
    start = resume(out, params, opt, sched)
    log = out / "metrics.jsonl"

    def validate() -> float:
        proj.eval()
        ter = token_error_rate(proj, [frames[i] for i in val_idx], [targets[i] for i in val_idx])
        proj.train()
        return ter

    bar = tqdm(total=total, initial=start, desc="ctc projector", unit="step", disable=not progress)
    proj.train()
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        order = list(train_idx)
        random.Random(f"{cfg.seed}:{epoch}").shuffle(order)
        batch = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        t0 = time.perf_counter()
        loss = ctc_loss(proj, [frames[i] for i in batch], [targets[i] for i in batch], getattr(torch, cfg.vocab_dtype))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        row = {"step": step + 1, "epoch": epoch, "ctc_loss": loss.item(), "grad_norm": float(gnorm),
               "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 3)}
        last = step + 1 == total
        if (step + 1) % cfg.save_every == 0 or last:
            row["val_token_error"] = round(validate(), 4)
            bar.write(f"step {step + 1}: ctc loss {row['ctc_loss']:.3f}, held-out token error {row['val_token_error']:.3f}")
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['ctc_loss']:.3f}")
        bar.update(1)
        if (step + 1) % cfg.save_every == 0 and not last:
            save_checkpoint(out, step + 1, params, opt, sched)
    bar.close()
    return finish_stage(backend, out, total)
