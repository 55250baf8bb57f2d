"""`tars analyze layers`: where inside the network speech and text part ways (the paper's Fig. 2).

For each question, ONE completion is teacher-forced under both prompts — the speech prompt (audio
only) and the text prompt (question + lettered options) — and each decoder layer's states over that
completion's tokens (prompt and final end token excluded, as for R_rep) are compared between the two
prompts: the curve is, per layer, a cosine (see `cosine` below) averaged over questions.

Which completion: `text_greedy` (default) is the model's own greedy answer from the text prompt —
what it says when it reasons well — so the curve shows how close the speech-conditioned states come to
the text-conditioned ones on the same reasoning; `gold` uses the record's gold chain of thought (the
same tokens for every checkpoint, so curves of several checkpoints compare like for like). Tokens are
shared across modalities in both cases: the difference in states is the prompt's doing alone.

Which cosine (`cosine`): `per_token` (default, the paper's figure): per completion token, the cosine
of its speech- and text-conditioned states, averaged over the completion's tokens (final end token
excluded), then over questions; `mean_pooled`: the cosine of the two completion-mean-pooled states,
the very quantity R_rep rewards. The two differ (a mean of cosines is not the cosine of means):
docs/fidelity.md. `last_layer`: the last
layer's state before (`pre_norm`, default, as R_rep) or after (`post_norm`) the final norm.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Literal, Sequence

import torch

from tars.atomic import atomic_write_bytes, atomic_write_text
from tars.data.prompts import gold_completion
from tars.errors import UserError


Cosine = Literal["mean_pooled", "per_token"]
COSINES: tuple[str, ...] = ("mean_pooled", "per_token")


def layer_cosines(speech_pooled: torch.Tensor, text_pooled: torch.Tensor) -> torch.Tensor:
    """[N, L, H] pooled states under each prompt → [L] mean over questions of the per-layer cosine."""
    return torch.nn.functional.cosine_similarity(speech_pooled.float(), text_pooled.float(), dim=-1).mean(0)


def token_cosines(speech: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, T, H] per-token states of the same completions under each prompt and the [N, T] tokens to
    count → [N] per question, the mean over its counted tokens of the per-token cosine (float32;
    positions outside `mask` never enter, whatever they hold)."""
    cos = torch.nn.functional.cosine_similarity(speech.float(), text.float(), dim=-1)
    return torch.where(mask, cos, 0.0).sum(1) / mask.sum(1).clamp(min=1)


def _per_token_batch(backend, speech_in, text_in, comps, idx, layers, last_layer) -> torch.Tensor:
    """[N, L]: per question and layer, the mean per-token cosine (speech vs text states). The speech
    forward keeps its completion states per layer; the text forward compares against them as it
    passes, so only one modality's states are ever held."""
    held: dict[int, torch.Tensor] = {}
    out = torch.zeros(len(comps), len(layers))

    def keep(j, h, pool):
        held[j] = h.clone()

    def compare(j, h, pool):
        out[:, j] = token_cosines(held.pop(j), h, pool).cpu()

    backend.score(speech_in, comps, idx, layers, last_layer=last_layer, token_states=keep)
    backend.score(text_in, comps, idx, layers, last_layer=last_layer, token_states=compare)
    return out


@torch.no_grad()  # a loaded model's weights require grad: the prompts' audio encoding would keep its graph (2 GB)
def analyze_model(backend, records, base_dir: Path | None, completion: Literal["text_greedy", "gold"] = "text_greedy",
                  batch_size: int = 8, max_new_tokens: int = 192, progress: bool = True,
                  cosine: Cosine = "per_token", last_layer: str = "pre_norm") -> list[float]:
    from tqdm import tqdm

    if cosine not in COSINES:
        raise ValueError(f"cosine must be one of {COSINES}, got {cosine!r}")
    layers = list(range(1, len(backend.decoder_layers()) + 1))
    sp, tp, per_token = [], [], []
    stop = backend.stop_token_ids[0]
    for i in tqdm(range(0, len(records), batch_size), desc="layers", unit="batch", disable=not progress):
        batch = records[i : i + batch_size]
        text_in = backend.build_inputs(batch, "text")
        speech_in = backend.build_inputs(batch, "speech", base_dir=base_dir)
        if completion == "text_greedy":
            comps = backend.generate(text_in, temperature=0.0, max_new_tokens=max_new_tokens).token_ids
        else:
            comps = [backend.tokenizer(gold_completion(r), add_special_tokens=False)["input_ids"] + [stop]
                     for r in batch]
        idx = list(range(len(batch)))
        if cosine == "per_token":
            per_token.append(_per_token_batch(backend, speech_in, text_in, comps, idx, layers, last_layer))
            continue
        sp.append(backend.score(speech_in, comps, idx, layers, last_layer=last_layer).pooled["mean"])
        tp.append(backend.score(text_in, comps, idx, layers, last_layer=last_layer).pooled["mean"])
    if cosine == "per_token":
        return torch.cat(per_token).mean(0).tolist()
    return layer_cosines(torch.cat(sp), torch.cat(tp)).tolist()


def plot_curves(curves: dict[str, list[float]], path: Path, title: str,
                ylabel: str = "cos(speech, text) of pooled states") -> None:
    """One line per model, layer on x, cosine on y; written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tars.eval.report import figure_png

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    atomic_write_bytes(path, figure_png(fig))


def run_layers(models: Sequence[str], data: str, out: Path, limit: int | None = 100,
               completion: Literal["text_greedy", "gold"] = "text_greedy", batch_size: int = 8,
               progress: bool = True, names: Sequence[str] | None = None, cosine: Cosine = "per_token",
               last_layer: str = "pre_norm") -> dict:
    """`names`: the curves' labels (default: the model paths); `cosine`, `last_layer`: see the module
    docstring."""
    from tars.data.bundled import resolve_data
    from tars.data.jsonl import read_records
    from tars.data.sources import spoken
    from tars.models.loading import load_backend

    path = resolve_data(data)
    records = read_records(path, check_audio_files=True, max_audio_s=None)  # bad clips: all listed, before a model loads
    records = records[:limit] if limit else records
    base: Path | None = path.parent
    if not all(r.audio for r in records):
        records, base = spoken(records)
    curves: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    if names is not None and len(names) != len(models):
        raise ValueError("one name per model")
    for i, m in enumerate(models):
        label = names[i] if names else str(m)
        backend = load_backend(m)
        keep = [r for r in records if (r.duration_s or 0.0) <= backend.max_audio_s]
        if not keep:
            raise UserError(f"{data}: every clip is longer than {m}'s {backend.max_audio_s:g} s encoder window")
        curves[label] = analyze_model(backend, keep, base, completion, batch_size, progress=progress,
                                      cosine=cosine, last_layer=last_layer)
        counts[label] = len(keep)
        del backend  # before the next model loads: one model in memory at a time, not two
        gc.collect()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"data": data, "n": counts, "completion": completion, "cosine": cosine, "last_layer": last_layer,
              "curves": curves}
    atomic_write_text(out / "layers.json", json.dumps(result, indent=2))
    plot_curves(curves, out / "layers.png", f"speech vs text states per layer ({Path(data).stem}, n={max(counts.values())})",
                "cos(speech, text) of pooled states" if cosine == "mean_pooled" else "mean per-token cos(speech, text)")
    return result
