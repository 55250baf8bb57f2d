"""The TARS trainer: on-policy RL that pulls a Speech LLM's reasoning from speech towards its own
reasoning from text (DESIGN §2), one training step and the resumable loop around it.

`TarsTrainer.step` is the algorithm, readable top to bottom next to the paper; its comments carry the
numbers of DESIGN §2:

1. paired rollouts: G_s completions from the speech prompt, G_t from the text prompt, current policy;
2. `R_base = R_acc + λ·R_fmt` for every rollout;
3. alignment rewards for speech rollouts only, against a *correct* text rollout of the same question:
   `R_rep` (per-layer cosine of completion-pooled hidden states) and `R_beh` (cosine of sentence
   embeddings); speech reward `R_base + w_rep·R_rep + w_beh·R_beh`;
4. asymmetry: text rollouts get `R_base` plus at most a per-question constant (`text_alignment`);
5. advantages `A = r − mean(r over the same question and modality)` (`group_advantages`);
6. the DAPO token-level clipped surrogate (`clipped_surrogate`), LoRA on the LLM only.

The ablations are configuration, not code: `method` = `grpo` (R_base only), `grpo_rep` (+R_rep),
`grpo_beh` (+R_beh), `tars` (both), and the imitation baselines `sft` / `dpo` (same rollouts, a fixed
target instead of a policy gradient: `_imitation_update`, rl/imitation.py); plus layer sets, pooling, reference choice, the text alignment term,
std scaling, joint groups and the loss normalisation.

Two choices worth knowing:

* **One modality's graph at a time.** Text advantages never depend on the speech rollouts (step 4's
  constant cancels in the text group), so each micro-batch runs text's forward and backward first,
  then speech's forward (which yields R_rep's speech states), rewards and backward: the activations
  of one modality's completions are alive at a time, not both (`joint_groups` mixes the two groups'
  rewards, so there both forwards wait for one backward). With `activation_checkpointing` the blocks
  keep only their inputs; the LM head's log-probs are computed in chunks (`Backend.score`).
* **One forward per modality and micro-batch.** With one update per batch the sampling policy is the
  policy being trained, so the "old" log-probs are the current ones detached (ratio 1, plain policy
  gradient) and the grad-enabled forward that gives the log-probs also hands out, through
  `Backend.score`'s pooling hooks, the per-layer states `R_rep` needs. The reference code runs an extra
  no-grad forward over every completion for those states; here `R_rep` costs no forward at all. The
  states then carry the LoRA dropout of that forward, a noise of the same size as the one in the
  log-probs the gradient uses; `rep_dropout=off` buys dropout-free states with that extra no-grad
  forward per modality.
* **Where text completions are scored** (`text_scored_under`). `text` (default, the paper): text
  completions' log-probs and hidden states are computed under the text prompt they were sampled from.
  `speech` (the public reference code): they are computed under the *speech* prompt of the same
  question, so the text trajectories are both trained as speech-prompted behaviour and compared as
  speech-conditioned states. That is off-policy for the text rollouts (sampled from the text prompt)
  with no importance correction, as in the reference code; use it to reproduce that code. (There
  `sampler/kl` mixes in the text rollouts' change of prompt, and `tis_cap` would reweight it.)

Runs resume after a kill: every random draw of step k comes from generators seeded by (seed, k) —
per completion row for the rollouts and per question for the reference choice, so the draws do not
depend on how the step's questions are split over processes or micro-batches (`rl/distributed.py`);
the question order is a function of (seed, epoch), and checkpoints hold the LoRA weights, optimizer,
scheduler and RNG states.

Every place where this differs from the paper or the public reference code, and the switch for it, is
tabled in docs/fidelity.md.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from tars.atomic import atomic_write_bytes, atomic_write_text
from tars.config import Config, save_config
from tars.data.schema import Record
from tars.data.sources import DataConfig, check_data, load_data
from tars.errors import UserError
from tars.host_memory import release_freed_memory
from tars.metrics_log import MetricsLog
from tars.models.backend import DecodeOptions
from tars.models.lora import LoraSettings, adapters_disabled, add_lora, load_adapter, merge_lora, save_adapter
from tars.paths import resolve
from tars.rewards.accuracy import accuracy_reward
from tars.rewards.alignment import (SentenceEmbedder, alignment_rewards, resolve_embedder, select_layers,
                                    text_alignment_reward)
from tars.rewards.format import format_score
from tars.rl.advantages import SPEECH, TEXT, group_advantages, within_group_spread
from tars.rl.distributed import Group
from tars.rl.imitation import dpo_loss, dpo_pairs, sequence_logprob, sft_loss, sft_targets
from tars.rl.losses import clipped_surrogate, kl_penalty, loss_normalizer
from tars.rl.strategies import Parallel
from tars.rl.strategies import make as make_strategy
from tars.rl.strategies import weight_bytes
from tars.train.checkpoint import step_of

Method = Literal["tars", "grpo", "grpo_rep", "grpo_beh", "sft", "dpo"]
#: The imitation baselines (`rl/imitation.py`): a fixed target sequence instead of a policy gradient.
IMITATION = ("sft", "dpo")
#: Methods whose speech reward has the representation / behaviour alignment term.
USES_REP = ("tars", "grpo_rep")
USES_BEH = ("tars", "grpo_beh")


class TarsConfig(Config):
    model: str
    out: str
    #: grpo = R_base only; grpo_rep = + representation alignment; grpo_beh = + behaviour; tars = both;
    #: sft = speech prompt → a correct text rollout; dpo = chosen correct text vs rejected wrong speech.
    method: Method = "tars"
    data: DataConfig = DataConfig()
    #: Optimisation steps; None = `epochs` passes over the data (the paper: 3 epochs).
    steps: int | None = Field(None, ge=1)
    epochs: int = Field(3, ge=1)
    questions_per_step: int = Field(8, ge=1)
    speech_rollouts: int = Field(4, ge=1)
    text_rollouts: int = Field(4, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    #: The temperature of the log-probs the loss uses: `sampling` = softmax(logits / temperature),
    #: the distribution the rollouts came from (what the policy gradient needs; temperature 0 scores
    #: at 1); `one` = softmax(logits) whatever the sampling temperature (tars before issue 14). Same
    #: numbers at the paper's temperature 1. Top-p is never applied in scoring (docs/fidelity.md).
    score_temperature: Literal["sampling", "one"] = "sampling"
    max_new_tokens: int = Field(512, ge=1)
    #: λ of R_base = R_acc + λ·R_fmt (paper 0.5; the reference code 1.0).
    format_weight: float = 0.5
    #: R_fmt's values: `binary` (the paper) 1 for the strict format, else 0; `graded` (the reference
    #: code) 1 strict / 0.5 loose / 0 (rewards/format.py). Reference code = graded + format_weight 1.
    format_levels: Literal["binary", "graded"] = "binary"
    w_rep: float = 1.0
    w_beh: float = 1.0
    #: Decoder layers R_rep averages over: all | shallow | middle | deep | last-k | a-b | [l1, l2, ...].
    layers: str | list[int] = "all"
    #: What shallow / middle / deep mean: `paper` = layers 1-10 / 11-20 / 21-30 (cut to the model's
    #: depth: 21-28 on a 28-layer Qwen2); `equal_thirds` = the stack split in three (28 → 1-10 / 11-19 / 20-28).
    layer_groups: Literal["paper", "equal_thirds"] = "paper"
    #: The last decoder layer's state in R_rep: `pre_norm` = the last block's output, like every
    #: other layer; `post_norm` = after the final norm (transformers' hidden_states[-1], the reference
    #: code's). The paper does not say; only matters when the last layer is among `layers`.
    last_layer: Literal["pre_norm", "post_norm"] = "pre_norm"
    #: R_rep's hidden states: on (true) = from the grad-enabled forward of the loss (LoRA dropout
    #: active, no extra pass); off (false) = from one more no-grad forward per modality without dropout.
    rep_dropout: bool = True
    pooling: Literal["mean", "last"] = "mean"
    reference: Literal["random", "round_robin"] = "random"
    text_alignment: Literal["speech_mean", "zero", "none"] = "speech_mean"
    #: `text` = the paper; `speech` = the public reference code's variant (see the module docstring).
    text_scored_under: Literal["text", "speech"] = "text"
    advantage_std: bool = False
    joint_groups: bool = False
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    #: Truncated completions are always masked out of the loss; True also counts their tokens
    #: (sequences, for grpo / dr_grpo) in its normaliser, as DAPO's 1/Σ|o_i| over every sampled
    #: completion reads; False (default) = kept ones only (docs/fidelity.md).
    truncated_in_normalizer: bool = False
    eps_low: float = Field(0.2, ge=0)
    eps_high: float = Field(0.28, ge=0)
    beta: float = Field(0.0, ge=0)
    #: Truncated importance sampling against the sampler's log-probs (rl/losses.py): the cap C of
    #: min(π_trainer/π_sampler, C) per token, e.g. 2.0; None = off. `sampler/kl` shows whether needed.
    tis_cap: float | None = Field(None, gt=0)
    #: β of the DPO loss (method=dpo): how far the implicit reward may move from the LoRA-free model.
    dpo_beta: float = Field(0.1, gt=0)
    lr: float = Field(2e-5, gt=0)
    warmup_frac: float = Field(0.01, ge=0, le=1)
    #: After warm-up: `linear` decay to 0 (the Hugging Face Trainer's default), `cosine`, or `constant`.
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    lora: LoraSettings = LoraSettings()
    #: Questions per gradient-accumulation micro-batch (whole question groups); None = the whole step.
    micro_batch_questions: int | None = Field(None, ge=1)
    #: Recompute each decoder block's activations in the backward instead of keeping them
    #: (`Backend.checkpoint_blocks`): about one more forward of compute for the memory of one block's
    #: activations instead of every block's. On in the 7B recipes.
    activation_checkpointing: bool = False
    #: CPU: hand freed activation memory back to the operating system at once (tars/host_memory.py:
    #: glibc's mmap threshold fixed at 1 MiB), so the process's RSS follows the tensors it holds — a
    #: checkpointed mini step peaked at 1.9 GB instead of 6.1 — for ~40 % more step time in page
    #: faults. Process-wide from the trainer's start. On in `tars demo`.
    release_memory: bool = False
    #: The rollouts' KV cache: dynamic (rows that stop leave the batch) or static (preallocated for
    #: prompt + max_new_tokens, every row to the end: one shape per step, what `compile_decode` needs).
    decode_cache: Literal["dynamic", "static"] = "dynamic"
    #: `torch.compile` the static decode step (needs decode_cache=static). For GPUs, where a decode
    #: step is launch-bound; on a CPU the compile costs more than it saves.
    compile_decode: bool = False
    #: R_beh's sentence embedding model: a sentence-transformers folder or a hub id already in the
    #: Hugging Face cache (the paper: Qwen/Qwen3-Embedding-0.6B); None = the packaged all-MiniLM-L6-v2.
    embedder: str | None = None
    #: R_beh embeds completions with their <think>/<answer> tags removed (True) or as generated
    #: (False, the paper).
    beh_strip_tags: bool = False
    seed: int = 0
    save_every: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)
    #: Also save the LoRA merged into the weights as a plain model folder (`out/model`, for `tars eval`).
    save_merged: bool = True
    #: Also write TensorBoard events to `out/tensorboard` (metrics.jsonl is always written).
    tensorboard: bool = True
    #: None = $TARS_DEVICE, else cuda when available, else cpu.
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: How several processes share model and optimizer (rl/strategies.py): ddp | fsdp | zero2;
    #: auto = what the `accelerate launch` config chose (ddp under torchrun). One process: ignored.
    parallel: Parallel = "auto"

    @field_validator("layers")
    @classmethod
    def _layer_spec(cls, v):
        # The layer count is known only once the model loads; check the form now, the range then.
        select_layers(v, 1 << 20, "equal_thirds")
        return v

    @model_validator(mode="after")
    def _compile_needs_static(self):
        if self.compile_decode and self.decode_cache != "static":
            raise ValueError("compile_decode needs decode_cache=static (a dynamic cache changes shape every step)")
        return self


# ---- rewards and advantages of a step, as pure functions ---------------------------------------------
def compose_rewards(speech_base: Tensor, text_base: Tensor, rep: Tensor, beh: Tensor, w_rep: float = 1.0,
                    w_beh: float = 1.0, text_alignment: str = "speech_mean") -> tuple[Tensor, Tensor, Tensor]:
    """Steps 3-4: the final rewards of one or more questions' rollouts, rows = questions.

    `speech_base` [Q, G_s], `text_base` [Q, G_t]: R_base; `rep`, `beh` [Q, G_s]: R_rep, R_beh (zeros
    where the method has no such term or no text rollout was correct). Speech: `R_base + w_rep·R_rep +
    w_beh·R_beh`. Text: `R_base` + the per-question constant `text_alignment_reward` gives (0 for
    `none`), which cancels in its own group's advantage. Returns (speech [Q, G_s], text [Q, G_t],
    the text constant [Q]).
    """
    align = w_rep * rep + w_beh * beh
    terms = [text_alignment_reward(row.tolist(), text_alignment) for row in align]
    term = torch.tensor([0.0 if t is None else t for t in terms], dtype=text_base.dtype, device=text_base.device)
    return speech_base + align, text_base + term[:, None], term


def modality_advantages(speech_reward: Tensor, text_reward: Tensor, scale_std: bool = False,
                        joint: bool = False) -> tuple[Tensor, Tensor]:
    """Step 5 on [Q, G_s] / [Q, G_t] rewards: the groups are (question, modality), or the question
    alone with `joint`. Returns advantages of the same shapes."""
    Q, Gs = speech_reward.shape
    Gt = text_reward.shape[1]
    q = torch.arange(Q, device=speech_reward.device)
    adv = group_advantages(
        torch.cat([speech_reward.flatten(), text_reward.flatten()]),
        torch.cat([q.repeat_interleave(Gs), q.repeat_interleave(Gt)]),
        torch.cat([torch.full((Q * Gs,), SPEECH, device=q.device), torch.full((Q * Gt,), TEXT, device=q.device)]),
        scale_std=scale_std, joint=joint,
    )
    return adv[: Q * Gs].view(Q, Gs), adv[Q * Gs :].view(Q, Gt)


def _sampler_logprobs(gen, rows: Sequence[int], like: Tensor) -> Tensor | None:
    """The sampler's log-probs of completion `rows` of `gen`, [len(rows), T] like the scored ones
    (zero-padded); None when the generation did not record them."""
    if gen.logprobs is None:
        return None
    out = torch.zeros(like.shape, dtype=torch.float32)
    for i, r in enumerate(rows):
        lp = gen.logprobs[r][: like.shape[1]]
        out[i, : len(lp)] = torch.tensor(lp)
    return out.to(device=like.device, dtype=like.dtype)


def _token_mask(token_ids: Sequence[Sequence[int]], width: int) -> Tensor:
    lengths = torch.tensor([len(t) for t in token_ids])
    return torch.arange(width)[None, :] < lengths[:, None]


@dataclass
class StepRecord:
    """What one step computed, [Q, G] per modality: kept for inspection (tests, debugging)."""

    speech_texts: list[str]
    text_texts: list[str]
    speech_base: Tensor
    text_base: Tensor
    rep: Tensor
    beh: Tensor
    speech_reward: Tensor
    text_reward: Tensor
    text_term: Tensor
    speech_adv: Tensor
    text_adv: Tensor


class _Clock:
    """Wall time per phase of a step (CUDA work is waited for, so the split is honest)."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - t0


