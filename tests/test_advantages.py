"""Group-relative advantages (DESIGN §2 step 5), against numbers worked out by hand."""

import math

import pytest
import torch

from tars.rewards import text_alignment_reward
from tars.rl.advantages import group_advantages

R2 = 1 / math.sqrt(2)

# 2 questions × (2 speech + 2 text), modality 0 = speech, 1 = text
QUESTION = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
MODALITY = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
REWARDS = torch.tensor([2.0, 1.0, 1.5, 1.5, 0.0, 3.0, 1.0, 0.0])


def test_per_question_and_modality():
    # q0 speech [2, 1]: mean 1.5 -> [0.5, -0.5]; q0 text [1.5, 1.5]: flat -> [0, 0]
    # q1 speech [0, 3]: mean 1.5 -> [-1.5, 1.5]; q1 text [1, 0]: mean 0.5 -> [0.5, -0.5]
    expected = [0.5, -0.5, 0.0, 0.0, -1.5, 1.5, 0.5, -0.5]
    assert group_advantages(REWARDS, QUESTION, MODALITY).tolist() == pytest.approx(expected)


def test_order_does_not_matter():
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    full = group_advantages(REWARDS, QUESTION, MODALITY)
    shuffled = group_advantages(REWARDS[perm], QUESTION[perm], MODALITY[perm])
    assert shuffled.tolist() == pytest.approx(full[perm].tolist())


def test_joint_groups_by_question_only():
    # q0 all [2, 1, 1.5, 1.5]: mean 1.5 -> [0.5, -0.5, 0, 0]
    # q1 all [0, 3, 1, 0]: mean 1 -> [-1, 2, 0, -1]
    expected = [0.5, -0.5, 0.0, 0.0, -1.0, 2.0, 0.0, -1.0]
    assert group_advantages(REWARDS, QUESTION, MODALITY, joint=True).tolist() == pytest.approx(expected)


def test_scale_std_uses_sample_std():
    # pairs: deviations ±d, sample var = 2d²/(2-1), std = d·√2 -> ±1/√2 (population std would give ±1)
    # q0 text is flat -> 0
    expected = [R2, -R2, 0.0, 0.0, -R2, R2, R2, -R2]
    got = group_advantages(REWARDS, QUESTION, MODALITY, scale_std=True, eps=0.0)
    assert got.tolist() == pytest.approx(expected)
    # [0, 1, 2]: mean 1, sample var (1 + 0 + 1)/2 = 1 -> [-1, 0, 1]  (population: ±1.2247)
    three = group_advantages(torch.tensor([0.0, 1.0, 2.0]), torch.zeros(3, dtype=torch.long),
                             torch.zeros(3, dtype=torch.long), scale_std=True, eps=0.0)
    assert three.tolist() == pytest.approx([-1.0, 0.0, 1.0])
    # eps enters the denominator: 0.5 / (√0.5 + 1) = 0.29289322
    eps1 = group_advantages(torch.tensor([2.0, 1.0]), torch.zeros(2, dtype=torch.long),
                            torch.zeros(2, dtype=torch.long), scale_std=True, eps=1.0)
    assert eps1.tolist() == pytest.approx([0.5 / (R2 + 1), -0.5 / (R2 + 1)])


@pytest.mark.parametrize("scale_std", [False, True])
def test_flat_and_singleton_groups_are_exactly_zero(scale_std):
    # 7 × 0.1 in float32: sum/7 is not exactly 0.1, yet the advantage must be exactly 0 (no 1e-8 / eps)
    rewards = torch.tensor([0.1] * 7 + [5.0])
    question = torch.tensor([3] * 7 + [9])  # question 9 is a singleton
    modality = torch.tensor([1] * 7 + [0])
    got = group_advantages(rewards, question, modality, scale_std=scale_std)
    assert got.tolist() == [0.0] * 8
    assert not torch.isnan(got).any()


def test_text_alignment_constant_cancels_in_text_group():
    # text rewards [1.5, 0.5, 1.0] of one question, mean 1.0 -> [0.5, -0.5, 0]; adding the speech mean
    # alignment c = 0.45 to each gives [1.95, 0.95, 1.45], mean 1.45 -> the same advantages
    c = text_alignment_reward([0.5, 1.0, 0.0, 0.3], "speech_mean")
    q, m = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    plain = group_advantages(torch.tensor([1.5, 0.5, 1.0]), q, m)
    shifted = group_advantages(torch.tensor([1.5, 0.5, 1.0]) + c, q, m)
    assert plain.tolist() == pytest.approx([0.5, -0.5, 0.0])
    assert shifted.tolist() == pytest.approx([0.5, -0.5, 0.0], abs=1e-6)


def test_dtype_and_errors():
    ints = group_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([0, 0]))
    assert ints.dtype == torch.float32 and ints.tolist() == [0.5, -0.5]
    empty = torch.zeros(0, dtype=torch.long)
    assert group_advantages(torch.zeros(0), empty, empty).shape == (0,)
    with pytest.raises(ValueError, match="1-D of one length"):
        group_advantages(REWARDS, QUESTION[:4], MODALITY)
    with pytest.raises(ValueError, match="modality must be 0"):
        group_advantages(REWARDS, QUESTION, MODALITY + 1)


def test_within_group_spread_by_hand():
    from tars.rl.advantages import within_group_spread

    r = torch.tensor([[1.0, 3.0, 1.0, 3.0],   # population std 1
                      [0.5, 0.5, 0.5, 0.5],   # 0
                      [0.0, 4.0, 0.0, 0.0]])  # mean 1, deviations (−1, 3, −1, −1): std √3
    assert within_group_spread(r) == pytest.approx((1 + 0 + 3 ** 0.5) / 3)
    assert within_group_spread(r, torch.tensor([True, False, False])) == pytest.approx(1.0)
    assert within_group_spread(r, torch.tensor([False, False, False])) == 0.0
    with pytest.raises(ValueError):
        within_group_spread(r.flatten())
