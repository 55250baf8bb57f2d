"""Group-relative advantages: DESIGN §2 step 5, `A = r - mean(r over the same question AND modality)`.

GRPO needs no value network: a completion's advantage is how much better it did than its siblings,
the other completions sampled for the same prompt. TARS has two prompts per question (speech, text),
so the siblings are the rollouts of the same question *and* the same modality. Centring each modality
on its own keeps the two branches independent: pooled with text, speech rollouts of a question the
model answers well only from text would all get negative advantages, and text rewards (no alignment
terms, usually higher accuracy) would swamp the speech signal.

No division by the std by default (the paper; also Dr. GRPO's argument that it over-weights groups
that are nearly solved or nearly hopeless). `scale_std=True` restores the original GRPO scaling,
`joint=True` the pooled (question-only) grouping, both for ablations.
"""

from __future__ import annotations

import torch
from torch import Tensor

SPEECH, TEXT = 0, 1


def group_advantages(
    rewards: Tensor,
    question: Tensor,
    modality: Tensor,
    scale_std: bool = False,
    joint: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """Per-completion advantage: reward minus the mean reward of its group (DESIGN §2 step 5).

    `rewards`, `question` (int ids, any values), `modality` (0 speech, 1 text) are [N], one entry per
    completion, in any order. The group of a completion is every completion with the same question
    and modality (`joint=False`, the paper) or the same question (`joint=True`).

    `scale_std=True` divides by `std + eps` of the group, with the *sample* std (Bessel's n-1),
    which is what TRL's GRPO uses (`torch.std` default in its `scale_rewards` group mode).

    A group whose rewards are all equal, singletons included, gets exactly 0.0: it carries no
    learning signal, and the float round-off of its mean (7 × 0.1 summed / 7 ≠ 0.1 in float32) must
    not become one, least of all once divided by `eps`. Returns [N] in the rewards' float dtype
    (float32 for integer rewards); computed in float64; no gradient.
    """
    if rewards.ndim != 1 or question.shape != rewards.shape or modality.shape != rewards.shape:
        raise ValueError(
            f"rewards, question and modality must be 1-D of one length, got {tuple(rewards.shape)}, "
            f"{tuple(question.shape)}, {tuple(modality.shape)}"
        )
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=out_dtype, device=rewards.device)
    if not joint and not bool(((modality == SPEECH) | (modality == TEXT)).all()):
        raise ValueError(f"modality must be {SPEECH} (speech) or {TEXT} (text), got {sorted(set(modality.tolist()))}")
    r = rewards.detach().to(torch.float64)
    keys = question.long()[:, None] if joint else torch.stack([question.long(), modality.long()], 1)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    n_groups = int(group.max()) + 1
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, group, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, group, r) / count
    centred = r - mean[group]
    hi = torch.full_like(count, float("-inf")).scatter_reduce(0, group, r, "amax")
    lo = torch.full_like(count, float("inf")).scatter_reduce(0, group, r, "amin")
    flat = (hi == lo)[group]
    if scale_std:
        var = torch.zeros_like(count).index_add_(0, group, centred**2) / (count - 1).clamp(min=1)
        centred = centred / (var.sqrt()[group] + eps)
    return torch.where(flat, torch.zeros_like(centred), centred).to(out_dtype)


def within_group_spread(rewards: Tensor, groups: Tensor | None = None) -> float:
    """The mean over groups of the population std of a reward within its group: `rewards` [Q, G], one
    row per question's group (e.g. R_rep of its G speech rollouts); `groups` [Q] bool picks the rows
    counted (default all). 0.0 when none is picked.

    Only the part of a reward that differs between a group's rollouts reaches the advantage (a
    per-question constant cancels in `r − mean(r)`), so this, not the reward's mean, says how much an
    alignment reward can steer: beside R_base's 0 / 1 + λ·R_fmt spread, an R_rep of 0.99 ± 0.002 is a
    near-constant. Population std (divide by G): the spread the centred advantages actually have."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [groups, rollouts], got {tuple(rewards.shape)}")
    rows = rewards if groups is None else rewards[groups]
    if rows.numel() == 0:
        return 0.0
    return float(rows.double().std(1, correction=0).mean())