def _seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed per (run seed, step, random stream): streams never share a sequence."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{stream}".encode()).digest()[:8], "little") >> 1


def _load_policy_model(cfg: TarsConfig, group: Group | None = None):
    from tars.models.backend import default_device, parse_device
    from tars.models.loading import load_backend

    device = parse_device(cfg.device, "config: device") if cfg.device else default_device()
    if group is not None and group.on and device.type == "cuda":
        from accelerate import PartialState

        device = PartialState().device  # this process's own GPU
    return load_backend(cfg.model, device=device, dtype=getattr(torch, cfg.dtype))


# ---- the trainer ------------------------------------------------------------------------------------
class TarsTrainer:
    """The policy (a backend with LoRA), its optimizer and schedule, and `step`, one TARS update.

    `backend` / `embedder`: already loaded ones to use instead of loading `cfg.model` / `cfg.embedder`
    (the backend gets its LoRA injected in place). `total_steps` shapes the learning-rate schedule.
    """

    def __init__(self, cfg: TarsConfig, total_steps: int, backend=None, embedder: SentenceEmbedder | None = None,
                 group: Group | None = None):
        self.cfg = cfg
        self.group = group or Group()
        self.backend = backend = backend if backend is not None else _load_policy_model(cfg)
        # LoRA's A matrices start random: seeded, so that a run is a function of its config.
        torch.manual_seed(_seed(cfg.seed, -1, "lora"))
        self.lora = add_lora(backend, cfg.lora)
        self.params = list(self.lora.values())
        backend.checkpoint_blocks(cfg.activation_checkpointing)
        if cfg.release_memory:
            release_freed_memory()
        try:
            self.layers = (select_layers(cfg.layers, len(backend.decoder_layers()), cfg.layer_groups)
                           if cfg.method in USES_REP else [])
        except ValueError as e:
            raise UserError(f"config: layers: {e}") from None
        self.embedder = None
        if cfg.method in USES_BEH:
            self.embedder = embedder or SentenceEmbedder(cfg.embedder, device=backend.device)
        # How the policy-gradient forwards score (docs/fidelity.md): the sampling temperature, and what
        # the last layer's state is when R_rep asks for it.
        t = cfg.temperature if cfg.score_temperature == "sampling" and cfg.temperature > 0 else 1.0
        self.score_kw = {"temperature": t, "last_layer": cfg.last_layer}
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, math.ceil(cfg.warmup_frac * total_steps))

        def factor(s: int) -> float:
            if s < warmup:
                return (s + 1) / warmup
            left = max(0.0, 1 - (s - warmup) / max(1, total_steps - warmup))
            return {"constant": 1.0, "linear": left, "cosine": 0.5 * (1 - math.cos(math.pi * left))}[cfg.schedule]

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.parallel = make_strategy(cfg.parallel, self.group)
        self.parallel.prepare(backend, self.params, self.opt, cfg.grad_clip)
        self.last: StepRecord | None = None

    def _micro_batches(self, n_questions: int) -> list[tuple[list[int], bool]]:
        """(questions, counts) per micro-batch. Under a lockstep strategy every process runs as many
        micro-batches as the busiest one: the extra ones repeat this process's last with
        `counts` False (weight zero, nothing logged)."""
        size = self.cfg.micro_batch_questions or n_questions
        mbs = [list(range(i, min(i + size, n_questions))) for i in range(0, n_questions, size)]
        n = self.group.max(len(mbs)) if self.parallel.lockstep else len(mbs)
        return [(qs, True) for qs in mbs] + [(mbs[-1], False)] * (n - len(mbs))

    def _base_rewards(self, texts: list[str], batch: Sequence[Record], G: int) -> tuple[Tensor, Tensor, Tensor]:
        """R_acc, R_fmt and R_base = R_acc + λ·R_fmt, [Q, G] (rows prompt-major, as generated); R_fmt
        binary or graded (`format_levels`)."""
        options = [r.options for r in batch for _ in range(G)]
        answers = [r.answer for r in batch for _ in range(G)]
        acc = accuracy_reward(texts, options, answers)
        fmt = [format_score(t, self.cfg.format_levels) for t in texts]
        base = [a + self.cfg.format_weight * f for a, f in zip(acc, fmt)]
        return tuple(torch.tensor(x, dtype=torch.float32).view(len(batch), G) for x in (acc, fmt, base))

    def _rng(self, step: int, rec: Record) -> random.Random:
        """The reference draws of one question at one step: per question, so a batch split over
        processes draws what the whole batch would."""
        return random.Random(_seed(self.cfg.seed, step, f"reference:{rec.id}"))

    def _row_seeds(self, step: int, batch: Sequence[Record], modality: str, G: int) -> list[int]:
        return [_seed(self.cfg.seed, step, f"sample:{modality}:{r.id}:{g}") for r in batch for g in range(G)]

    def step(self, batch: Sequence[Record], base_dir: Path | None, step: int) -> dict[str, float]:
        """One TARS update on the questions `batch` (their audio under `base_dir`); returns its metrics.
        Under several processes `batch` is the whole step's questions and this process takes its share."""
        cfg, be, group = self.cfg, self.backend, self.group
        batch = group.shard(batch)
        self.last = None
        Q, Gs, Gt = len(batch), cfg.speech_rollouts, cfg.text_rollouts
        torch.manual_seed(_seed(cfg.seed, step, f"dropout:{group.rank}"))
        clock, t_step = _Clock(be.device), (time.perf_counter(), time.process_time())
        lr = self.sched.get_last_lr()[0]

        # 1. Paired rollouts: G_s completions from the speech prompt (the audio carries question and
        #    options), G_t from the text prompt, sampled by the current policy (no dropout, no grad);
        #    each prompt prefilled once, speech and text rows decoded in one batch.
        be.eval()
        with clock("generate"), torch.no_grad(), self.parallel.gathered():
            prompts = {"speech": be.build_inputs(batch, "speech", base_dir=base_dir),
                       "text": be.build_inputs(batch, "text")}
            speech, text = be.generate_paired(
                [(prompts["speech"], Gs, self._row_seeds(step, batch, "speech", Gs)),
                 (prompts["text"], Gt, self._row_seeds(step, batch, "text", Gt))],
                cfg.temperature, cfg.top_p, cfg.max_new_tokens, logprobs=True,
                decode=DecodeOptions(cfg.decode_cache, cfg.compile_decode))

        # 2. R_base = R_acc + λ·R_fmt for every rollout, speech and text alike.
        with clock("rewards"):
            acc_s, fmt_s, base_s = self._base_rewards(speech.texts, batch, Gs)
            acc_t, fmt_t, base_t = self._base_rewards(text.texts, batch, Gt)
            # R_beh's sentence embeddings: one call over every completion of the step, only if used.
            emb_s = emb_t = None
            if self.embedder is not None:
                emb = self.embedder.embed_completions(speech.texts + text.texts, cfg.beh_strip_tags).float().cpu()
                emb_s, emb_t = emb[: Q * Gs].view(Q, Gs, -1), emb[Q * Gs :].view(Q, Gt, -1)

        if cfg.method in IMITATION:
            extra = self._imitation_update(batch, prompts, speech, text, acc_s, acc_t, clock, step)
            return self._metrics(extra, speech, text, acc_s, fmt_s, base_s, acc_t, fmt_t, base_t, clock, t_step, lr)

        # Completions that hit the length limit are left out of the loss (step 6), and of its
        # normaliser unless `truncated_in_normalizer`. The normaliser counts the WHOLE batch (every
        # process's share), so the micro-batch losses add up to the batch loss.
        keep_s = ~torch.tensor(speech.truncated, device=be.device)
        keep_t = ~torch.tensor(text.truncated, device=be.device)
        width = max(len(t) for t in speech.token_ids + text.token_ids)
        counted = None if cfg.truncated_in_normalizer else torch.cat([keep_s, keep_t]).cpu()
        normalizer = group.sum(loss_normalizer(_token_mask(speech.token_ids + text.token_ids, width),
                                               counted, cfg.loss_type))
        text_prompt = prompts["text"] if cfg.text_scored_under == "text" else prompts["speech"]

        rep, beh = torch.zeros(Q, Gs), torch.zeros(Q, Gs)
        reward_s, reward_t, term_t = torch.zeros(Q, Gs), torch.zeros(Q, Gt), torch.zeros(Q)
        adv_s, adv_t = torch.zeros(Q, Gs), torch.zeros(Q, Gt)
        no_reference = (acc_t.sum(1) == 0).float()
        sums = defaultdict(float)  # Σ over kept tokens of the loss's statistics (`_policy_loss`)
        entropy = {"speech": [0.0, 0.0], "text": [0.0, 0.0]}  # Σ entropy, Σ tokens over kept tokens
        # Text first, its backward before speech's forward: text advantages never depend on the speech
        # rollouts (step 4's constant cancels in the text group), so only one modality's graph is alive
        # at a time. Joint groups mix the two modalities' rewards: both graphs then wait for one backward.
        text_first = not cfg.joint_groups
        plan = self._micro_batches(Q)
        for i, (qs, counts) in enumerate(plan):
            last = i == len(plan) - 1
            rows_s = [q * Gs + g for q in qs for g in range(Gs)]
            rows_t = [q * Gt + g for q in qs for g in range(Gt)]
            comp_s, comp_t = [speech.token_ids[r] for r in rows_s], [text.token_ids[r] for r in rows_t]
            local_s = [j for j in range(len(qs)) for _ in range(Gs)]
            local_t = [j for j in range(len(qs)) for _ in range(Gt)]
            prompt_s, prompt_t = prompts["speech"].select(qs), text_prompt.select(qs)

            # β > 0: the reference policy's log-probs (the model with its LoRA off), computed before
            # the policy's forwards so the toggle never touches a live graph.
            kw = self.score_kw
            ref_s = ref_t = None
            if cfg.beta > 0:
                with clock("score"), adapters_disabled(be):
                    ref_s = be.score(prompt_s, comp_s, local_s, **kw).logprobs
                    ref_t = be.score(prompt_t, comp_t, local_t, **kw).logprobs

            # rep_dropout=off: R_rep's states from one more no-grad forward per modality, without
            # dropout (the model is in eval mode here), instead of from the loss's forward below.
            pooled_s = pooled_t = None
            if self.layers and not cfg.rep_dropout:
                with clock("score"):
                    pooled_s = be.score(prompt_s, comp_s, local_s, self.layers, **kw).pooled[cfg.pooling]
                    pooled_t = be.score(prompt_t, comp_t, local_t, self.layers, **kw).pooled[cfg.pooling]
            layers = self.layers if pooled_s is None else []
            text_part = (text, rows_t, keep_t[rows_t], ref_t)

            # 3. (forward) ONE grad-enabled forward per modality gives the completion tokens'
            #    log-probs for the loss AND, from the same forward, the chosen layers' hidden states
            #    pooled over each completion for R_rep (no layers asked when the method has no R_rep,
            #    or when they came from the dropout-free forward above).
            be.train()
            with clock("score"):
                t = be.score(prompt_t, comp_t, local_t, layers, grad=True, entropy=True, **kw)
            be.eval()
            if text_first:
                # 5.-6. for text now: A = R_base − its group mean (the constant of step 4 would cancel).
                # A lockstep stand-in runs the same backward with weight zero.
                with clock("update"):
                    if counts:
                        a_t = modality_advantages(base_s[qs], base_t[qs], cfg.advantage_std)[1]
                        loss_t = self._policy_loss(t, a_t, *text_part, normalizer, sums)
                        sums["loss"] += float(loss_t.detach())
                    else:
                        loss_t = t.logprobs.sum() * 0.0
                    self.parallel.backward(loss_t, last=False)
            be.train()
            with clock("score"):
                s = be.score(prompt_s, comp_s, local_s, layers, grad=True, entropy=True, **kw)
            be.eval()
            if self.layers and pooled_s is None:
                pooled_s, pooled_t = s.pooled[cfg.pooling], t.pooled[cfg.pooling]
            if not counts:  # a lockstep stand-in: the same forwards and backwards, weight zero
                with clock("update"):
                    stand_in = s.logprobs.sum() if text_first else s.logprobs.sum() + t.logprobs.sum()
                    self.parallel.backward(stand_in * 0.0, last=last)
                continue
            for name, sc, keep in (("speech", s, keep_s[rows_s]), ("text", t, keep_t[rows_t])):
                m = sc.mask & keep[:, None]
                entropy[name][0] += float((sc.entropy * m).sum())
                entropy[name][1] += float(m.sum())

            # 3. Alignment rewards, speech rollouts only: each is compared with a CORRECT text rollout
            #    of its question (random or round-robin); none correct → R_rep = R_beh = 0.
            with clock("rewards"):
                if self.layers or self.embedder is not None:
                    for j, q in enumerate(qs):
                        pooled = {}
                        if self.layers:
                            pooled = dict(speech_pooled=pooled_s[j * Gs : (j + 1) * Gs],
                                          text_pooled=pooled_t[j * Gt : (j + 1) * Gt])
                        if self.embedder is not None:
                            pooled.update(speech_emb=emb_s[q], text_emb=emb_t[q])
                        got = alignment_rewards((acc_t[q] == 1).tolist(), mode=cfg.reference,
                                                rng=self._rng(step, batch[q]), **pooled)
                        rep[q], beh[q] = got.rep.cpu(), got.beh.cpu()
                # Speech: R_base + w_rep·R_rep + w_beh·R_beh.
                # 4. Text: R_base + a per-question constant (the speech mean alignment, 0, or nothing),
                #    which cancels in its group: text is a moving reference, never pulled towards speech.
                r_s, r_t, term = compose_rewards(base_s[qs], base_t[qs], rep[qs], beh[qs], cfg.w_rep, cfg.w_beh,
                                                 cfg.text_alignment)
                # 5. A = r − mean(r of the same question and modality), no std division by default.
                a_s, a_t_final = modality_advantages(r_s, r_t, cfg.advantage_std, cfg.joint_groups)
                a_t = a_t if text_first else a_t_final
                reward_s[qs], reward_t[qs], term_t[qs], adv_s[qs], adv_t[qs] = r_s, r_t, term, a_s, a_t

            # 6. DAPO token-level clipped surrogate, ε_low/ε_high, truncated completions masked out;
            #    old log-probs = the current ones detached (one update per batch: ratio 1).
            #    Optional truncated importance sampling (tis_cap) against the sampler's own log-probs.
            with clock("update"):
                loss = self._policy_loss(s, a_s, speech, rows_s, keep_s[rows_s], ref_s, normalizer, sums)
                if not text_first:
                    loss = loss + self._policy_loss(t, a_t, *text_part, normalizer, sums)
                self.parallel.backward(loss, last=last)
                sums["loss"] += float(loss.detach())

        # The update: gradients summed over processes (their losses share one normaliser), clipped.
        with clock("update"):
            grad_norm = self.parallel.step()
            self.sched.step()
            self.parallel.zero_grad()

        # This process's rows, for inspection; then the metrics over the whole step: every process's
        # questions, sums over every process's tokens.
        self.last = StepRecord(speech.texts, text.texts, base_s, base_t, rep, beh, reward_s, reward_t, term_t,
                               adv_s, adv_t)
        rep, beh, reward_s, reward_t, term_t, no_reference = map(
            group.cat, (rep, beh, reward_s, reward_t, term_t, no_reference))
        loss_total, clipped, kl, kept_tokens, mismatch, tis_w, tis_cut = map(group.sum, (
            sums["loss"], sums["clipped"], sums["kl"], sums["tokens"], sums["mismatch"], sums["tis_w"], sums["tis_cut"]))
        entropy = {k: [group.sum(v[0]), group.sum(v[1])] for k, v in entropy.items()}
        extra = {
            "loss": loss_total, "grad_norm": grad_norm,
            "speech/reward": reward_s.mean().item(), "speech/rep": rep.mean().item(), "speech/beh": beh.mean().item(),
            # What of R_rep / R_beh can move an advantage: their spread within a question's speech rollouts,
            # over the questions that had a correct text reference (elsewhere both are 0 by rule).
            "speech/rep_spread": within_group_spread(rep, no_reference == 0),
            "speech/beh_spread": within_group_spread(beh, no_reference == 0),
            "text/reward": reward_t.mean().item(), "text/align": term_t.mean().item(),
            "no_reference": no_reference.mean().item(),
            "clip_fraction": clipped / max(kept_tokens, 1.0),
            "speech/entropy": entropy["speech"][0] / max(entropy["speech"][1], 1.0),
            "text/entropy": entropy["text"][0] / max(entropy["text"][1], 1.0),
        }
        if cfg.beta > 0:
            extra["kl"] = kl / max(kept_tokens, 1.0)
        if speech.logprobs is not None:
            # KL(sampler ‖ trainer) per token (k3): how far generation's numbers are from the scoring
            # forward's for the same weights; what `tis_cap` corrects for.
            extra["sampler/kl"] = mismatch / max(kept_tokens, 1.0)
            if cfg.tis_cap is not None:
                extra["tis/weight"] = tis_w / max(kept_tokens, 1.0)
                extra["tis/capped"] = tis_cut / max(kept_tokens, 1.0)
        return self._metrics(extra, speech, text, acc_s, fmt_s, base_s, acc_t, fmt_t, base_t, clock, t_step, lr)

    def _policy_loss(self, sc, adv: Tensor, gen, rows: list[int], keep: Tensor, ref: Tensor | None,
                     normalizer: float, sums: dict) -> Tensor:
        """Step 6 for one modality's rows of a micro-batch: the clipped surrogate (+ β·KL, TIS) over
        its kept tokens, its share of the batch loss; adds its statistics (Σ over kept tokens) to `sums`."""
        cfg = self.cfg
        sampler = _sampler_logprobs(gen, rows, sc.logprobs)
        loss, stats = clipped_surrogate(
            sc.logprobs, sc.logprobs.detach(), adv.flatten().to(sc.logprobs.device), sc.mask,
            cfg.eps_low, cfg.eps_high, loss_type=cfg.loss_type, keep=keep,
            max_completion_length=cfg.max_new_tokens, ref_logprobs=ref, beta=cfg.beta,
            normalizer=normalizer, sampler_logprobs=sampler, tis_cap=cfg.tis_cap)
        m = sc.mask & keep[:, None]
        n_tok = float(m.sum())
        sums["tokens"] += n_tok
        sums["clipped"] += float(stats["clip_fraction"]) * n_tok
        sums["kl"] += float(stats.get("kl", 0.0)) * n_tok
        if sampler is not None:
            sums["mismatch"] += float(kl_penalty(sampler, sc.logprobs.detach(), m).sum())
            sums["tis_w"] += float(stats.get("tis_weight", 0.0)) * n_tok
            sums["tis_cut"] += float(stats.get("tis_capped_fraction", 0.0)) * n_tok
        return loss

    def _metrics(self, extra: dict, speech, text, acc_s, fmt_s, base_s, acc_t, fmt_t, base_t, clock, t_step, lr) -> dict:
        """The step's metrics row over every process's questions: what every method logs, plus `extra`
        (its own loss terms, already summed over processes). Times are this process's."""
        g = self.group
        acc_s, fmt_s, base_s, acc_t, fmt_t, base_t = map(g.cat, (acc_s, fmt_s, base_s, acc_t, fmt_t, base_t))
        len_s = g.gather_lists([len(x) for x in speech.token_ids])
        len_t = g.gather_lists([len(x) for x in text.token_ids])
        trunc = g.gather_lists(list(speech.truncated) + list(text.truncated))
        row = {
            "lr": lr,
            "speech/base": base_s.mean().item(), "speech/acc": acc_s.mean().item(), "speech/format": fmt_s.mean().item(),
            "text/base": base_t.mean().item(), "text/acc": acc_t.mean().item(), "text/format": fmt_t.mean().item(),
            "gap": acc_t.mean().item() - acc_s.mean().item(),
            "speech/length": sum(len_s) / len(len_s), "text/length": sum(len_t) / len(len_t),
            "truncated": sum(trunc) / len(trunc),
            **extra,
        }
        for phase in ("generate", "score", "rewards", "update"):
            row[f"time/{phase}"] = round(clock.seconds[phase], 4)
        # Wall time, and this process's CPU time over all its threads: the cost of a step whatever
        # else shares the machine or pauses the process (the mini table sums both per row).
        row["time/step"] = round(time.perf_counter() - t_step[0], 4)
        row["time/cpu"] = round(time.process_time() - t_step[1], 4)
        return row

    def _imitation_update(self, batch, prompts, speech, text, acc_s, acc_t, clock, step: int) -> dict:
        """The `sft` / `dpo` update (rl/imitation.py): targets are fixed sequences scored under the
        SPEECH prompt; questions without a target (no correct text rollout; for DPO also no wrong
        speech rollout) train nothing this step."""
        cfg, be, group = self.cfg, self.backend, self.group
        Q, Gs, Gt = len(batch), cfg.speech_rollouts, cfg.text_rollouts
        rngs = [self._rng(step, r) for r in batch]
        good_t = [[a == 1 and not tr for a, tr in zip(acc_t[q].tolist(), text.truncated[q * Gt:(q + 1) * Gt])]
                  for q in range(Q)]
        if cfg.method == "sft":
            picks = [sft_targets([good_t[q]], rngs[q])[0] for q in range(Q)]
            targets = {q: [text.token_ids[q * Gt + i]] for q, i in enumerate(picks) if i is not None}
            normalizer = group.sum(float(sum(len(c[0]) for c in targets.values())))
        else:
            picks = [dpo_pairs([good_t[q]], [[a == 1 for a in acc_s[q].tolist()]], rngs[q])[0] for q in range(Q)]
            targets = {q: [text.token_ids[q * Gt + c], speech.token_ids[q * Gs + r]]
                       for q, pair in enumerate(picks) if pair is not None for c, r in [pair]}
            normalizer = group.sum(float(len(targets)))
        loss_total, entropy, n_tok, margins, right = 0.0, 0.0, 0.0, [], []
        qs_all = sorted(targets)
        size = cfg.micro_batch_questions or max(1, len(qs_all))
        plan = [(qs_all[i : i + size], True) for i in range(0, len(qs_all), size)]
        # Lockstep (see `_micro_batches`): the stand-ins repeat the last micro-batch, or, on a process
        # with no target at all, score its first speech rollout in the target's place.
        n = group.max(len(plan)) if self.parallel.lockstep else len(plan)
        plan += [(plan[-1][0] if plan else [0], False)] * (n - len(plan))

        def seqs(q: int) -> list[list[int]]:
            return targets.get(q) or [speech.token_ids[q * Gs]] * (1 if cfg.method == "sft" else 2)

        for i, (qs, counts) in enumerate(plan):
            comps = [c for q in qs for c in seqs(q)]
            local = [j for j, q in enumerate(qs) for _ in seqs(q)]
            prompt = prompts["speech"].select(qs)
            ref = None
            if cfg.method == "dpo":
                with clock("score"), adapters_disabled(be):
                    ref_scores = be.score(prompt, comps, local)
                    ref = sequence_logprob(ref_scores.logprobs, ref_scores.mask)
            be.train()
            with clock("score"):
                sc = be.score(prompt, comps, local, grad=True, entropy=True)
            be.eval()
            if not counts:
                with clock("update"):
                    self.parallel.backward(sc.logprobs.sum() * 0.0, last=i == len(plan) - 1)
                continue
            entropy += float((sc.entropy * sc.mask).sum())
            n_tok += float(sc.mask.sum())
            with clock("update"):
                if cfg.method == "sft":
                    loss = sft_loss(sc.logprobs, sc.mask, normalizer)
                else:
                    seq = sequence_logprob(sc.logprobs, sc.mask)
                    loss, stats = dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], cfg.dpo_beta, normalizer)
                    margins.append(float(stats["margin"]) * len(qs))
                    right.append(float(stats["pair_accuracy"]) * len(qs))
                self.parallel.backward(loss, last=i == len(plan) - 1)
                loss_total += float(loss.detach())
        n_targets = group.sum(float(len(targets)))
        with clock("update"):
            grad_norm = self.parallel.step() if n_targets else 0.0
            self.sched.step()
            self.parallel.zero_grad()
        # `imitation/*`: over the target sequences (text chains of thought; for DPO also the rejected
        # speech rollouts) scored under the speech prompt — not comparable with the GRPO methods'
        # rollout entropy, hence their own keys.
        extra = {"loss": group.sum(loss_total), "grad_norm": grad_norm,
                 "imitation/no_target": 1 - n_targets / group.sum(float(Q)),
                 "imitation/target_entropy": group.sum(entropy) / max(group.sum(n_tok), 1.0)}
        if cfg.method == "dpo":
            extra["dpo/margin"] = group.sum(sum(margins)) / max(n_targets, 1)
            extra["dpo/pair_accuracy"] = group.sum(sum(right)) / max(n_targets, 1)
        return extra

    # ---- checkpoint state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Every process calls it (zero2 gathers its optimizer partitions); the main one saves it."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"lora": {k: v.detach().cpu().clone() for k, v in self.lora.items()},
                "opt": self.parallel.optimizer_state(), "sched": self.sched.state_dict(), "rng": rng,
                "optimizer_layout": self._optimizer_layout()}

    def _optimizer_layout(self) -> str:
        # ddp and fsdp keep the same whole optimizer; ZeRO's is partitioned per process.
        return f"zero2 x{self.group.world}" if self.parallel.name == "zero2" else "whole"

    def load_state_dict(self, state: dict) -> None:
        if set(state["lora"]) != set(self.lora):
            raise UserError("checkpoint LoRA layers differ from this config's (lora.* changed since it was saved?)")
        with torch.no_grad():
            for k, p in self.lora.items():
                p.copy_(state["lora"][k])
        saved = state.get("optimizer_layout", "whole")
        if saved != self._optimizer_layout():
            raise UserError(f"checkpoint optimizer is laid out as {saved!r}, this run as {self._optimizer_layout()!r}: "
                            "resume with the parallel setting and process count it was saved with")
        self.parallel.load_optimizer_state(state["opt"])
        self.sched.load_state_dict(state["sched"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


# ---- the loop -----------------------------------------------------------------------------------------
def batch_indices(n_records: int, step: int, per_step: int, seed: int) -> tuple[int, list[int]]:
    """(epoch, the record indices of `step`): a fresh shuffle per (seed, epoch), so resuming at any
    step sees the same questions; the last batch of an epoch may be smaller."""
    per_epoch = math.ceil(n_records / per_step)
    epoch, k = divmod(step, per_epoch)
    order = list(range(n_records))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return epoch, order[k * per_step : (k + 1) * per_step]


def run(cfg: TarsConfig, progress: bool = True) -> Path:
    """Train with TARS (or an ablation) and return the merged model folder (`out/model`; the adapter
    folder `out/adapter` when `save_merged` is off). Resumes from the newest checkpoint in `out`."""
    from tqdm import tqdm

    from tars.rl.distributed import start

    group = start()
    out = resolve(cfg.out)
    result = out / ("model" if cfg.save_merged else "adapter")
    if (out / "DONE").exists():
        print(f"{out} is finished (remove {out / 'DONE'} to train again)")
        return result
    if cfg.method in USES_BEH:
        resolve_embedder(cfg.embedder)  # an embedder missing offline fails before the model loads
    check_data(cfg.data, "speech")  # a bad manifest fails in seconds, every problem listed
    backend = _load_policy_model(cfg, group)  # then a wrong model path fails before any synthesis
    if group.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
        records, base_dir = load_data(cfg.data, "speech")  # synthesises what is missing, once
    group.barrier()
    if not group.main:
        records, base_dir = load_data(cfg.data, "speech")
    # The backends refuse clips over the encoder window (never truncate them): leave those out here
    # rather than fail at whichever step first draws one.
    too_long = [r for r in records if (r.duration_s or 0.0) > backend.max_audio_s]
    if too_long and group.main:
        print(f"{len(too_long)} question(s) left out: audio over the {backend.max_audio_s:g} s encoder window")
    records = [r for r in records if (r.duration_s or 0.0) <= backend.max_audio_s]
    if not records:
        raise UserError("config: data: no questions to train on")
    total = cfg.steps or math.ceil(len(records) / cfg.questions_per_step) * cfg.epochs
    smallest = min(cfg.questions_per_step, len(records) % cfg.questions_per_step or cfg.questions_per_step)
    if smallest < group.world:
        raise UserError(f"config: questions_per_step: a step of {smallest} question(s) cannot be shared by "
                        f"{group.world} processes (use at least {group.world}, and a data size whose last batch is too)")
    trainer = TarsTrainer(cfg, total, backend=backend, group=group)
    if group.on and group.main:
        here, whole = weight_bytes(backend)
        print(f"{group.world} processes, parallel: {trainer.parallel.name}; weights held by this process: "
              f"{here / 2**20:,.1f} of {whole / 2**20:,.1f} MiB")
    start = _resume(out, trainer)
    group.barrier()  # every process has read the checkpoint before the main one may replace it
    log = MetricsLog(out, start, tensorboard=cfg.tensorboard) if group.main else None
    bar = tqdm(total=total, initial=start, desc=cfg.method, unit="step", disable=not (progress and group.main))
    for step in range(start, total):
        epoch, idx = batch_indices(len(records), step, cfg.questions_per_step, cfg.seed)
        row = {"step": step + 1, "epoch": epoch, **trainer.step([records[i] for i in idx], base_dir, step)}
        if log is not None:
            log.write(row)
        bar.set_postfix(acc_s=f"{row['speech/acc']:.2f}", acc_t=f"{row['text/acc']:.2f}",
                        loss=f"{row['loss']:.3f}")
        bar.update(1)
        if (step + 1) % cfg.save_every == 0 and step + 1 < total:
            _save_checkpoint(out, step + 1, trainer, cfg.keep_last)
    bar.close()
    if log is not None:
        log.close()
    backend.eval()
    if group.main:
        save_adapter(backend, out / "adapter", cfg.model, cfg.lora, total, cfg.method)
        if cfg.save_merged:
            if trainer.parallel.name == "fsdp":
                # This process holds only its shard of the blocks: merge into a whole copy instead.
                device, dtype = backend.device, backend.dtype
                del trainer, backend
                backend = load_adapter(out / "adapter", device=device, dtype=dtype)
            merge_lora(backend)
            backend.save_pretrained(out / "model")
        # DONE before the checkpoints go: a kill in between must not restart the run from step 0.
        atomic_write_text(out / "DONE", f"{total} steps\n")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    group.barrier()
    return result


def _save_checkpoint(out: Path, step: int, trainer: TarsTrainer, keep_last: int) -> None:
    state = trainer.state_dict()  # on every process: zero2 gathers its partitions
    if not trainer.group.main:
        return
    buf = io.BytesIO()
    torch.save({"step": step, **state}, buf)
    folder = out / "checkpoints"
    atomic_write_bytes(folder / f"step-{step:07d}.pt", buf.getvalue())
    for old in sorted(folder.glob("step-*.pt"))[:-keep_last]:
        old.unlink(missing_ok=True)


def _resume(out: Path, trainer: TarsTrainer) -> int:
    """Every process loads the newest checkpoint; only the main one edits the metrics file."""
    main = trainer.group.main
    log = out / "metrics.jsonl"
    for ck in sorted((out / "checkpoints").glob("step-*.pt"), reverse=True):
        try:
            state = torch.load(ck, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, OSError, ValueError):
            print(f"skipping unreadable checkpoint {ck}")
            continue
        trainer.load_state_dict(state)
        # Rows logged after the checkpoint belong to steps that will run again.
        if main and log.exists():
            rows = [l for l in log.read_text().splitlines() if step_of(l) <= state["step"]]
            atomic_write_text(log, "".join(r + "\n" for r in rows))
        if main:
            print(f"resuming {out} from step {state['step']}")
        return int(state["step"])
    if main:
        log.unlink(missing_ok=True)
    return 0
