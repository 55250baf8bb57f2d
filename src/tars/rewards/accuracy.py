"""The base reward every rollout gets, speech or text: DESIGN §2 step 2, `R_base = R_acc + λ·R_fmt`.

Rewards are plain functions in the TRL style: one list of completions in, one list of floats out,
the i-th float scoring the i-th completion, with whatever per-completion data they need (`options`,
`answers`) passed as parallel lists. They know nothing about modalities, groups or tensors, so the
trainer, the evaluator and the tests all get the same number for the same text.
"""

from __future__ import annotations

from tars.rewards.answer import extract_choice
from tars.rewards.format import FormatLevels, format_score

#: λ of `R_base = R_acc + λ·R_fmt` in the paper (the reference code uses 1.0 with the same 1/0.5/0 scale).
FORMAT_WEIGHT = 0.5


def _check_lengths(completions: list[str], options: list[list[str]], answers: list[str]) -> None:
    if not len(completions) == len(options) == len(answers):
        raise ValueError(
            f"one options list and one answer per completion: got {len(completions)} completions, "
            f"{len(options)} options lists, {len(answers)} answers"
        )


def accuracy_reward(completions: list[str], options: list[list[str]], answers: list[str]) -> list[float]:
    """`R_acc`: 1.0 where the letter `extract_choice` reads out of completion i is the gold letter
    `answers[i]` (for the options `options[i]`), else 0.0.

    An unreadable answer (`extract_choice` → None) scores 0.0: the policy is never paid for text that
    does not state a choice. Gold letters compare case-insensitively (`"b"` is `"B"`).
    """
    _check_lengths(completions, options, answers)
    return [
        1.0 if (choice := extract_choice(text, opts)) is not None and choice == gold.strip().upper() else 0.0
        for text, opts, gold in zip(completions, options, answers)
    ]


def base_reward(
    completions: list[str], options: list[list[str]], answers: list[str], format_weight: float = FORMAT_WEIGHT,
    format_levels: FormatLevels = "binary",
) -> list[float]:
    """`R_base = R_acc + λ·R_fmt` per completion (DESIGN §2 step 2), λ = `format_weight`.

    `R_fmt` is `format_score` at `format_levels`: binary by default (the paper, and the trainer's
    default: 1 strict, else 0), so with λ = 0.5 a right answer in the exact format scores 1.5, a right
    answer in a loose format 1.0, a wrong answer in the exact format 0.5; or graded (the reference
    code's scale: 1 strict, 0.5 loose, 0 otherwise; docs/fidelity.md row 3). Every rollout gets this, speech and text alike; only speech rollouts add the alignment
    terms (`tars.rewards.alignment`). The trainer computes the same sum from the two parts, which it
    also logs.
    """
    acc = accuracy_reward(completions, options, answers)
    return [a + format_weight * format_score(text, format_levels) for a, text in zip(acc, completions)]
