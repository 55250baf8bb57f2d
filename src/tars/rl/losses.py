"""The policy loss: DESIGN §2 step 6, a DAPO-style token-level clipped surrogate.

Per completion token t of rollout i, with the importance ratio `r = exp(logp - logp_old)` between the
policy being trained and the one that sampled the rollout, and the rollout's advantage `A_i`:

    objective_t = min(r·A_i, clip(r, 1 - eps_low, 1 + eps_high)·A_i)

and the loss is minus its average. The clip stops one batch from pushing a token's probability too
far: once a token with A > 0 has r > 1 + eps_high (or one with A < 0 has r < 1 - eps_low), the clipped
branch is the minimum and that token's gradient is zero. DAPO's asymmetric range (0.2 / 0.28) leaves
more room to raise unlikely tokens than to lower likely ones, against entropy collapse.

How "average" is taken (`loss_type`) decides how much each token weighs:

* `dapo` (default, the paper): sum over all kept tokens of the batch / their number. Every token
  weighs the same, so long chains of thought are not diluted.
* `grpo`: the original per-sequence mean, then the mean over sequences: a token of a short
  completion weighs more than one of a long completion.
* `dr_grpo`: sum / (number of kept sequences × `max_completion_length`), TRL's definition with a
  fixed generation budget as the length, so the normaliser does not depend on the lengths sampled.

Completions that hit the length limit (`keep=False`) are dropped from the loss *and* its normaliser
(DESIGN §2 step 6): a cut-off chain of thought was never finished, its reward says nothing about it.

An optional KL penalty to a reference policy (`beta > 0`, the LoRA-disabled model) adds
`beta·k3` per token before the same averaging, k3 being `kl_penalty`. Entropy needs the full
distribution, not the sampled tokens' log-probs, so it is not computed here.

Truncated importance sampling (`tis_cap`, the correction DESIGN §7 pairs with a separate generation
engine): the tokens were drawn by the sampler, whose log-probs (`sampler_logprobs`) differ from the
trainer's own for the same weights — round-off in bf16 with a KV cache, another engine's kernels,
a temperature or top-p other than 1. Each token's surrogate term is weighted by
`w = min(exp(logp_old − logp_sampler), tis_cap)` (a constant), so the gradient estimates the
trainer's policy gradient from the sampler's draws, the cap bounding the variance. The KL term is
not weighted.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LossType = Literal["dapo", "grpo", "dr_grpo"]
LOSS_TYPES: tuple[str, ...] = ("dapo", "grpo", "dr_grpo")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || reference): `exp(d) - d - 1`, d = ref - logp (Schulman's
    "Approximating KL divergence"; what GRPO and TRL use). [N, T]; 0 outside `mask`.

    Unbiased for the KL when tokens are sampled from the policy, and >= 0 token by token (e^d >= 1 + d),
    unlike the plain log-ratio. Differentiable in `logprobs`; the reference is treated as a constant.
    """
    d = torch.where(mask, ref_logprobs.detach() - logprobs, torch.zeros_like(logprobs))
    return torch.where(mask, torch.exp(d) - d - 1, torch.zeros_like(logprobs))


def _kept_mask(mask: Tensor, keep: Tensor | None) -> Tensor:
    mask = mask.bool()
    if keep is None:
        return mask
    if keep.shape != mask.shape[:1]:
        raise ValueError(f"keep must be [N] = [{mask.shape[0]}], got {tuple(keep.shape)}")
    return mask & keep.bool()[:, None]


