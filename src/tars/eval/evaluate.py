"""`tars eval`: greedy answers from speech and from text, batched, resumable.

Questions are sorted by prompt length and decoded in batches, so padding stays small. Every finished
answer (with continuous batching, the default; a whole batch with fixed batches) is appended to
`predictions.jsonl` (flushed and fsynced); a rerun after a kill keeps those rows
and decodes only the rest. `metrics.json` is computed from all rows at the end (`metrics.summarize`).
Speech records without audio are synthesised first (`data.sources.spoken`, cached by content).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import Field

from tars.atomic import atomic_write_text
from tars.config import Config, save_config
from tars.data.bundled import BUNDLED, resolve_data
from tars.data.jsonl import check_files, read_records
from tars.data.prompts import text_prompt
from tars.errors import UserError
from tars.eval.metrics import summarize
from tars.rewards import extract_choice, format_score


class EvalConfig(Config):
    model: str
    data: list[str]
    out: str
    #: `cascade`: Whisper tiny.en transcribes the clip, the LLM answers the transcript (eval/cascade.py).
    modalities: list[Literal["speech", "text", "cascade"]] = ["speech", "text"]
    #: 32: the mini model's batched/one-at-a-time ratio passes 6x there on 2 CPU cores, not at 16
    #: (docs/performance.md); GPUs want more.
    batch_size: int = Field(32, ge=1)
    #: Continuous batching (a finished answer's slot takes the next question); False = fixed batches
    #: that decode until their longest answer ends.
    continuous: bool = True
    max_new_tokens: int = Field(192, ge=1)
    limit: int | None = Field(None, ge=1)
    voice_seed: int = 0
    #: The original text backbone's average text accuracy (%) for MRR; None = no MRR.
    backbone_text: float | None = Field(None, gt=0, le=100)
    threads: int | None = Field(None, ge=1)


def dataset_name(arg: str) -> str:
    if arg in BUNDLED:
        return arg
    p = Path(arg)
    return p.parent.name if p.name == "manifest.jsonl" else p.stem


def _read_done(path: Path) -> list[dict]:
    """Rows already written; a line cut short by a kill is dropped (and the file rewritten without it)."""
    if not path.exists():
        return []
    rows, clean = [], True
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            clean = False
    if not clean:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


#: What an answer depends on: a folder's answers are resumed only under the same values.
ANSWER_SETTINGS = ("model", "max_new_tokens", "voice_seed")


def check_resumable(cfg: EvalConfig, out: Path) -> None:
    """Refuse to add to `out`'s answers under another model or decoding setting, which would silently
    mix two models' answers in one metrics.json. Data, modalities and limit may change: answers are
    kept per dataset, modality and question."""
    import yaml

    from tars.paths import resolve

    try:
        old = yaml.safe_load((out / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # no readable record of what made the answers: nothing to compare with
    if not isinstance(old, dict):
        return
    for key in ANSWER_SETTINGS:
        if key not in old:
            continue
        was, now = old[key], getattr(cfg, key)
        same = (resolve(str(was)).expanduser().resolve() == resolve(now).expanduser().resolve() if key == "model"
                else was == now)
        if not same:
            raise UserError(f"{out}: holds answers made with {key}={was} (now {now}); pass another --out, or "
                            "remove that folder")


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm

    from tars.models.loading import load_backend
    from tars.paths import resolve
    from tars.data.sources import spoken

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    names = [dataset_name(a) for a in cfg.data]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UserError(f"--data: two files would both be reported as {twice!r} (a dataset is named by its file, "
                        "or its folder for a manifest.jsonl); rename one")
    out.mkdir(parents=True, exist_ok=True)
    preds = out / "predictions.jsonl"
    if preds.exists():
        check_resumable(cfg, out)
    save_config(cfg, out)
    rows = _read_done(preds)
    done = {(r["dataset"], r["modality"], r["id"]) for r in rows}
    # Every data file checked before the model loads: all problems at once, each clip probed for speech.
    check_files([resolve_data(a) for a in cfg.data], check_audio_files=bool({"speech", "cascade"} & set(cfg.modalities)))
    backend = load_backend(resolve(cfg.model))
    timing: dict[str, float] = {}
    cpu: dict[str, float] = {}
    transcriber = None
    excluded: dict[str, list[str]] = {}
    for arg in cfg.data:
        path = resolve_data(arg)
        name = dataset_name(arg)
        speech = bool({"speech", "cascade"} & set(cfg.modalities))
        records = read_records(path, check_audio_files=speech, max_audio_s=None)  # duration_s: the clips' own
        records = records[: cfg.limit] if cfg.limit else records
        spoken_recs, spoken_base = records, path.parent
        if speech:
            if not all(r.audio for r in records):
                spoken_recs, spoken_base = spoken(records, cfg.voice_seed)
            # Clips over the encoder window are refused by the backends (never truncated); leave those
            # questions out of BOTH modalities so that the gap compares the same questions.
            too_long = {r.id for r in spoken_recs if (r.duration_s or 0.0) > backend.max_audio_s}
            if too_long:
                excluded[name] = sorted(too_long)
                print(f"{name}: {len(too_long)} question(s) left out: audio over the {backend.max_audio_s:g} s "
                      "encoder window")
        else:
            too_long = set()
        for mod in cfg.modalities:
            recs, base = (records, path.parent) if mod == "text" else (spoken_recs, spoken_base)
            todo = [r for r in recs if (name, mod, r.id) not in done and r.id not in too_long]
            if not todo:
                continue
            todo.sort(key=lambda r: len(text_prompt(r)) if mod == "text" else (r.duration_s or 0.0))
            if mod == "cascade" and transcriber is None:
                from tars.eval.cascade import Transcriber

                transcriber = Transcriber(backend.device)
            transcripts: dict[str, str] = {}

            def make_inputs(batch, mod=mod, base=base):
                if mod == "cascade":
                    heard = transcriber([Path(base) / r.audio for r in batch])
                    transcripts.update({r.id: t for r, t in zip(batch, heard)})
                    batch = [replace(r, extra={**r.extra, "transcript": t}) for r, t in zip(batch, heard)]
                    return backend.build_inputs(batch, "transcript")
                return backend.build_inputs(batch, mod, base_dir=base)

            t0, c0 = time.perf_counter(), time.process_time()
            # Continuous batching (Backend.generate_stream): a finished answer's slot takes the next
            # question at once; answers are appended (and fsynced) as they finish, so a kill loses
            # only the answers in flight.
            if cfg.continuous:
                stream = backend.generate_stream(todo, make_inputs, cfg.batch_size, cfg.max_new_tokens)
            else:
                stream = _fixed_batches(backend, todo, make_inputs, cfg.batch_size, cfg.max_new_tokens)
            with tqdm(total=len(todo), desc=f"{name} {mod}", unit="q", disable=not progress) as bar, \
                    open(preds, "a") as f:
                for i, ids, trunc in stream:
                    r = todo[i]
                    text = backend.tokenizer.decode(ids, skip_special_tokens=True)
                    x = {"dataset": name, "modality": mod, "id": r.id, "subject": r.subject, "answer": r.answer,
                         "pred": extract_choice(text, r.options), "format": format_score(text),
                         "n_options": len(r.options), "truncated": trunc, "n_tokens": len(ids), "completion": text}
                    if mod == "cascade":
                        x["transcript"] = transcripts.pop(r.id)
                    f.write(json.dumps(x) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    rows.append(x)
                    bar.update(1)
            timing[f"{name}/{mod}"] = round(time.perf_counter() - t0, 1)
            cpu[f"{name}/{mod}"] = round(time.process_time() - c0, 1)
    wanted = {dataset_name(a) for a in cfg.data}
    left_out = {(ds, i) for ds, ids in excluded.items() for i in ids}
    metrics = summarize([r for r in rows if r["dataset"] in wanted and r["modality"] in cfg.modalities
                         and (r["dataset"], r["id"]) not in left_out], cfg.backbone_text)
    metrics["model"] = cfg.model
    metrics["excluded_too_long"] = excluded
    metrics["seconds"] = timing
    metrics["cpu_seconds"] = cpu  # this process's CPU time over all its threads, per benchmark × modality
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _fixed_batches(backend, items, make_inputs, batch_size: int, max_new_tokens: int):
    """`generate_stream`'s contract with fixed batches: (item index, token ids, truncated)."""
    import torch

    for i in range(0, len(items), batch_size):
        with torch.no_grad():  # as in generate_stream: no graph of the audio encoding kept beside the batch
            inputs = make_inputs(items[i : i + batch_size])
        gen = backend.generate(inputs, temperature=0.0, max_new_tokens=max_new_tokens)
        for j, (ids, trunc) in enumerate(zip(gen.token_ids, gen.truncated)):
            yield i + j, ids, trunc


def format_table(metrics: dict) -> str:
    lines = ["| dataset | modality | n | accuracy % | chance % | unparseable % | format % |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for ds, d in metrics["datasets"].items():
        for mod in ("speech", "text", "cascade"):
            if mod in d:
                m = d[mod]
                lines.append(f"| {ds} | {mod} | {m['n']} | {m['accuracy']:.1f} | {m['chance']:.1f} | "
                             f"{m['unparseable']:.1f} | {m['format']:.1f} |")
        if "gap" in d:
            lines.append(f"| {ds} | gap (text − speech) | | {d['gap']:+.1f} | | | |")
    if "mrr" in metrics:
        lines.append(f"| average | MRR (speech / backbone text {metrics['backbone_text']:.1f}) | | "
                     f"{metrics['mrr']:.1f} | | | |")
    return "\n".join(lines)
