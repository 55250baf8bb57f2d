"""The clipped surrogate and KL penalty (DESIGN §2 step 6), against numbers worked out by hand."""

import math

import pytest
import torch

from tars.rl.losses import clipped_surrogate, kl_penalty, loss_normalizer

LOG_HALF = math.log(0.5)

# 4 rollouts × up to 3 tokens; ratios r = exp(logp - old), eps_low 0.2 -> [0.8, 1.28] <- eps_high 0.28
#   row 0, A=+1: r = [1.2, 1.4, 1.0]  -> objective min(rA, clip(r)A) = [1.2, 1.28 (clipped), 1.0]
#   row 1, A=-2: r = [0.5, pad, pad]  -> [min(-1.0, 0.8·-2 = -1.6) = -1.6 (clipped)]
#   row 2, A=-2: r = [0.85, 1.1, pad] -> [-1.7, -2.2] (both inside the range)
#   row 3, A=+3: r = [1, 1, 1], hit the length limit (keep=False) -> dropped
RATIOS = [[1.2, 1.4, 1.0], [0.5, 1.0, 1.0], [0.85, 1.1, 1.0], [1.0, 1.0, 1.0]]
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
ADV = torch.tensor([1.0, -2.0, -2.0, 3.0])
KEEP = torch.tensor([True, True, True, False])


def batch():
    """(logprobs with grad, old_logprobs): old = log 0.5 on real tokens, -inf on padding (garbage)."""
    old = torch.full((4, 3), LOG_HALF)
    logp = (old + torch.tensor(RATIOS).log()).where(MASK, torch.zeros(()))
    old = old.where(MASK, torch.tensor(float("-inf")))
    return logp.requires_grad_(), old


def test_dapo_token_level_loss_stats_and_gradient():
    logp, old = batch()
    loss, stats = clipped_surrogate(logp, old, ADV, MASK, keep=KEEP)
    # kept tokens: 3 + 1 + 2 = 6; objective sum = (1.2 + 1.28 + 1.0) - 1.6 + (-1.7 - 2.2) = -2.02
    assert loss.item() == pytest.approx(2.02 / 6)  # 0.33666667
    # clipped: row 0 token 1 (r 1.4 > 1.28, A > 0) and row 1 token 0 (r 0.5 < 0.8, A < 0) -> 2/6
    assert stats["clip_fraction"].item() == pytest.approx(2 / 6)
    assert stats["clip_high_fraction"].item() == pytest.approx(1 / 6)
    assert stats["clip_low_fraction"].item() == pytest.approx(1 / 6)
    # (1.2 + 1.4 + 1.0 + 0.5 + 0.85 + 1.1) / 6 = 6.05 / 6
    assert stats["ratio_mean"].item() == pytest.approx(6.05 / 6)
    loss.backward()
    # d loss / d logp = -A·r / 6 where unclipped (d r / d logp = r), 0 where clipped, masked or dropped
    expected = [
        [-1.2 / 6, 0.0, -1.0 / 6],  # -0.2, 0 (clipped), -0.16666667
        [0.0, 0.0, 0.0],  # clipped, padding, padding
        [2 * 0.85 / 6, 2 * 1.1 / 6, 0.0],  # 0.28333333, 0.36666667, padding
        [0.0, 0.0, 0.0],  # truncated: no gradient
    ]
    assert torch.isfinite(logp.grad).all()
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]


def test_keep_false_leaves_loss_and_normaliser():
    logp, old = batch()
    loss, _ = clipped_surrogate(logp, old, ADV, MASK)  # row 3 kept: 3 more tokens, objective 3 each
    # (-2.02 + 9) / 9 = 6.98 / 9 -> loss -0.77555556
    assert loss.item() == pytest.approx(-6.98 / 9)


def test_grpo_sequence_mean():
    logp, old = batch()
    loss, _ = clipped_surrogate(logp, old, ADV, MASK, keep=KEEP, loss_type="grpo")
    # row means: 3.48/3 = 1.16, -1.6, -3.9/2 = -1.95; mean over 3 rows = -2.39/3 -> loss 0.79666667
    assert loss.item() == pytest.approx(2.39 / 3)


def test_dr_grpo_fixed_length_normaliser():
    logp, old = batch()
    loss, _ = clipped_surrogate(logp, old, ADV, MASK, keep=KEEP, loss_type="dr_grpo", max_completion_length=4)
    # -2.02 / (3 kept rows × 4) -> loss 0.16833333
    assert loss.item() == pytest.approx(2.02 / 12)
    with pytest.raises(ValueError, match="max_completion_length"):
        clipped_surrogate(logp, old, ADV, MASK, loss_type="dr_grpo")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batches_add_up_with_a_shared_normaliser(loss_type):
    logp, old = batch()
    kw = dict(loss_type=loss_type, max_completion_length=4)
    full, _ = clipped_surrogate(logp, old, ADV, MASK, keep=KEEP, **kw)
    norm = loss_normalizer(MASK, KEEP, loss_type)
    assert norm == {"dapo": 6.0, "grpo": 3.0, "dr_grpo": 3.0}[loss_type]
    parts = [clipped_surrogate(logp[s], old[s], ADV[s], MASK[s], keep=KEEP[s], normalizer=norm, **kw)[0]
             for s in (slice(0, 2), slice(2, 4))]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item())


