"""Rewards for multiple-choice RL: which option a completion chose, and how well it kept the format.

Both are pure functions of the completion text, so they can run anywhere (trainer, evaluator, tests)
and give the same number. Both refuse to guess: an answer that cannot be read is counted wrong.
"""

from tars.rewards.answer import answer_span, extract_choice, normalize
from tars.rewards.format import format_score

__all__ = ["answer_span", "extract_choice", "format_score", "normalize"]
