"""The mini model's projector: stack k encoder frames, then a two-layer MLP into the LLM.

Why stack: Qwen2-Audio's encoder emits 25 frames per second, so a spoken question of ~14 s becomes
~345 audio tokens, which dominate the LLM's cost on a CPU. Stacking k = 4 neighbouring frames (the
usual trick of SALMONN / LLaMA-Omni-style adapters) cuts that to ~6 tokens per second with no loss of
information the projector can use: the frames are concatenated, not averaged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class StackingProjector(nn.Module):
    def __init__(self, d_audio: int, d_model: int, stack: int = 4, d_hidden: int | None = None):
        super().__init__()
        self.stack = stack
        d_hidden = d_hidden or d_model * 2
        self.norm = nn.LayerNorm(d_audio * stack)
        self.fc1 = nn.Linear(d_audio * stack, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def n_tokens(self, n_frames: int) -> int:
        return math.ceil(n_frames / self.stack)

    def forward(self, frames: Tensor) -> Tensor:
        """[n, d_audio] (one clip's valid frames) → [ceil(n / stack), d_model]."""
        n, d = frames.shape
        pad = self.n_tokens(n) * self.stack - n
        if pad:
            frames = torch.cat([frames, frames.new_zeros(pad, d)], 0)
        x = frames.reshape(-1, self.stack * d)
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))

    def config(self) -> dict:
        return {
            "type": "stack",
            "d_audio": self.fc1.in_features // self.stack,
            "d_model": self.fc2.out_features,
            "stack": self.stack,
            "d_hidden": self.fc1.out_features,
        }
