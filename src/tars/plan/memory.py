"""The memory of one TARS training step on one card: every term, the peak and the phase that sets it,
and the largest `micro_batch_questions` that fits.

A step (rl/tars.py `TarsTrainer.step`) has two phases whose memory never overlaps:

1. **generation** — every rollout of the step decoded with a KV cache (`Backend.generate_paired`): the
   speech and text rows of all the process's questions in one batch, left-padded to the longest
   prompt (Phi-4 with its speech LoRA: speech rows, then text rows), each row as long as the prompt
   plus `max_new_tokens`; plus one decode step's logits and sampler, and one layer's cache copy
   (`DynamicCache` grows by concatenation); or the prefill, if larger.
2. **scoring** — per micro-batch of `micro_batch_questions` questions, text's grad-enabled forward and
   backward, then speech's (one modality's activations alive at a time; `joint_groups` keeps text's
   saved activations through speech's). Each is the larger of the decoder phase (block activations,
   or with `activation_checkpointing` the blocks' inputs plus one block's recompute) and the LM head's
   phase (everything saved plus one 64 MiB chunk's recompute), from calibration.json's coefficients.

Always resident: the weights (every parameter the backend holds, in `dtype`), the LoRA's fp32
weights, gradients and AdamW moments (16 bytes a parameter), R_beh's sentence embedder in float32 when
the method uses it, and a fixed allowance for the CUDA context and library workspaces (assumed, not
measured). What is summed are live tensor bytes, as `torch.cuda.max_memory_allocated` counts them; the
headroom (default 10 %) is for the caching allocator's fragmentation.

Completions are taken to reach `max_new_tokens` (a micro-batch is padded to its longest completion, so
one long rollout makes every row that long); prompts are the template, plus the clip's audio tokens
(`--audio-s`) or the question's text tokens (`--question-tokens`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tars.errors import UserError
from tars.plan.architecture import Architecture, embedder_params, load_architecture

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class PlanOptions:
    gpu_gib: float = 80.0
    headroom: float = 0.10
    audio_s: float = 30.0
    question_tokens: int = 150
    #: Processes of a ddp / zero2 run, each with a whole model and its share of the step's questions.
    processes: int = 1


@dataclass
class Term:
    name: str
    phase: str  # "all", "generation", "scoring"
    bytes: int


@dataclass
class Plan:
    model: str
    source: str
    dtype: str
    options: dict
    prompt_tokens: dict
    terms: list[Term]
    #: Peak bytes of each phase with the config's micro-batch (static terms included).
    phases: dict[str, int]
    peak: int
    peak_phase: str
    usable: int
    fits: bool
    micro_batch_questions: int
    #: Largest micro_batch_questions whose scoring fits (None: not even 1), and whether generation fits.
    max_micro_batch_questions: int | None
    #: When every question of the step fits one micro-batch: how many would (scoring alone), else None.
    scoring_capacity_questions: int | None
    generation_fits: bool
    #: Largest questions per process whose generation fits (None: not even 1).
    max_generation_questions: int | None
    calibration: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["terms"] = [{"name": t.name, "phase": t.phase, "bytes": t.bytes, "gib": round(t.bytes / GIB, 3)}
                      for t in self.terms]
        d["phases_gib"] = {k: round(v / GIB, 3) for k, v in self.phases.items()}
        d["peak_gib"] = round(self.peak / GIB, 3)
        d["usable_gib"] = round(self.usable / GIB, 3)
        return d


# ---- calibration data ---------------------------------------------------------------------------------------
def user_calibration_file() -> Path:
    from tars.paths import tars_home

    return tars_home() / "plan" / "calibration.json"


def load_calibrations() -> dict:
    """The packaged calibration.json, with the user's `$TARS_HOME/plan/calibration.json` (written by
    `tars plan --calibrate`) taking precedence entry by entry."""
    data = json.loads(CALIBRATION_FILE.read_text()) if CALIBRATION_FILE.exists() else {"entries": {}}
    user = user_calibration_file()
    if user.exists():
        mine = json.loads(user.read_text())
        for k, v in mine.get("entries", {}).items():
            v = dict(v)
            v["_file"] = str(user)
            v["_environment"] = mine.get("environment")
            data["entries"][k] = v
    return data


def calibration_for(arch: Architecture, dtype: str, lora_dropout: bool, config_path: str | None) -> tuple[dict, dict]:
    data = load_calibrations()
    key = arch.key(dtype, lora_dropout)
    if key not in data["entries"]:
        cmd = f"tars plan --calibrate --config {config_path}" if config_path else "tars plan --calibrate --config FILE"
        raise UserError(f"no memory calibration for {arch.name} ({key}): run `{cmd}` (measures it on this CPU; "
                        f"a few minutes at 7B widths)")
    return data["entries"][key], data


# ---- the model ------------------------------------------------------------------------------------------------
def _lin(c: dict, **x: float) -> float:
    return sum(c[k] * v for k, v in x.items()) + c["constant"]


def modality_peak(cal: dict, modality: str, checkpoint: bool, layers: int, rows: int, seq: int,
                  completion: int) -> tuple[float, float]:
    """(peak, saved) bytes of one modality's grad-enabled forward + backward over `rows` sequences of
    `seq` tokens, `completion` of them completion tokens: the larger of the decoder phase and the LM
    head's phase (everything saved + one chunk's recompute)."""
    coef = cal["modalities"].get(modality) or cal["modalities"]["text"]
    c = coef["checkpoint" if checkpoint else "full"]
    tok, comp = rows * seq, rows * completion
    saved = _lin(c["saved"], per_layer_token=layers * tok, per_token=tok, per_completion_token=comp)
    decoder = _lin(c["peak"], per_layer_token=layers * tok, per_token=tok)
    head = saved + cal["head"]["constant"] + cal["head"]["per_row"] * comp
    return max(decoder, head), saved


def forward_peak(cal: dict, tokens: int) -> float:
    """A no-grad forward's transient (prefill, reference and dropout-free scoring)."""
    return _lin(cal["forward"], per_token=tokens)