def loss_normalizer(mask: Tensor, keep: Tensor | None = None, loss_type: LossType = "dapo") -> float:
    """The denominator `clipped_surrogate` divides by, for a whole optimisation batch.

    `dapo`: kept tokens; `grpo` and `dr_grpo`: kept sequences (those with `keep` True and at least one
    token; `dr_grpo` also multiplies by `max_completion_length`, inside `clipped_surrogate`). Compute it
    once over the whole batch and pass it as `normalizer` to each micro-batch: the micro-batch losses
    then add up to exactly the whole-batch loss (gradient accumulation).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    m = _kept_mask(mask, keep)
    return float(m.sum()) if loss_type == "dapo" else float(m.any(1).sum())


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    *,
    loss_type: LossType = "dapo",
    keep: Tensor | None = None,
    max_completion_length: int | None = None,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    normalizer: float | None = None,
    sampler_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate loss of DESIGN §2 step 6 (module docstring), and its diagnostics.

    `logprobs` [N, T]: the sampled tokens' log-probs under the policy being trained (with grad);
    `old_logprobs` [N, T]: the same under the sampling policy (constant; with one update per batch
    it equals `logprobs.detach()`, ratio 1, and the loss gradient is the plain policy gradient);
    `advantages` [N]: one per completion, shared by its tokens; `mask` [N, T] bool: real completion
    tokens; `keep` [N] bool: False drops a completion (hit the length limit).

    `loss_type`: `dapo` | `grpo` | `dr_grpo` (needs `max_completion_length`, the generation budget).
    `ref_logprobs` and `beta > 0`: add `beta·kl_penalty` per token (skipped when beta is 0).
    `normalizer`: the denominator to use instead of this batch's own (see `loss_normalizer`).
    `sampler_logprobs` [N, T] and `tis_cap`: the truncated importance weights of the module docstring
    (skipped when `tis_cap` is None).

    Returns `(loss, stats)`, loss a scalar to minimise (0.0, still differentiable, when nothing is
    kept); stats detached 0-dim tensors over the kept tokens: `clip_fraction` (tokens whose gradient
    the clip zeroed: r > 1 + eps_high with A > 0, or r < 1 - eps_low with A < 0), `clip_low_fraction`,
    `clip_high_fraction`, `ratio_mean`, `kl` (mean k3) when the penalty is on, and with `tis_cap`
    `tis_weight` (mean w) and `tis_capped_fraction` (tokens whose weight the cap cut).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logprobs.ndim != 2 or old_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs, old_logprobs and mask must be [N, T] alike, got {tuple(logprobs.shape)}, "
            f"{tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [N] = [{logprobs.shape[0]}], got {tuple(advantages.shape)}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length (the generation budget, >= 1)")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    use_kl = beta > 0
    if use_kl and (ref_logprobs is None or ref_logprobs.shape != logprobs.shape):
        raise ValueError("beta > 0 needs ref_logprobs of the same [N, T] shape as logprobs")
    use_tis = tis_cap is not None
    if use_tis and (tis_cap <= 0 or sampler_logprobs is None or sampler_logprobs.shape != logprobs.shape):
        raise ValueError("tis_cap needs to be > 0 and sampler_logprobs of the same [N, T] shape as logprobs")

    m = _kept_mask(mask, keep)
    zero = torch.zeros_like(logprobs)
    # Padding may hold anything (even -inf): keep it out of exp() so neither the value nor the
    # gradient can turn into NaN there.
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), zero)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)[:, None]
    objective = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    tis_raw = None
    if use_tis:
        tis_raw = torch.exp(torch.where(m, old_logprobs.detach() - sampler_logprobs.detach(), zero))
        objective = objective * tis_raw.clamp(max=tis_cap)
    per_token = -objective
    kl = None
    if use_kl:
        kl = kl_penalty(logprobs, ref_logprobs, m)
        per_token = per_token + beta * kl
    per_token = torch.where(m, per_token, zero)

    mf = m.to(per_token.dtype)
    if loss_type == "dapo":
        total = per_token.sum()
    elif loss_type == "grpo":
        total = (per_token.sum(1) / mf.sum(1).clamp(min=1)).sum()
    else:
        total = per_token.sum() / max_completion_length
    denom = loss_normalizer(m, None, loss_type) if normalizer is None else float(normalizer)
    loss = total / denom if denom > 0 else total * 0.0

    with torch.no_grad():
        n_tok = mf.sum().clamp(min=1)
        low = (ratio < 1 - eps_low) & (adv < 0) & m
        high = (ratio > 1 + eps_high) & (adv > 0) & m
        stats = {
            "clip_fraction": (low | high).sum() / n_tok,
            "clip_low_fraction": low.sum() / n_tok,
            "clip_high_fraction": high.sum() / n_tok,
            "ratio_mean": (ratio * mf).sum() / n_tok,
        }
        if kl is not None:
            stats["kl"] = (kl * mf).sum() / n_tok
        if tis_raw is not None:
            stats["tis_weight"] = (tis_raw.clamp(max=tis_cap) * mf).sum() / n_tok
            stats["tis_capped_fraction"] = ((tis_raw > tis_cap) & m).sum() / n_tok
    return loss, {k: v.detach() for k, v in stats.items()}
