"""The two imitation baselines of the paper's table, on the same paired rollouts as TARS.

* `sft`: the speech prompt is trained to produce a *correct text-mode* chain of thought of the same
  question (a text rollout that got the answer right) — the model imitates its own text reasoning.
* `dpo`: chosen = a correct text-mode chain of thought, rejected = a wrong speech-mode one, both
  scored under the speech prompt, against the LoRA-free model as the reference policy.

Both are offline in the sense that matters: the target is a fixed sequence, not a reward on the
policy's own sample, which is what the paper contrasts with on-policy alignment. Pairing and losses
are pure functions here; `rl/tars.py` calls them inside its step.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F


def sft_targets(text_correct: Sequence[Sequence[bool]], rng: random.Random) -> list[int | None]:
    """Per question, the index of the correct text rollout to imitate (uniform among the correct ones),
    or None when none is correct (that question trains nothing this step)."""
    out: list[int | None] = []
    for row in text_correct:
        ok = [i for i, c in enumerate(row) if c]
        out.append(rng.choice(ok) if ok else None)
    return out


def dpo_pairs(text_correct: Sequence[Sequence[bool]], speech_correct: Sequence[Sequence[bool]],
              rng: random.Random) -> list[tuple[int, int] | None]:
    """Per question, (chosen text rollout, rejected speech rollout): a correct text rollout and a wrong
    speech rollout, each drawn uniformly; None when either is missing (the speech rollouts were all
    right — nothing to correct — or no text rollout was)."""
    out: list[tuple[int, int] | None] = []
    for t_row, s_row in zip(text_correct, speech_correct):
        good = [i for i, c in enumerate(t_row) if c]
        bad = [i for i, c in enumerate(s_row) if not c]
        out.append((rng.choice(good), rng.choice(bad)) if good and bad else None)
    return out


def sft_loss(logprobs: Tensor, mask: Tensor, normalizer: float | None = None) -> Tensor:
    """Token-level negative log-likelihood: −Σ log p(target tokens) / `normalizer` (default: this
    batch's token count; pass the whole step's count so micro-batch losses add up)."""
    total = -(logprobs * mask).sum()
    denom = float(mask.sum()) if normalizer is None else float(normalizer)
    return total / denom if denom > 0 else total * 0.0


def sequence_logprob(logprobs: Tensor, mask: Tensor) -> Tensor:
    """[N, T] token log-probs → [N] log-probability of each whole completion."""
    return (logprobs * mask).sum(1)


def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float = 0.1,
             normalizer: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO (Rafailov et al. 2023) on sequence log-probs [P]:
    `−log σ(β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))])`, summed over pairs and divided by
    `normalizer` (default: P). Stats: mean implicit reward margin and the share of pairs it ranks right."""
    margin = (chosen - ref_chosen.detach()) - (rejected - ref_rejected.detach())
    total = -F.logsigmoid(beta * margin).sum()
    denom = float(chosen.numel()) if normalizer is None else float(normalizer)
    loss = total / denom if denom > 0 else total * 0.0
    with torch.no_grad():
        stats = {"margin": beta * margin.mean() if margin.numel() else margin.new_zeros(()),
                 "pair_accuracy": (margin > 0).float().mean() if margin.numel() else margin.new_zeros(())}
    return loss, stats