def make_plan(cfg, arch: Architecture, options: PlanOptions, cal: dict, cal_data: dict, config_path: str | None = None,
              embedder: tuple[int, str] | None = None) -> Plan:
    from tars.rl.tars import USES_BEH

    if options.audio_s > arch.max_audio_s:
        raise UserError(f"--audio-s {options.audio_s:g}: longer than {arch.name}'s window of {arch.max_audio_s:g} s "
                        "(tars refuses such clips)")
    db = DTYPE_BYTES[cfg.dtype]
    Q = math.ceil(cfg.questions_per_step / options.processes)
    Gs, Gt, N, L = cfg.speech_rollouts, cfg.text_rollouts, cfg.max_new_tokens, arch.layers
    P_s = arch.template_tokens + arch.audio_tokens(options.audio_s)
    P_t = arch.template_tokens + options.question_tokens
    P_ts = P_s if cfg.text_scored_under == "speech" else P_t
    kv_tok = arch.kv_bytes_per_token(db)
    top_p = "1.0" if cfg.top_p >= 1.0 else "0.9"
    per_logit = cal["sampling_bytes_per_logit"][top_p]

    terms = [Term(f"weights: {arch.params / 1e9:.2f} B parameters in {cfg.dtype}", "all", arch.params * db),
             Term(f"LoRA r {cfg.lora.r}: {arch.lora_params / 1e6:.1f} M parameters + grads + AdamW (fp32)", "all",
                  arch.lora_params * 16)]
    if cfg.method in USES_BEH:
        n_emb, _ = embedder or embedder_params(cfg.embedder)
        terms.append(Term(f"R_beh embedder: {n_emb / 1e6:.1f} M parameters in float32", "all", n_emb * 4))
    overhead = int(cal_data.get("fixed_overhead_gib", 1.5) * GIB)
    terms.append(Term("CUDA context + library workspaces (assumed)", "all", overhead))
    static = sum(t.bytes for t in terms)

    def generation(q: int) -> tuple[int, list[Term]]:
        rows_s, rows_t = q * Gs, q * Gt
        if arch.can_mix:
            width = max(P_s, P_t) + N
            cache, rows = (rows_s + rows_t) * width * kv_tok, rows_s + rows_t
            what = f"KV cache: {rows_s + rows_t} rows × {width} tokens"
            prefill_peak = rows_s * P_s * kv_tok + q * P_s * kv_tok + forward_peak(cal, q * P_s)
        else:  # speech rows, then text rows: the larger part's cache at a time
            parts = sorted([(rows_s * (P_s + N), rows_s, P_s), (rows_t * (P_t + N), rows_t, P_t)])
            tokens, rows, P = parts[-1]
            cache = tokens * kv_tok
            what = f"KV cache: {rows} rows × {P + N} tokens (speech and text decoded apart)"
            prefill_peak = (rows + q) * P * kv_tok + forward_peak(cal, q * P)
        decode = rows * arch.vocab * per_logit + cache / (2 * L)
        out = [Term(what, "generation", int(cache)),
               Term(f"decode step: logits + sampler of {rows} rows, one layer's cache copy", "generation", int(decode))]
        if prefill_peak > cache + decode:
            out = [Term(f"prefill of {q} prompts × {P_s} tokens", "generation", int(prefill_peak))]
        return sum(t.bytes for t in out), out

    def scoring(m: int) -> tuple[int, list[Term]]:
        ck = cfg.activation_checkpointing
        t_peak, t_saved = modality_peak(cal, "text", ck, L, m * Gt, P_ts + N, N)
        s_peak, _ = modality_peak(cal, "speech", ck, L, m * Gs, P_s + N, N)
        how = "checkpointed blocks" if ck else "activations kept"
        out = [Term(f"scoring text: {m * Gt} rows × {P_ts + N} tokens ({how})", "scoring", int(t_peak)),
               Term(f"scoring speech: {m * Gs} rows × {P_s + N} tokens ({how})", "scoring", int(s_peak))]
        if cfg.joint_groups:  # text's saved activations wait for the joint backward
            out.append(Term("text activations kept through speech's (joint_groups)", "scoring", int(t_saved)))
            return int(max(t_peak, t_saved + s_peak)), out
        return int(max(t_peak, s_peak)), out

    usable = int(options.gpu_gib * (1 - options.headroom) * GIB)
    m_cfg = min(cfg.micro_batch_questions or Q, Q)
    gen_bytes, gen_terms = generation(Q)
    score_bytes, score_terms = scoring(m_cfg)
    phases = {"generation": static + gen_bytes, "scoring": static + score_bytes}
    peak_phase = max(phases, key=phases.get)
    max_m = max((m for m in range(1, Q + 1) if static + scoring(m)[0] <= usable), default=None)
    beyond = None  # how many questions one micro-batch could score, were the step that large
    if max_m == Q:
        beyond = Q
        while beyond < 64 * Q and static + scoring(beyond + 1)[0] <= usable:
            beyond += 1
    max_q = max((q for q in range(1, Q + 1) if static + generation(q)[0] <= usable), default=None)
    notes = []
    if cfg.method in ("sft", "dpo"):
        notes.append(f"method={cfg.method}: its update is modelled as the policy-gradient scoring (an approximation)")
    if not arch.can_mix and cfg.activation_checkpointing:
        notes.append("Phi-4 with its speech LoRA and activation_checkpointing: the numbers are those of a recompute "
                     "that runs the speech LoRA as the forward did")
    source = cal.get("_file", str(CALIBRATION_FILE.name))
    env = cal.get("_environment") or cal_data.get("environment") or {}
    return Plan(
        model=arch.name, source=arch.source, dtype=cfg.dtype, options=asdict(options),
        prompt_tokens={"speech": P_s, "text": P_ts, "audio": arch.audio_tokens(options.audio_s),
                       "completion": N, "questions_per_process": Q},
        terms=terms + gen_terms + score_terms, phases=phases, peak=max(phases.values()), peak_phase=peak_phase,
        usable=usable, fits=max(phases.values()) <= usable, micro_batch_questions=m_cfg,
        max_micro_batch_questions=max_m, scoring_capacity_questions=beyond,
        generation_fits=phases["generation"] <= usable,
        max_generation_questions=max_q,
        calibration=f"{source} ({env.get('device', '?')}, torch {env.get('torch', '?')}, {env.get('date', '?')})",
        notes=notes)


