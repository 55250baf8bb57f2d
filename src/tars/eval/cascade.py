"""The cascaded baseline: Whisper tiny.en transcribes each clip, the LLM answers the transcript.

It bounds what a speech LLM "should" reach with the same recogniser: the LLM reads the words (as
spoken: "question. A, option. B, option.") as plain text, so the difference to the speech condition is
what the end-to-end path loses beyond recognition, and the difference to the text condition is what
recognition errors and the spoken layout cost. Whisper tiny.en is the converted one the mini model's
encoder comes from (`tars mini build` converts it); transcripts are greedy, batched, 30 s windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


class Transcriber:
    def __init__(self, device: str | torch.device = "cpu"):
        from tars.models.convert.whisper_ct2 import convert_whisper_ct2, default_whisper_dir, load_whisper

        if not (default_whisper_dir() / "config.json").exists():
            convert_whisper_ct2()
        self.model, self.processor = load_whisper()
        self.model.to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, paths: Sequence[Path], max_new_tokens: int = 200) -> list[str]:
        from tars.data.audio import load_audio

        clips = [load_audio(p) for p in paths]
        feats = self.processor.feature_extractor(clips, sampling_rate=16_000, return_tensors="pt").input_features
        ids = self.model.generate(feats.to(self.device), max_new_tokens=max_new_tokens)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