def test_positive_advantage_below_range_is_not_clipped():
    # A=+1, r=0.5 < 0.8: min(0.5·1, 0.8·1) = 0.5 -> the unclipped branch, gradient -A·r = -0.5
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    loss, stats = clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx(-0.5)
    assert stats["clip_fraction"].item() == 0.0
    assert logp.grad.item() == pytest.approx(-0.5)


def test_negative_advantage_above_range_is_not_clipped():
    # A=-1, r=1.5 > 1.28: min(1.5·-1, 1.28·-1) = -1.5 -> the unclipped branch: the clip only stops a
    # ratio from running further in the direction its advantage favours. loss 1.5, gradient -A·r = +1.5
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, stats = clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx(1.5)
    assert logp.grad.item() == pytest.approx(1.5)
    assert stats["clip_fraction"].item() == 0.0 and stats["clip_high_fraction"].item() == 0.0


def test_on_policy_gradient_is_minus_advantage_over_tokens():
    # one update per batch: old = logp.detach(), r = 1 everywhere -> d loss / d logp = -A / 3 tokens
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = clipped_surrogate(logp, logp.detach(), torch.tensor([0.6, -0.3]), mask)
    loss.backward()
    # loss = -(0.6 + 0.6 - 0.3) / 3 = -0.3
    assert loss.item() == pytest.approx(-0.3)
    assert logp.grad.tolist() == [pytest.approx([-0.2, -0.2]), pytest.approx([0.1, 0.0])]
    assert stats["ratio_mean"].item() == 1.0 and "kl" not in stats


def test_kl_penalty_k3_by_hand():
    logp = torch.tensor([[LOG_HALF, LOG_HALF, LOG_HALF, LOG_HALF]])
    ref = torch.tensor([[math.log(0.25), LOG_HALF, 0.0, float("-inf")]])
    mask = torch.tensor([[True, True, True, False]])
    # d = ref - logp: log 0.5 -> 0.5 + 0.69314718 - 1 = 0.19314718; 0 -> 0; log 2 -> 2 - 0.69314718 - 1
    assert kl_penalty(logp, ref, mask).tolist() == [pytest.approx([0.19314718, 0.0, 0.30685282, 0.0])]


def test_kl_term_in_the_loss():
    logp = torch.tensor([[LOG_HALF, LOG_HALF]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), 0.0]])  # k3 = [0.19314718, 0.30685282], sum 0.5
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = clipped_surrogate(logp, logp.detach(), torch.tensor([0.0]), mask, ref_logprobs=ref, beta=0.1)
    # A = 0: no surrogate; 0.1 · 0.5 / 2 tokens = 0.025
    assert loss.item() == pytest.approx(0.025)
    assert stats["kl"].item() == pytest.approx(0.25)
    loss.backward()
    # d k3 / d logp = 1 - e^d: d = log 0.5 -> 0.5, d = log 2 -> -1; × 0.1 / 2 -> [0.025, -0.05]
    assert logp.grad.tolist() == [pytest.approx([0.025, -0.05])]
    # beta = 0 skips the term even when a reference is given
    off, off_stats = clipped_surrogate(logp, logp.detach(), torch.tensor([0.0]), mask, ref_logprobs=ref)
    assert off.item() == 0.0 and "kl" not in off_stats
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        clipped_surrogate(logp, logp.detach(), torch.tensor([0.0]), mask, beta=0.1)


def test_nothing_kept_is_zero_and_differentiable():
    logp, old = batch()
    loss, stats = clipped_surrogate(logp, old, ADV, MASK, keep=torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and stats["clip_fraction"].item() == 0.0
    assert logp.grad.abs().sum().item() == 0.0


def test_rejects_bad_arguments():
    logp, old = batch()
    with pytest.raises(ValueError, match="loss_type"):
        clipped_surrogate(logp, old, ADV, MASK, loss_type="ppo")
    with pytest.raises(ValueError, match="advantages must be"):
        clipped_surrogate(logp, old, ADV[:2], MASK)
    with pytest.raises(ValueError, match="keep must be"):
        clipped_surrogate(logp, old, ADV, MASK, keep=KEEP[:2])


def test_truncated_importance_weights_by_hand():
    """Ratio 1 (one update per batch), advantage 1, three tokens whose sampler log-probs are 0, log 2
    and −log 4 away from the trainer's: w = exp(old − sampler) = 1, 1/2, 4, capped at 2 → 1, 1/2, 2.
    dapo loss = −(1 + 1/2 + 2)/3; d loss / d logp_t = −w_t / 3 (unclipped at ratio 1)."""
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    logp = old.clone().requires_grad_(True)
    sampler = old + torch.tensor([[0.0, math.log(2), -math.log(4)]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = clipped_surrogate(logp, old, torch.tensor([1.0]), mask, sampler_logprobs=sampler, tis_cap=2.0)
    assert float(loss) == pytest.approx(-3.5 / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 6, -2 / 3]]))
    assert float(stats["tis_weight"]) == pytest.approx(3.5 / 3)
    assert float(stats["tis_capped_fraction"]) == pytest.approx(1 / 3)
    # Off (no cap): the plain surrogate, whatever the sampler said.
    plain, stats = clipped_surrogate(logp, old, torch.tensor([1.0]), mask, sampler_logprobs=sampler)
    assert float(plain) == pytest.approx(-1.0) and "tis_weight" not in stats
    with pytest.raises(ValueError, match="tis_cap"):
        clipped_surrogate(logp, old, torch.tensor([1.0]), mask, tis_cap=2.0)
