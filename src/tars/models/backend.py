"""The one interface every stage of tars uses to talk to a Speech LLM.

A Speech LLM here is (speech encoder → projector) feeding a decoder-only LLM. Every backend reduces a
prompt to *input embeddings*: the chat template's text tokens embedded by the LLM, with the projected
audio frames spliced in where the template holds the audio. From there on, generation and scoring are
the same for every model, and live here once:

- `build_inputs(records, modality)`: left-padded prompt embeddings for a batch, `speech` (the audio
  alone carries the question and options) or `text` (question + lettered options), both under the same
  system prompt;
- `generate(inputs, num_samples, temperature, top_p, max_new_tokens)`: our own batched decode loop over
  the decoder with a KV cache. Owning the loop (rather than `model.generate`) keeps it identical across
  backends, makes the stop rule and the "hit the length limit" flag exact, and is the place the GPU
  fast path hooks in later;
- `score(inputs, completions, layers, grad)`: ONE forward over prompt + completion giving the
  completion tokens' log-probs and, per requested decoder layer, the completion-only hidden states
  pooled on the fly by forward hooks (mean over the completion tokens and the last one; prompt and the
  final end token excluded). Nothing of shape [layers × tokens × hidden] is kept: each hook reduces its
  layer's output to [batch × hidden] as the forward passes, and log-probs come from the LM head applied
  to the completion positions only. When a prompt has several completions (a GRPO group), that forward
  is split in two: the prompts once, then the completions against their prompt's KV cache.

The encoder is frozen in every tars recipe, so its output is cached per audio file (see `AudioCache`):
only the projector and the LLM run per forward.

Layer numbering: layer l (1-based) is the output of the l-th decoder block; the last one before the
final norm by default (`score(last_layer="post_norm")`: after it, as transformers' `hidden_states[-1]`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from tars.data.prompts import SYSTEM_PROMPT, text_prompt
from tars.data.schema import Record
from tars.models.hf_compat import cache_kwargs, kv_cache
from tars.errors import UserError

Modality = Literal["speech", "text", "transcript"]
#: `transcript` is the cascade baseline's prompt: a text prompt whose user turn is an ASR transcript of
#: the spoken question (`record.extra["transcript"]`), options as they were read ("A, …. B, …."), not
#: the text condition's lettered block.
MODALITIES: tuple[Modality, ...] = ("speech", "text", "transcript")
#: What `score` returns as the last decoder layer's state: the block's output, or after the final norm.
LastLayer = Literal["pre_norm", "post_norm"]
LAST_LAYERS: tuple[str, ...] = ("pre_norm", "post_norm")
#: Marks where the audio goes in a rendered chat template; never produced by a tokenizer.
AUDIO_SLOT = "\x00AUDIO\x00"


@dataclass
class PromptBatch:
    """Left-padded prompt embeddings of a batch of records under one modality.

    `position_ids` are the 1-D positions (`cumsum(mask) - 1`); backends whose LLM wants another shape
    (M-RoPE) expand them in `Backend.positions`.
    """

    embeds: Tensor  # [B, P, H]
    attention_mask: Tensor  # [B, P] long, 0 = left padding
    lengths: list[int]
    modality: Modality
    record_ids: list[str]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def select(self, indices: Sequence[int]) -> "PromptBatch":
        """The rows `indices`, in that order (a micro-batch of questions), with the left padding that no
        kept row needs trimmed off: positions come from the mask, so the result scores the same, only
        shorter."""
        idx = list(indices)
        if not idx:
            raise ValueError("select at least one row")
        rows = torch.as_tensor(idx, dtype=torch.long, device=self.embeds.device)
        lengths = [self.lengths[i] for i in idx]
        start = self.embeds.shape[1] - max(lengths)
        return PromptBatch(
            self.embeds.index_select(0, rows)[:, start:],
            self.attention_mask.index_select(0, rows)[:, start:],
            lengths,
            self.modality,
            [self.record_ids[i] for i in idx],
        )


@dataclass
class Generation:
    """Completions, row r sampled from prompt `prompt_index[r]` (prompt-major: the samples of prompt 0
    first). `token_ids` end with the stop token when the model stopped; `truncated` marks rows that
    hit `max_new_tokens` without stopping (the loss masks those)."""

    token_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    prompt_index: list[int]
    #: Per row, the log-probability of each token under the distribution it was drawn from
    #: (temperature and top-p applied; 0 for greedy), when `generate(logprobs=True)`.
    logprobs: list[list[float]] | None = None


@dataclass(frozen=True)
class DecodeOptions:
    """How the decode loop runs. `cache="static"` preallocates the KV cache for prompt + max_new_tokens
    and keeps every row in the batch, so all steps share one shape; `compile=True` (static only) runs
    each step through `torch.compile` — worth it on a GPU, where a 7B decode step is launch-bound;
    on a CPU compilation costs more than it saves, so both are off by default. Either way every row
    gets the tokens and log-probs (within float tolerance) that the dynamic path gives it when sampling
    is greedy or row-seeded (`row_seeds`, what the trainer uses); with one shared `generator` the static
    path also draws for rows that already stopped, so later draws of the other rows differ."""

    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False

    def __post_init__(self):
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"decode cache must be dynamic or static, got {self.cache!r}")
        if self.compile and self.cache != "static":
            raise ValueError("decode compile needs cache=static (a dynamic cache changes shape every step)")


@dataclass
class Scores:
    """Per completion row: token log-probs (`logprobs[r, :n_r]`, zero beyond), and pooled hidden
    states `pooled[kind]` of shape [rows, len(layers), hidden] for kind in ("mean", "last")."""

    logprobs: Tensor  # [N, T]
    mask: Tensor  # [N, T] bool, the completion tokens
    layers: list[int]
    pooled: dict[str, Tensor] = field(default_factory=dict)
    #: [N, T] entropy (nats) of the next-token distribution at each completion token, no grad; only
    #: when `score(..., entropy=True)`.
    entropy: Tensor | None = None


class Backend(nn.Module):
    """Base class: subclasses provide the modules and the prompt/audio specifics (see the hooks below)."""

    #: Tokens that end a turn; `generate` stops a row at the first of them.
    stop_token_ids: list[int]
    tokenizer: object
    #: Longest audio clip the encoder takes in one window, seconds.
    max_audio_s: float = 30.0

    # ---- hooks a backend implements -------------------------------------------------------------
    def decoder(self) -> nn.Module:
        """The LLM's decoder stack (embeddings → blocks → final norm), called with `inputs_embeds`."""
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def lm_head(self) -> nn.Module:
        raise NotImplementedError

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.decoder().get_input_embeddings()(ids)

    #: Per-clip cache of the frozen encoder's outputs (`audio_cache.AudioCache`).
    cache: object

    def encode_audio(self, paths: Sequence[Path]) -> list[Tensor]:
        """Frozen encoder output per clip, [frames_i, d_audio] (the projector's input), computed by the
        backend's `_encode` only for clips the cache does not hold."""
        return self.cache.get_many(list(paths), self._encode)

    def _encode(self, paths: list[Path]) -> list[Tensor]:
        raise NotImplementedError

    def load_clip(self, path: Path):
        """16 kHz mono samples of a clip, refused (never truncated: a truncated question is a different
        question) when longer than the encoder window."""
        from tars.data.audio import SAMPLE_RATE, load_audio

        wav = load_audio(path)
        dur = len(wav) / SAMPLE_RATE
        if dur > self.max_audio_s:
            raise UserError(
                f"{path}: audio is {dur:.1f} s, longer than the encoder window of {self.max_audio_s:g} s "
                "(tars refuses rather than truncates: shorten or split the clip)"
            )
        return wav

    @property
    def projector(self) -> nn.Module:
        """The trainable map from encoder frames to LLM embeddings."""
        raise NotImplementedError

    def audio_embeds(self, paths: Sequence[Path]) -> list[Tensor]:
        """Projected audio frames per clip, [n_i, hidden]: what replaces the audio slot."""
        proj = self.projector
        dtype = next(proj.parameters()).dtype
        return [proj(h.to(device=self.device, dtype=dtype)) for h in self.encode_audio(paths)]

    def audio_wrap(self) -> tuple[str, str]:
        """Template text immediately before and after the audio embeddings (e.g. audio_bos / eos)."""
        return "", ""

    def positions(self, position_ids: Tensor) -> Tensor:
        """Position ids as the decoder wants them, from 1-D [B, T] positions."""
        return position_ids

    @property
    def max_positions(self) -> int:
        return int(getattr(self.decoder().config, "max_position_embeddings", 1 << 30))

    # ---- prompts --------------------------------------------------------------------------------
    def render(self, record: Record, modality: Modality, system: str | None = None) -> str:
        """The chat-templated prompt up to the assistant's turn, audio as `AUDIO_SLOT`."""
        if modality == "speech":
            user = AUDIO_SLOT
        elif modality == "transcript":
            if "transcript" not in record.extra:
                raise ValueError(f"record {record.id}: no transcript for the transcript condition")
            user = record.extra["transcript"]
        else:
            user = text_prompt(record)
        messages = [{"role": "system", "content": system or SYSTEM_PROMPT}, {"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def build_inputs(self, records: Sequence[Record], modality: Modality, base_dir: Path | None = None,
                     system: str | None = None) -> PromptBatch:
        """Embed a batch of prompts, left-padded. `base_dir`: where relative `audio` paths start (the
        manifest's folder); `system` replaces the think/answer system prompt (training aids only)."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        device = self.device
        rows: list[Tensor] = []
        if modality == "speech":
            missing = [r.id for r in records if not r.audio]
            if missing:
                raise UserError(f"record {missing[0]}: no `audio` for the speech condition (run `tars speak` first)")
            paths = [Path(r.audio) if base_dir is None else Path(base_dir) / r.audio for r in records]
            audio = self.audio_embeds(paths)
        before, after = self.audio_wrap()
        for i, rec in enumerate(records):
            text = self.render(rec, modality, system)
            if modality == "speech":
                head, tail = text.split(AUDIO_SLOT)
                parts = [
                    self.embed_tokens(torch.tensor(self._ids(head + before), device=device)),
                    audio[i].to(device=device, dtype=self.dtype),
                    self.embed_tokens(torch.tensor(self._ids(after + tail), device=device)),
                ]
                rows.append(torch.cat(parts, 0))
            else:
                rows.append(self.embed_tokens(torch.tensor(self._ids(text), device=device)))
        lengths = [r.shape[0] for r in rows]
        P = max(lengths)
        too_long = [(rec.id, n) for rec, n in zip(records, lengths) if n >= self.max_positions]
        if too_long:
            rid, n = too_long[0]
            raise UserError(f"record {rid}: the {modality} prompt is {n} tokens, over the model's context of {self.max_positions}")
        H = rows[0].shape[-1]
        embeds = rows[0].new_zeros(len(rows), P, H)
        mask = torch.zeros(len(rows), P, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            embeds[i, P - r.shape[0] :] = r
            mask[i, P - r.shape[0] :] = 1
        return PromptBatch(embeds, mask, lengths, modality, [r.id for r in records])

    # ---- generation -----------------------------------------------------------------------------
    def _check_room(self, inputs: PromptBatch, max_new_tokens: int) -> None:
        """The longest prompt plus `max_new_tokens` must fit the model's context."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if max(inputs.lengths) + max_new_tokens > self.max_positions:
            raise UserError(
                f"prompt ({max(inputs.lengths)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {self.max_positions}"
            )

    @torch.no_grad()
    def generate(
        self,
        inputs: PromptBatch,
        num_samples: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        generator: torch.Generator | None = None,
        min_new_tokens: int = 0,
        row_seeds: Sequence[int] | None = None,
        logprobs: bool = False,
        decode: DecodeOptions | None = None,
    ) -> Generation:
        """Sample `num_samples` completions per prompt (temperature 0 = greedy), batched, KV cache.

        `min_new_tokens` forbids the stop tokens before that many tokens (forced lengths for benchmarks).
        `row_seeds` (one per completion row, prompt-major): each row draws its tokens from its own
        stream of uniforms by inverse-CDF sampling, so a completion depends only on its seed and its
        own logits, not on which other prompts share the batch — the property that lets a batch split
        over processes (or micro-batches) sample what the whole batch would (exactly so where the
        logits are equal; batch shape and padding can move them by round-off, which flips a token only
        when a uniform falls that close to a CDF boundary). Otherwise `generator`
        drives one multinomial draw per step for the whole batch.

        `logprobs`: also return each token's log-probability under the sampling distribution, which
        the trainer compares with the same token's log-prob from its scoring forward (rl/losses.py).
        `decode`: the static-cache / `torch.compile` decode path (`DecodeOptions`); default dynamic.
        """
        return self._decode([(inputs, num_samples, row_seeds)], temperature, top_p, max_new_tokens, generator,
                            min_new_tokens, logprobs, decode)[0]

    def can_mix(self, modalities: Sequence[str]) -> bool:
        """Whether prompts of these modalities may share one decode batch (they run the same weights)."""
        return True

    @torch.no_grad()
    def generate_paired(
        self,
        parts: Sequence[tuple[PromptBatch, int, Sequence[int] | None]],
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        min_new_tokens: int = 0,
        logprobs: bool = False,
        decode: DecodeOptions | None = None,
    ) -> list[Generation]:
        """`generate` for several prompt batches at once — a step's speech and text prompts — each part
        `(inputs, num_samples, row_seeds)`: every part is prefilled once per prompt, and all their rows
        decode in ONE batch. Row-seeded sampling makes each row's tokens those `generate` gives it on
        its own (up to padding round-off). Backends whose modalities run different weights (Phi-4's
        speech LoRA) decode part by part."""
        if not self.can_mix([inp.modality for inp, _, _ in parts]):
            return [self.generate(inp, n, temperature, top_p, max_new_tokens, None, min_new_tokens, seeds, logprobs,
                                  decode) for inp, n, seeds in parts]
        return self._decode(parts, temperature, top_p, max_new_tokens, None, min_new_tokens, logprobs, decode)

    def _decode(self, parts, temperature: float, top_p: float, max_new_tokens: int,
                generator: torch.Generator | None, min_new_tokens: int, logprobs: bool,
                decode: DecodeOptions | None = None) -> list[Generation]:
        """The decode loop behind `generate` / `generate_paired`.

        Prefill: each prompt once; its KV cache, mask and last state are then repeated for its
        samples (`batch_repeat_interleave`), and the parts' caches are joined left-padded under the
        mask (`_join_caches`). Decode (dynamic, the default): one forward per token for every live row;
        rows that stopped leave the batch and the cache; one host sync per token (how many rows
        stopped). Decode (static, `decode.cache == "static"`): the joined cache is copied once into
        preallocated [rows, heads, prompt + max_new_tokens, dim] buffers and every row stays in the
        batch to the end (a stopped row's later tokens are dropped), so each step has the same shapes
        and `decode.compile` can compile it once."""
        decode = decode or DecodeOptions()
        dec, head = self.decoder(), self.lm_head()
        cache = mask = next_pos = last = None
        index_of, uniforms = [], []
        for inputs, num_samples, row_seeds in parts:
            self._check_room(inputs, max_new_tokens)
            n_rows = len(inputs) * num_samples
            if row_seeds is not None and len(row_seeds) != n_rows:
                raise ValueError(f"row_seeds: need {n_rows} (one per completion row), got {len(row_seeds)}")
            pos = (inputs.attention_mask.cumsum(-1) - 1).clamp(min=0)
            out = dec(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                      position_ids=self.positions(pos), use_cache=True)
            part_cache = kv_cache(out)
            if num_samples > 1:
                part_cache.batch_repeat_interleave(num_samples)
            part_mask = inputs.attention_mask.repeat_interleave(num_samples, 0)
            part_last = out.last_hidden_state[:, -1].repeat_interleave(num_samples, 0)
            part_pos = (pos[:, -1:] + 1).repeat_interleave(num_samples, 0)
            if cache is None:
                cache, mask, next_pos, last = part_cache, part_mask, part_pos, part_last
            else:
                mask = _join_caches(cache, part_cache, mask, part_mask)
                next_pos, last = torch.cat([next_pos, part_pos]), torch.cat([last, part_last])
            index_of.append(torch.arange(len(inputs)).repeat_interleave(num_samples).tolist())
            if row_seeds is not None:
                uniforms += [torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s)),
                                        dtype=torch.float64) for s in row_seeds]
            elif any(seeds is not None for _, _, seeds in parts):
                raise ValueError("row_seeds: give them for every part or for none")
        del out, part_cache  # a later part's own prefill cache, joined into `cache`: not kept beside it
        device = last.device
        N = last.shape[0]
        rand = torch.stack(uniforms).to(device) if uniforms else None
        stops = torch.tensor(self.stop_token_ids, device=device)
        pad = self.stop_token_ids[0]
        tokens = torch.full((N, max_new_tokens), pad, dtype=torch.long, device=device)
        token_lp = torch.zeros(N, max_new_tokens, device=device) if logprobs else None
        if decode.cache == "static":
            self._decode_static(dec, head, cache, mask, next_pos, last, rand, stops, tokens, token_lp,
                                min_new_tokens, temperature, top_p, generator, decode.compile)
            return self._generations(index_of, tokens, token_lp)
        alive = torch.arange(N, device=device)
        for step in range(max_new_tokens):
            logits = head(last).float()
            if step < min_new_tokens:
                logits[:, stops] = float("-inf")
            nxt, lp = sample_next_with_logprob(logits, temperature, top_p, generator,
                                               None if rand is None else rand[alive, step])
            tokens[alive, step] = nxt
            if token_lp is not None:
                token_lp[alive, step] = lp
            finished = torch.isin(nxt, stops)
            n_done = int(finished.sum())  # the step's one host sync
            if n_done == len(alive) or step == max_new_tokens - 1:
                break
            if n_done:
                keep = (~finished).nonzero().flatten()
                cache.batch_select_indices(keep)
                alive, nxt, mask, next_pos = alive[keep], nxt[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)], 1)
            out = dec(
                inputs_embeds=self.embed_tokens(nxt[:, None]),
                attention_mask=mask,
                position_ids=self.positions(next_pos),
                use_cache=True,
                **cache_kwargs(cache),
            )
            cache, last = kv_cache(out), out.last_hidden_state[:, -1]
            next_pos = next_pos + 1
        return self._generations(index_of, tokens, token_lp)

    def _decode_static(self, dec, head, cache, mask: Tensor, next_pos: Tensor, last: Tensor, rand, stops: Tensor,
                       tokens: Tensor, token_lp, min_new_tokens: int, temperature: float, top_p: float,
                       generator, compile: bool) -> None:
        """The static-cache decode loop of `_decode`: fills `tokens` (and `token_lp`) in place."""
        N, max_new = tokens.shape
        P = mask.shape[1]
        static = _static_cache(cache, P + max_new)
        full_mask = torch.cat([mask, mask.new_zeros(N, max_new)], 1)
        step_fn = self._compiled_decoder(dec) if compile else dec
        done = torch.zeros(N, dtype=torch.bool, device=tokens.device)
        for step in range(max_new):
            logits = head(last).float()
            if step < min_new_tokens:
                logits[:, stops] = float("-inf")
            nxt, lp = sample_next_with_logprob(logits, temperature, top_p, generator,
                                               None if rand is None else rand[:, step])
            tokens[:, step] = nxt
            if token_lp is not None:
                token_lp[:, step] = lp
            done |= torch.isin(nxt, stops)
            if step == max_new - 1 or bool(done.all()):  # the step's one host sync
                break
            full_mask[:, P + step] = 1
            out = step_fn(inputs_embeds=self.embed_tokens(nxt[:, None]), attention_mask=full_mask,
                          position_ids=self.positions(next_pos), use_cache=True, **cache_kwargs(static))
            last = out.last_hidden_state[:, -1]
            next_pos = next_pos + 1

    def _compiled_decoder(self, dec: nn.Module):
        """`torch.compile(dec)`, built once per backend (it recompiles only for a new batch shape). Kept
        outside the module tree, so the backend's state dict never sees it."""
        compiled = self.__dict__.get("_compiled_dec")
        if compiled is None or compiled._orig_mod is not dec:
            compiled = torch.compile(dec, dynamic=False)
            object.__setattr__(self, "_compiled_dec", compiled)
        return compiled

    def _generations(self, index_of: list[list[int]], tokens: Tensor, token_lp: Tensor | None) -> list[Generation]:
        """Each part's rows cut after their first stop token (kept) and decoded to text."""
        stop_set = set(self.stop_token_ids)
        all_tokens = tokens.tolist()
        all_lps = None if token_lp is None else token_lp.tolist()
        gens, row = [], 0
        for index in index_of:
            ids: list[list[int]] = []
            truncated: list[bool] = []
            lps = None if all_lps is None else []
            for r in range(row, row + len(index)):
                seq = all_tokens[r]
                cut = next((j for j, t in enumerate(seq) if t in stop_set), None)
                ids.append(seq if cut is None else seq[: cut + 1])
                truncated.append(cut is None)
                if lps is not None:
                    lps.append(all_lps[r][: len(ids[-1])])
            row += len(index)
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in ids]
            gens.append(Generation(ids, texts, truncated, index, lps))
        return gens

    @torch.no_grad()
    def generate_stream(
        self,
        items: Sequence,
        make_inputs,
        batch_size: int,
        max_new_tokens: int = 256,
        refill: int | None = None,
    ) -> Iterator[tuple[int, list[int], bool]]:
        """Greedy answers with continuous batching: yields `(item index, token ids, truncated)` as rows
        finish, in finishing order.

        A fixed batch decodes until its longest answer ends, its tail at a few rows; here a row that
        stops frees its slot, and once `refill` slots (default a quarter of the batch) are free the next
        prompts (`make_inputs(items[i:j])` → PromptBatch) are prefilled and their KV cache joins the
        running one, left-padded to a common length under the attention mask. Each row's tokens are
        those `generate(temperature=0)` would give it alone, up to padding round-off.
        """
        refill = max(1, min(batch_size, refill or batch_size // 4))
        dec, head = self.decoder(), self.lm_head()
        stops = torch.tensor(self.stop_token_ids, device=self.device)
        stop_set = set(self.stop_token_ids)
        nxt_item = 0
        rows: list[int] = []  # item index of each live row
        toks: list[list[int]] = []
        cache = mask = next_pos = last = None
        while nxt_item < len(items) or rows:
            free = batch_size - len(rows)
            if nxt_item < len(items) and (free >= refill or not rows):
                take = list(range(nxt_item, min(len(items), nxt_item + free)))
                nxt_item = take[-1] + 1
                inp = make_inputs([items[i] for i in take])
                self._check_room(inp, max_new_tokens)
                pos = (inp.attention_mask.cumsum(-1) - 1).clamp(min=0)
                out = dec(inputs_embeds=inp.embeds, attention_mask=inp.attention_mask,
                          position_ids=self.positions(pos), use_cache=True)
                new_last, new_pos = out.last_hidden_state[:, -1], pos[:, -1:] + 1
                if cache is None:
                    cache, mask, next_pos, last = kv_cache(out), inp.attention_mask, new_pos, new_last
                else:
                    mask = _join_caches(cache, kv_cache(out), mask, inp.attention_mask)
                    next_pos, last = torch.cat([next_pos, new_pos]), torch.cat([last, new_last])
                rows += take
                toks += [[] for _ in take]
            nxt = head(last).float().argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                toks[r].append(t)
            stopped = torch.isin(nxt, stops).tolist()
            done = [r for r in range(len(rows)) if stopped[r] or len(toks[r]) >= max_new_tokens]
            for r in done:
                yield rows[r], toks[r], toks[r][-1] not in stop_set
            if done:
                gone = set(done)
                keep = [r for r in range(len(rows)) if r not in gone]
                rows, toks = [rows[r] for r in keep], [toks[r] for r in keep]
                if not rows:
                    cache = mask = next_pos = last = None
                    continue
                idx = torch.tensor(keep, device=nxt.device)
                cache.batch_select_indices(idx)
                nxt, next_pos = nxt[idx], next_pos[idx]
                mask = _trim_cache(cache, mask[idx])
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)], 1)
            out = dec(inputs_embeds=self.embed_tokens(nxt[:, None]), attention_mask=mask,
                      position_ids=self.positions(next_pos), use_cache=True, **cache_kwargs(cache))
            cache, last = kv_cache(out), out.last_hidden_state[:, -1]
            next_pos = next_pos + 1

    # ---- scoring --------------------------------------------------------------------------------
    def score(
        self,
        inputs: PromptBatch,
        completions: Sequence[Sequence[int]],
        prompt_index: Sequence[int],
        layers: Sequence[int] | None = None,
        grad: bool = False,
        entropy: bool = False,
        temperature: float = 1.0,
        last_layer: LastLayer = "pre_norm",
        token_states: Callable[[int, Tensor, Tensor], None] | None = None,
        share_prompt: bool | None = None,
    ) -> Scores:
        """Log-probs of every completion token, and the pooled hidden states of `layers` (1-based
        decoder blocks) over the completion (its final token excluded when it is a stop token).

        `temperature`: the log-probs (and entropies) are those of softmax(logits / temperature), the
        distribution `generate` samples from at that temperature (top-p is not applied here).
        `last_layer`: what layer n (the last block) means when asked for: `pre_norm` (default) the
        block's output, like every other layer; `post_norm` that output after the decoder's final
        norm, which is what transformers' `output_hidden_states[-1]` holds (the public reference code's
        states). `token_states(j, h, pool)`, when given, sees each requested layer's completion-position
        states `h` [N, T, H] (model dtype, no grad; j indexes `layers`) and the pooling mask `pool`
        [N, T] as the forward passes: for analyses that need more than the pooled states.

        Pooled states are float32 whatever the model's dtype (sums accumulated in float32), and
        positions outside the pooling mask never enter them, even when they hold inf or NaN.

        `share_prompt`: how the prompt is run. Unshared, one forward over prompt + completion per row,
        so a prompt with G completions (a GRPO group) goes through the decoder G times. Shared, the
        decoder runs once over the distinct prompts (`inputs`) and once over the completions, which
        attend to their prompt's KV cache expanded to the rows (`_prefill_rows`); its gradient flows
        back into the prompt's keys and values, summed over the rows. Without dropout both give the
        same log-probs, states and gradients up to float round-off. None (default) shares when some
        prompt has two or more rows and the backend allows it (`_can_share_prompt`: not under
        `checkpoint_blocks` with grad enabled); False never; True always, or an error where it cannot.
        Under LoRA dropout the shared path draws ONE mask for a prompt's positions where the
        unshared path draws one per row. The loss is linear in the rows, so its expected value and
        expected gradient are the same either way; the prompt's dropout noise is then common to a
        group's rows instead of independent, and group-relative advantages (zero-sum over a group)
        cancel that common part rather than adding G independent draws of it.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for scoring, got {temperature}")
        if last_layer not in LAST_LAYERS:
            raise ValueError(f"last_layer must be one of {LAST_LAYERS}, got {last_layer!r}")
        if len(completions) != len(prompt_index):
            raise ValueError("one prompt index per completion")
        if any(len(c) == 0 for c in completions):
            raise ValueError("empty completion")
        n_layers = len(self.decoder_layers())
        layers = list(layers or [])
        bad = [l for l in layers if not 1 <= l <= n_layers]
        if bad:
            raise ValueError(f"layers must be in 1..{n_layers}, got {bad}")
        device = inputs.embeds.device
        N, T = len(completions), max(len(c) for c in completions)
        P = inputs.embeds.shape[1]
        index = torch.as_tensor(list(prompt_index), device=device)
        comp = torch.zeros(N, T, dtype=torch.long, device=device)
        cmask = torch.zeros(N, T, dtype=torch.bool, device=device)
        for r, c in enumerate(completions):
            comp[r, : len(c)] = torch.as_tensor(list(c), device=device)
            cmask[r, : len(c)] = True
        # Pool over completion tokens, without a final stop token: its state says "I am done", not
        # anything about the reasoning.
        stop_set = set(self.stop_token_ids)
        pool = cmask.clone()
        for r, c in enumerate(completions):
            if c[-1] in stop_set and len(c) > 1:
                pool[r, len(c) - 1] = False

        shared = self._share_prompt(prompt_index, grad, share_prompt)

        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            mask = torch.cat([inputs.attention_mask.index_select(0, index), cmask.long()], 1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            # Masked means in float32 via `where`, not a multiply by a 0/1 mask: 0 · inf = NaN, and a
            # padded position may hold anything. The results go into float32 buffers allocated
            # before the forward: small tensors created between the layers' large, short-lived
            # activations would pin the allocator's heap (measured: +100–170 MB RSS).
            select = pool[:, :, None]
            last_t = pool.long().sum(1) - 1  # each row's last pooled token, completion-relative
            count = pool.sum(1, keepdim=True).clamp(min=1).float()
            rows = torch.arange(N, device=device)
            H = inputs.embeds.shape[-1]
            sum_buf = torch.zeros(len(layers), N, H, dtype=torch.float32, device=device)
            last_buf = torch.zeros(len(layers), N, H, dtype=torch.float32, device=device)

            def pool_states(i: int, h_full: Tensor) -> None:
                h = h_full.detach()[:, -T:]  # the completion positions (preceded by the prompt's when unshared)
                torch.sum(torch.where(select, h, 0.0), 1, dtype=torch.float32, out=sum_buf[i])
                last_buf[i].copy_(h[rows, last_t])
                if token_states is not None:
                    token_states(i, h, pool)

            def pool_into(i: int):
                def hook(_mod, _inp, output):
                    pool_states(i, output[0] if isinstance(output, tuple) else output)

                return hook

            if shared:  # before the pooling hooks exist: they pool the completion pass only
                prompt_last, cache = self._prefill_rows(inputs, index)
                embeds, pos, past = self.embed_tokens(comp), pos[:, P:], cache_kwargs(cache)
            else:
                embeds = torch.cat([inputs.embeds.index_select(0, index), self.embed_tokens(comp)], 1)
                past = {}
            # post_norm: the last block's entry is pooled from the decoder's output (after its norm).
            from_output = layers.index(n_layers) if last_layer == "post_norm" and n_layers in layers else None
            blocks = self.decoder_layers()
            handles = [blocks[l - 1].register_forward_hook(pool_into(i)) for i, l in enumerate(layers)
                       if i != from_output]
            try:
                hidden = self.decoder()(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=self.positions(pos), use_cache=shared, **past).last_hidden_state
            finally:
                for h in handles:
                    h.remove()
            if from_output is not None:
                pool_states(from_output, hidden)
            # Completion token t is predicted at position P + t - 1: token 0 by the prompt's last state
            # (from the prompt pass when shared), the others by the completion's states. Only the
            # real completion tokens go through the LM head, in chunks (`token_logprobs`): never an
            # [N, T, vocab] tensor.
            if shared:
                before = torch.cat([prompt_last[:, None], hidden[:, : T - 1]], 1)
            else:
                before = hidden[:, P - 1 : P + T - 1]
            where = cmask.nonzero(as_tuple=True)
            lp, ent = token_logprobs(self.lm_head(), before[where], comp[where], temperature, entropy)
            # Scattered into zeros: a padded position never holds anything but 0 (never NaN).
            logprobs = torch.zeros(N, T, dtype=lp.dtype, device=device).index_put(where, lp)
        result = Scores(logprobs, cmask, layers)
        if entropy:
            result.entropy = torch.zeros(N, T, dtype=ent.dtype, device=device).index_put(where, ent)
        if layers:
            result.pooled = {"mean": (sum_buf / count).transpose(0, 1), "last": last_buf.transpose(0, 1)}
        return result

    def _can_share_prompt(self, grad: bool) -> str | None:
        """Why `score` cannot share its prompt pass here, or None when it can. Under checkpointed blocks
        with grad, the backward's recompute of each block would run the KV cache's `update` a second
        time (appending the prompt's keys again); backends whose decoder cannot continue from a cache
        with a multi-token step override this."""
        if grad and any("_tars_plain_forward" in b.__dict__ for b in self.decoder_layers()):
            return "the decoder blocks are checkpointed (checkpoint_blocks)"
        return None

    def _share_prompt(self, prompt_index: Sequence[int], grad: bool, share_prompt: bool | None) -> bool:
        """`score`'s choice of path; sharing pays only when a prompt would otherwise run twice or more."""
        why_not = self._can_share_prompt(grad)
        if share_prompt is None:
            return why_not is None and len(set(prompt_index)) < len(prompt_index)
        if share_prompt and why_not is not None:
            raise ValueError(f"score(share_prompt=True): not possible here, {why_not}")
        return bool(share_prompt)

    def _prefill_rows(self, inputs: PromptBatch, index: Tensor) -> tuple[Tensor, object]:
        """The prompts' last (post-norm) states and KV cache, run once per prompt and expanded to the
        completion rows `index`. The expansion indexes out of place (`batch_select_indices`: a gather
        into new tensors), so the rows' gradients flow back into the one prompt pass and add up there."""
        pos = (inputs.attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.decoder()(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                             position_ids=self.positions(pos), use_cache=True)
        cache = kv_cache(out)
        cache.batch_select_indices(index)
        return out.last_hidden_state[:, -1].index_select(0, index), cache

    def checkpoint_blocks(self, on: bool = True) -> None:
        """Activation checkpointing of the decoder blocks: with grad enabled, each block keeps only its
        input for the backward and recomputes its inside there (one more forward of the blocks, the
        memory of one block's activations instead of all of them).

        Our own wrapper of each block's `forward` rather than transformers' `gradient_checkpointing_enable`
        (being renamed across 5.x): the block's module hooks (`score`'s pooling) still fire once, on
        the outer call; dropout masks are replayed (the RNG state and the modules' train/eval flags
        of the forward are restored for the recompute); a no-grad forward (generation, reference
        scoring) runs the block plainly."""
        from torch.utils.checkpoint import checkpoint

        for block in self.decoder_layers():
            plain = block.__dict__.pop("_tars_plain_forward", None)
            if plain is not None:  # undo an earlier call
                block.forward = plain
            if not on:
                continue
            plain = block.forward
            block._tars_plain_forward = plain

            def forward(*args, _plain=plain, _block=block, **kwargs):
                if not torch.is_grad_enabled():
                    return _plain(*args, **kwargs)
                # The recompute runs in the backward, by which time the trainer may have switched
                # the model to eval mode: replay the train/eval flags of the forward (dropout on).
                modes = [(m, m.training) for m in _block.modules()]

                def run(*a, **k):
                    now = [m.training for m, _ in modes]
                    for m, training in modes:
                        m.training = training
                    try:
                        return _plain(*a, **k)
                    finally:
                        for (m, _), training in zip(modes, now):
                            m.training = training

                return checkpoint(run, *args, use_reentrant=False, **kwargs)

            block.forward = forward

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder().parameters()).dtype


#: Bytes of float32 logits one chunk of `token_logprobs` may hold: 64 MiB is 341 tokens of a
#: 49k vocabulary (the mini model), 110 of Qwen2's 152k.
LOGIT_CHUNK_BYTES = 64 << 20


def token_logprobs(head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float = 1.0,
                   entropy: bool = False, chunk_bytes: int = LOGIT_CHUNK_BYTES) -> tuple[Tensor, Tensor | None]:
    """log softmax(head(h) / temperature)[target] for each row of `hidden` [M, H] (float32, [M]), and
    the entropy of that distribution (no grad) when asked.

    In chunks of rows whose float32 logits fit `chunk_bytes`. With grad enabled each chunk is
    recomputed in the backward (`torch.utils.checkpoint`): what the graph keeps is the hidden states,
    not [M, vocab] logits and their log-softmax (for a 7B model's 152k vocabulary, 64 × 512 completion
    tokens would keep 2 × 20 GB of them).
    """
    from torch.utils.checkpoint import checkpoint

    M = hidden.shape[0]
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head(hidden[:1]).shape[-1]
    size = max(1, chunk_bytes // (4 * vocab))

    def chunk(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = head(h).float()
        if temperature != 1.0:
            logits = logits / temperature
        norm = torch.logsumexp(logits, -1)
        lp = logits.gather(-1, y[:, None]).squeeze(-1) - norm
        with torch.no_grad():  # H = log Z − Σ p·logit, without a second [rows, vocab] log-softmax
            ent = norm - (torch.softmax(logits, -1) * logits).sum(-1) if entropy else norm.new_zeros(0)
        return lp, ent

    grad = torch.is_grad_enabled() and hidden.requires_grad
    lps, ents = [], []
    for i in range(0, M, size):
        h, y = hidden[i : i + size], targets[i : i + size]
        lp, ent = checkpoint(chunk, h, y, use_reentrant=False) if grad else chunk(h, y)
        lps.append(lp)
        ents.append(ent)
    lp = torch.cat(lps) if lps else hidden.new_zeros(0, dtype=torch.float32)
    return lp, (torch.cat(ents).detach() if entropy and ents else (lp.new_zeros(0) if entropy else None))


def stop_tokens(tokenizer, names: Sequence[str]) -> list[int]:
    """Ids of the end-of-turn tokens `names` that the tokenizer knows, plus its eos token."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in names]
    ids = [t for t in ids if isinstance(t, int) and t != tokenizer.unk_token_id]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _static_cache(cache, max_len: int):
    """A cache of full-attention static layers holding `cache`'s keys/values in its first columns.

    Every layer is a plain `StaticLayer`, sliding-window ones included: the decode never exceeds
    `max_len`, and `_check_room` keeps that within the context (Phi-4's window is its context).
    Consumes `cache`: each of its layers is emptied once copied, so the prefill cache is never held
    beside the whole static one (at most one layer of it: what `tars plan` allows for)."""
    from transformers.cache_utils import Cache, StaticLayer

    layers = []
    for src in cache.layers:
        if getattr(src, "is_sliding", False) and max_len > src.sliding_window:
            raise NotImplementedError("static decode needs KV caches that hold every token")
        layer = StaticLayer(max_cache_len=max_len)
        layer.lazy_initialization(src.keys, src.values)
        n = src.keys.shape[-2]
        layer.keys[:, :, :n].copy_(src.keys)
        layer.values[:, :, :n].copy_(src.values)
        layer.cumulative_length.fill_(n)
        layers.append(layer)
        src.keys, src.values = src.keys.new_empty(0), src.values.new_empty(0)
    return Cache(layers=layers)


def _trim_cache(cache, mask: Tensor) -> Tensor:
    """Drop the leading cache columns that every remaining row masks out, and return the trimmed mask.

    Without this a stream's cache only grows: each join pads the newcomers to the running length, the
    running length gains one column per decoding step for the whole stream, and attention cost with it.
    """
    start = int(mask.any(0).nonzero()[0]) if bool(mask.any()) else 0
    if start == 0:
        return mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = layer.keys.shape[-2]
    return mask[:, start:]


def _join_caches(cache, new, mask: Tensor, new_mask: Tensor) -> Tensor:
    """Append `new`'s rows to `cache` in place and return the joined attention mask: the shorter side
    is left-padded with zero keys/values that the mask hides (positions are tracked per row, so the
    padding moves no token)."""
    L, Ln = mask.shape[1], new_mask.shape[1]
    T = max(L, Ln)
    # Sliding-window layers (Phi-4's 262k window) join like full ones while nothing has slid out yet.
    if len(cache.layers) != len(new.layers) or any(
            getattr(l, "is_sliding", False) and T >= l.sliding_window - 1 for l in cache.layers):
        raise NotImplementedError("continuous batching needs KV caches that still hold every token")

    def pad(x: Tensor, n: int, dim: int) -> Tensor:
        if n == 0:
            return x
        shape = list(x.shape)
        shape[dim] = n
        return torch.cat([x.new_zeros(shape), x], dim)

    for a, b in zip(cache.layers, new.layers):
        a.keys = torch.cat([pad(a.keys, T - L, -2), pad(b.keys, T - Ln, -2)])
        a.values = torch.cat([pad(a.values, T - L, -2), pad(b.values, T - Ln, -2)])
        if hasattr(a, "cumulative_length"):
            a.cumulative_length = T
    return torch.cat([pad(mask, T - L, 1), pad(new_mask, T - Ln, 1)])


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                uniforms: Tensor | None = None) -> Tensor:
    """Greedy when `temperature` is 0, else nucleus sampling at `temperature`: a multinomial draw from
    `generator`, or — given one uniform in [0, 1) per row — the token where the row's cumulative
    probability first exceeds it (inverse CDF, float64 so the last token is reachable)."""
    return sample_next_with_logprob(logits, temperature, top_p, generator, uniforms)[0]


def sample_next_with_logprob(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                             uniforms: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`sample_next`'s tokens and each one's log-prob under the distribution it was drawn from (one
    softmax and nucleus for both)."""
    if temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.zeros(tokens.shape, device=logits.device)
    probs = _sampling_probs(logits, temperature, top_p)
    if uniforms is None:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        cdf = probs.double().cumsum(-1)
        target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    return tokens, _logprob_of(probs, tokens)


def _sampling_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The softmax at `temperature`, zeroed outside the top-p nucleus (not renormalised)."""
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return probs


def sampled_logprob(logits: Tensor, temperature: float, top_p: float, tokens: Tensor) -> Tensor:
    """log P(token) under the distribution `sample_next` draws from: the nucleus renormalised; 0 for
    greedy (a point mass)."""
    if temperature <= 0:
        return torch.zeros(tokens.shape, device=logits.device)
    return _logprob_of(_sampling_probs(logits, temperature, top_p), tokens)


def _logprob_of(probs: Tensor, tokens: Tensor) -> Tensor:
    """log of `tokens`' share of each row of `probs` (the nucleus renormalised)."""
    return (probs.gather(-1, tokens[:, None]).squeeze(-1) / probs.sum(-1)).log()


def default_device() -> torch.device:
    if os.environ.get("TARS_DEVICE"):
        return parse_device(os.environ["TARS_DEVICE"], "TARS_DEVICE")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(spec: str, where: str) -> torch.device:
    """`spec` as a device this machine has; a one-line `UserError` naming `where` (the option, key or
    variable it came from) for a misspelt one or a GPU that is not there."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"{where}: {spec!r} is not a device (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{where}: {spec}: this machine has no CUDA GPU")
    return device
