"""Rewards for multiple-choice RL: which option a completion chose, and how well it kept the format.

Both are pure functions of the completion text, so they can run anywhere (trainer, evaluator, tests)
and give the same number. Both refuse to guess: an answer that cannot be read is counted wrong.

`accuracy` combines them into the base reward every rollout gets (DESIGN §2 step 2); `alignment`
holds the TARS alignment rewards of speech rollouts (steps 3-4). The alignment names load lazily, on
first use, so importing the text rewards does not import torch.
"""

from tars.rewards.accuracy import accuracy_reward, base_reward
from tars.rewards.answer import answer_span, extract_choice, normalize
from tars.rewards.format import format_score

_ALIGNMENT = (
    "GroupAlignment",
    "SentenceEmbedder",
    "alignment_rewards",
    "behavior_reward",
    "choose_references",
    "cosine_similarity",
    "embedding_text",
    "representation_reward",
    "select_layers",
    "text_alignment_reward",
)

__all__ = [
    "accuracy_reward",
    "answer_span",
    "base_reward",
    "extract_choice",
    "format_score",
    "normalize",
    *_ALIGNMENT,
]


def __getattr__(name: str):
    if name in _ALIGNMENT:
        from tars.rewards import alignment

        return getattr(alignment, name)
    raise AttributeError(f"module 'tars.rewards' has no attribute {name!r}")
