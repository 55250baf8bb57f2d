"""The imitation baselines' pure parts, against numbers worked out by hand."""

import math
import random

import pytest
import torch

from tars.rl.imitation import dpo_loss, dpo_pairs, sequence_logprob, sft_loss, sft_targets


def test_sft_targets_pick_a_correct_text_rollout_or_none():
    picks = sft_targets([[False, True, False], [False, False, False], [True, True, True]], random.Random(0))
    assert picks[0] == 1 and picks[1] is None and picks[2] in (0, 1, 2)


def test_dpo_pairs_need_a_correct_text_and_a_wrong_speech_rollout():
    text = [[False, True], [True, False], [False, False]]
    speech = [[True, False, True], [True, True, True], [False, False, False]]
    assert dpo_pairs(text, speech, random.Random(0)) == [(1, 1), None, None]


def test_sft_loss_is_the_token_mean_nll():
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert float(sft_loss(lp, mask)) == pytest.approx((1 + 2 + 1.5) / 5)
    assert float(sft_loss(lp, mask, normalizer=9)) == pytest.approx(4.5 / 9)


def test_sequence_logprob_sums_the_masked_tokens():
    lp = torch.tensor([[-1.0, -2.0, -7.0]])
    assert sequence_logprob(lp, torch.tensor([[True, True, False]])).tolist() == [-3.0]


def test_dpo_loss_by_hand():
    # Policy moved chosen up by 1 and rejected down by 1 against the reference: margin 2, β 0.5.
    loss, stats = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0]), 0.5)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1.0)))
    assert float(stats["margin"]) == pytest.approx(1.0) and float(stats["pair_accuracy"]) == 1.0
    # No movement: log 2, whatever β; and the gradient raises chosen, lowers rejected.
    c, r = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, _ = dpo_loss(c, r, torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1)
    assert float(loss.detach()) == pytest.approx(math.log(2))
    loss.backward()
    assert float(c.grad) == pytest.approx(-0.05) and float(r.grad) == pytest.approx(0.05)