def plan_config(config: str | Path, overrides: list[str], options: PlanOptions) -> tuple[Plan, object]:
    from tars.config import load_config
    from tars.rl.tars import TarsConfig

    cfg = load_config(TarsConfig, config, overrides)
    if options.gpu_gib <= 0:
        raise UserError(f"--gpu-gb {options.gpu_gib:g}: must be > 0")
    if not 0 <= options.headroom < 1:
        raise UserError(f"--headroom {options.headroom:g}: must be in [0, 1)")
    if options.audio_s <= 0 or options.question_tokens < 1 or options.processes < 1:
        raise UserError("--audio-s, --question-tokens and --processes must be positive")
    arch = load_architecture(cfg.model, cfg.lora, where=f"{config}: model")
    cal, data = calibration_for(arch, cfg.dtype, cfg.lora.dropout > 0, str(config))
    return make_plan(cfg, arch, options, cal, data, str(config)), cfg


# ---- output ----------------------------------------------------------------------------------------------------
def render(plan: Plan, config: str, console) -> None:
    from rich.table import Table

    o = plan.options
    gib = lambda b: f"{b / GIB:.1f}"  # noqa: E731
    table = Table(title=f"tars plan: {config} — {plan.model}, {plan.dtype}, one step on a card of {o['gpu_gib']:g} GiB",
                  title_justify="left")
    table.add_column("term")
    table.add_column("phase")
    table.add_column("GiB", justify="right")
    for t in plan.terms:
        table.add_row(t.name, t.phase, gib(t.bytes))
    for phase, b in plan.phases.items():
        mark = " ← peak" if phase == plan.peak_phase else ""
        table.add_row(f"[bold]{phase} phase total{mark}[/bold]", phase, f"[bold]{gib(b)}[/bold]")
    console.print(table)
    p = plan.prompt_tokens
    console.print(f"prompts: speech {p['speech']} tokens ({o['audio_s']:g} s of audio = {p['audio']}), text {p['text']}; "
                  f"completions {p['completion']} (max_new_tokens); {p['questions_per_process']} question(s) per process",
                  soft_wrap=True)
    verdict = "fits" if plan.fits else "does NOT fit"
    console.print(f"peak {gib(plan.peak)} GiB ({plan.peak_phase}) of {gib(plan.usable)} GiB usable "
                  f"({o['gpu_gib']:g} GiB − {o['headroom']:.0%} headroom): {verdict} with micro_batch_questions="
                  f"{plan.micro_batch_questions}", soft_wrap=True)
    mm = plan.max_micro_batch_questions
    line = f"largest micro_batch_questions that fits: {mm if mm is not None else 'none (not even 1)'}"
    if plan.scoring_capacity_questions is not None:
        line += (f" (the whole step of {p['questions_per_process']}; scoring alone would fit "
                 f"{plan.scoring_capacity_questions}{'+' if plan.scoring_capacity_questions >= 64 * p['questions_per_process'] else ''})")
    if not plan.generation_fits:
        line += (f"; generation does not fit: at most {plan.max_generation_questions or 0} question(s) per process "
                 "(lower questions_per_step, max_new_tokens or --audio-s, or add processes)")
    console.print(line, soft_wrap=True)
    for n in plan.notes:
        console.print(f"note: {n}", soft_wrap=True)
    console.print(f"[dim]model: {plan.source}; coefficients: {plan.calibration}[/dim]", soft_wrap=True)
