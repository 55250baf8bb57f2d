"""The mini model's projectors: `StackingProjector` (stack k encoder frames, then a two-layer MLP into the
LLM), `CTCProjector` (the same stacking, then CTC over the LLM's own vocabulary; see its docstring) and
`SoftCTCProjector` (the CTC projector's features kept continuous, one embedding per stacked frame).

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
    kind = "stack"

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
        return self.mlp(frames.reshape(-1, self.stack * d))

    def mlp(self, stacked: Tensor) -> Tensor:
        """[..., stack · d_audio] stacked frames → [..., d_model]."""
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(stacked))))

    def config(self) -> dict:
        return {
            "type": self.kind,
            "d_audio": self.fc1.in_features // self.stack,
            "d_model": self.fc2.out_features,
            "stack": self.stack,
            "d_hidden": self.fc1.out_features,
        }


def ctc_keep(ids: Tensor, blank: int) -> Tensor:
    """Indices of the frames that CTC's greedy decoding keeps: not blank, and not a repeat of the
    frame before (a repeat separated by a blank is a new token). [T] → [K]."""
    prev = torch.cat([ids.new_full((1,), blank), ids[:-1]])
    return torch.nonzero((ids != blank) & (ids != prev)).flatten()


class CTCProjector(StackingProjector):
    """A CTC-guided projector: each stacked frame predicts a token of the LLM's own vocabulary (or a
    blank), and the LLM receives one embedding per predicted token, a probability-weighted mix of its
    own input-embedding rows.

    Why: the stacking projector, trained on 640 clips to reproduce gold completions and transcripts,
    carried the gist of a question but not its option values (held-out speech accuracy 15 %, below
    chance; docs/results.md). A CTC target says frame by frame which words were spoken, needs no LLM
    forward to train (only the cached encoder outputs), and hands the LLM inputs it already knows how to
    read — so the gap that remains is the one recognition errors open, the gap TARS is meant to close.

    The logits are dot products with the LLM's embedding table (frozen, not a parameter of this
    module: it lives in the LLM and is not saved twice), plus a learned blank logit, so the head costs
    no vocabulary-sized weight of its own.
    """

    kind = "ctc"

    def __init__(self, d_audio: int, d_model: int, embedding: nn.Embedding, stack: int = 2,
                 d_hidden: int | None = None):
        super().__init__(d_audio, d_model, stack, d_hidden)
        self.blank = nn.Linear(d_model, 1)
        self._table = [embedding]  # a plain list: the LLM owns these weights, this module only reads them

    @property
    def embedding(self) -> nn.Embedding:
        return self._table[0]

    @property
    def blank_id(self) -> int:
        """The blank's index in the logits: one past the LLM's vocabulary."""
        return self.embedding.num_embeddings

    n_frames = StackingProjector.n_tokens

    def logits(self, frames: Tensor, lengths: Tensor | None = None, vocab_dtype: torch.dtype | None = None,
               features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """[B, n, d_audio] (or [n, d_audio]) encoder frames → [B, ceil(n / stack), vocab + 1] CTC
        logits, the blank last. Padding frames beyond `lengths` are zeroed before stacking.
        `vocab_dtype` (training): the vocabulary-sized product in that dtype — bf16 makes it several times faster
        on a CPU with avx512_bf16, and it dominates the cost of a CTC step. `features`: also return the
        MLP's output h [B, ceil(n / stack), d_model] the logits are read from."""
        single = frames.dim() == 2
        if single:
            frames = frames[None]
        B, n, d = frames.shape
        if lengths is not None:
            keep = torch.arange(n, device=frames.device)[None, :] < lengths[:, None]
            frames = frames * keep[..., None]
        pad = self.n_frames(n) * self.stack - n
        if pad:
            frames = torch.cat([frames, frames.new_zeros(B, pad, d)], 1)
        h = self.mlp(frames.reshape(B, -1, self.stack * d))
        vd = vocab_dtype or h.dtype
        vocab = (h.to(vd) @ self.embedding.weight.to(vd).T).to(h.dtype)
        out = torch.cat([vocab, self.blank(h)], -1)
        if single:
            out, h = out[0], h[0]
        return (out, h) if features else out

    def forward(self, frames: Tensor) -> Tensor:
        """[n, d_audio] (one clip's valid frames) → [K, d_model]: one embedding per kept frame."""
        logits = self.logits(frames)
        keep = ctc_keep(logits.argmax(-1), self.blank_id)
        if keep.numel() == 0:  # nothing recognised: keep the frame most sure it heard a token
            keep = logits[:, :-1].max(-1).values.argmax().reshape(1)
        probs = logits[keep, :-1].softmax(-1)
        return probs @ self.embedding.weight.to(probs.dtype)


class SoftCTCProjector(CTCProjector):
    """Every stacked frame becomes one continuous embedding: the CTC posterior's mix of the LLM's
    embedding rows (a learned vector for the blank), plus a linear map of the MLP's features.

    Why: the `CTCProjector` collapses speech to one near-exact token embedding per recognised token, so
    the LLM's states from speech and from text are almost the same (layer cosine ≥ 0.987 at every
    layer, docs/results.md) and a representation reward has nothing to close. Real Speech LLMs hand the
    LLM one continuous vector per audio frame; this projector does the same (≈ 8 per second at stack 3,
    blanks and repeats included) and starts from a trained CTC projector (`from_ctc`), so the LLM
    first sees frame-rate soft token mixtures — a real but bridgeable shift — that knowledge distillation
    (train/kd.py) then adapts. The residual map starts at zero: at initialisation the output is exactly
    the posterior mix.
    """

    kind = "soft_ctc"

    def __init__(self, d_audio: int, d_model: int, embedding: nn.Embedding, stack: int = 3,
                 d_hidden: int | None = None):
        super().__init__(d_audio, d_model, embedding, stack, d_hidden)
        with torch.no_grad():
            mean = embedding.weight.float().mean(0)
        self.blank_embedding = nn.Parameter(mean.clone())
        self.residual = nn.Linear(d_model, d_model, bias=False)
        nn.init.zeros_(self.residual.weight)

    @classmethod
    def from_ctc(cls, ctc: CTCProjector) -> "SoftCTCProjector":
        """A soft projector with `ctc`'s stacking MLP and blank head (the new parameters at their init)."""
        spec = ctc.config()
        soft = cls(spec["d_audio"], spec["d_model"], ctc.embedding, spec["stack"], spec["d_hidden"])
        missing, unexpected = soft.load_state_dict(ctc.state_dict(), strict=False)
        if unexpected or set(missing) != {"blank_embedding", "residual.weight"}:
            raise ValueError(f"not a CTC projector's weights (missing {missing}, unexpected {unexpected})")
        return soft.to(next(ctc.parameters()).dtype)

    def forward(self, frames: Tensor) -> Tensor:
        """[n, d_audio] (one clip's valid frames) → [ceil(n / stack), d_model]: one embedding per frame."""
        logits, h = self.logits(frames, features=True)
        probs = logits.softmax(-1)
        table = torch.cat([self.embedding.weight.to(probs.dtype), self.blank_embedding[None].to(probs.dtype)], 0)
        return probs @ table + self.residual(h)
