"""`tars analyze rewards`: how much each reward can steer a model, before any training run is spent on it.

GRPO only sees a reward's differences between the rollouts of one question: a per-question constant
cancels in `r − mean(r)`. So the question that decides whether R_rep or R_beh can move a model is not
their mean but (a) their spread within a group and (b) whether that spread points the way correctness
does. This samples G speech and G text rollouts per question from the model as it stands (the policy of
a first TARS step), scores them once with every decoder layer's pooled states, and reports for R_acc,
R_fmt, R_beh and R_rep under each pooling × layer set — each reward computed as the trainer computes it
(the same embedder, tag handling and layer groups, `TarsConfig`'s defaults unless given):

    mean            over speech rollouts of questions with a correct text reference
    spread          the mean within-group std (rl/advantages.py within_group_spread)
    corr. with R_acc  the Pearson correlation of the within-group-centred reward with the centred R_acc,
                    pooled over groups where both vary: > 0 means "closer to the text rollout" tends to
                    mean "right", the direction the reward would push

Read it on training questions, never on a held-out set you report: choosing a layer set by its test
accuracy is tuning on the test. Each question's groups go to `groups.jsonl` as they finish, so a
killed run resumes; `reward_signal.json` and `reward_signal.md` hold the summary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from tars.atomic import atomic_write_text
from tars.errors import UserError

POOLINGS = ("mean", "last")


def layer_sets(n_layers: int, groups: str = "paper") -> dict[str, list[int]]:
    """The layer sets compared: the paper's default (all), shallow / middle / deep as the trainer's
    `layer_groups` cuts them, and the last layer. A group the model has no layers for (the paper's
    11-20 of a 4-layer model) is left out, as the trainer would refuse it."""
    from tars.rewards.alignment import select_layers

    sets = {}
    for name in ("all", "shallow", "middle", "deep"):
        try:
            sets[name] = select_layers(name, n_layers, groups)
        except ValueError:
            continue
    return sets | {"last": [n_layers]}


#: What an analysis folder written before these settings existed was made with (its settings.json lacks
#: them): R_beh on tag-stripped text, equal-thirds layer groups, the packaged embedder.
EARLIER_SETTINGS = {"embedder": None, "beh_strip_tags": True, "layer_groups": "equal_thirds"}


def centred_correlation(x: Tensor, y: Tensor) -> float | None:
    """Pearson correlation of x and y [Q, G] after subtracting each row's mean, over the rows where both
    vary (a row where either is constant says nothing about direction). None when no row qualifies or
    the pooled values have no variance."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must be the same [groups, rollouts] shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    x, y = x.double(), y.double()
    rows = (x.std(1, correction=0) > 0) & (y.std(1, correction=0) > 0)
    if not rows.any():
        return None
    xc = (x[rows] - x[rows].mean(1, keepdim=True)).flatten()
    yc = (y[rows] - y[rows].mean(1, keepdim=True)).flatten()
    den = float(xc.norm() * yc.norm())
    return float((xc * yc).sum()) / den if den > 0 else None


def summarize(groups: Sequence[dict]) -> dict[str, dict]:
    """Per reward component: mean, within-group spread and centred correlation with R_acc, over the
    groups that had a correct text reference (only those get alignment rewards)."""
    from tars.rl.advantages import within_group_spread

    ref = [g for g in groups if g["reference"] is not None]
    if not ref:
        return {}
    acc = torch.tensor([g["acc"] for g in ref], dtype=torch.float64)
    comps = {"R_acc": acc, "R_fmt": torch.tensor([g["fmt"] for g in ref], dtype=torch.float64),
             "R_beh": torch.tensor([g["beh"] for g in ref], dtype=torch.float64)}
    for key in ref[0]["rep"]:
        comps[f"R_rep {key}"] = torch.tensor([g["rep"][key] for g in ref], dtype=torch.float64)
    out = {}
    for name, r in comps.items():
        corr = None if name == "R_acc" else centred_correlation(r, acc)
        out[name] = {"mean": float(r.mean()), "spread": within_group_spread(r), "corr_acc": corr}
    return out


def markdown(summary: dict[str, dict], n_groups: int, n_ref: int, model: str) -> str:
    lines = [f"Reward signal of `{model}`: {n_groups} questions, {n_ref} with a correct text reference.", "",
             "| reward | mean | within-group spread | corr. with R_acc (centred) |", "| --- | --- | --- | --- |"]
    for name, s in summary.items():
        corr = "–" if s["corr_acc"] is None else f"{s['corr_acc']:+.2f}"
        lines.append(f"| {name} | {s['mean']:.4f} | {s['spread']:.4f} | {corr} |")
    return "\n".join(lines) + "\n"


def run_reward_signal(model: str, data: str, out: str | Path, questions: int = 16, start: int = 0,
                      rollouts: int = 4, max_new_tokens: int = 160, temperature: float = 1.0, seed: int = 0,
                      batch_size: int = 4, progress: bool = True, embedder: str | None = None,
                      beh_strip_tags: bool = False, layer_groups: str = "paper") -> dict:
    """`embedder`, `beh_strip_tags`, `layer_groups`: as in `TarsConfig`, with its defaults, so that the
    rewards measured are the ones a run with that config would be given."""
    from tqdm import tqdm

    from tars.data.sources import DataConfig, load_data
    from tars.models.loading import load_backend
    from tars.rewards.accuracy import accuracy_reward
    from tars.rewards.alignment import (LAYER_GROUPS, SentenceEmbedder, behavior_reward, choose_references,
                                        representation_reward, resolve_embedder)
    from tars.rewards.format import format_score

    if questions < 1 or rollouts < 2 or start < 0:
        raise UserError("--questions must be ≥ 1, --rollouts ≥ 2 (a spread needs two) and --start ≥ 0")
    if layer_groups not in LAYER_GROUPS:
        raise UserError(f"--layer-groups {layer_groups}: must be one of {', '.join(LAYER_GROUPS)}")
    resolve_embedder(embedder)  # an embedder missing offline fails before the model loads
    out = Path(out)
    records, base_dir = load_data(DataConfig(file=data), "speech")
    records = records[start:start + questions]
    if not records:
        raise UserError(f"{data}: no question from --start {start}")
    log_file = out / "groups.jsonl"
    settings = {"model": model, "data": data, "rollouts": rollouts, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "seed": seed, "embedder": embedder, "beh_strip_tags": beh_strip_tags,
                "layer_groups": layer_groups}
    if (out / "settings.json").exists():  # resuming: the groups already there must be these settings'
        old = json.loads((out / "settings.json").read_text())
        old = EARLIER_SETTINGS | old
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            k = changed[0]
            raise UserError(f"{out} holds an analysis made with {k}={old.get(k)} (now {settings[k]}); "
                            "pass another --out, or remove that folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "settings.json", json.dumps(settings, indent=2) + "\n")
    done: dict[str, dict] = {}
    if log_file.exists():  # a kill can cut the last line in half: keep the whole ones, drop the rest
        kept = []
        for line in log_file.read_text().splitlines():
            try:
                g = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[g["id"]] = g
            kept.append(line)
        atomic_write_text(log_file, "".join(k + "\n" for k in kept))
    todo = [r for r in records if r.id not in done]
    backend = load_backend(model).eval() if todo else None
    if backend is not None:
        n_layers = len(backend.decoder_layers())
        sets = layer_sets(n_layers, layer_groups)
        sentence_embedder = SentenceEmbedder(embedder, device=backend.device)
        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="reward signal", unit="q",
                   disable=not progress)
        with open(log_file, "a") as f:
            for i in range(0, len(todo), batch_size):
                batch = todo[i:i + batch_size]
                G, every = rollouts, list(range(1, n_layers + 1))
                with torch.no_grad():
                    sp = backend.build_inputs(batch, "speech", base_dir=base_dir)
                    tx = backend.build_inputs(batch, "text")
                    seeds = [[hash_seed(seed, m, r.id, g) for r in batch for g in range(G)] for m in ("speech", "text")]
                    s, t = backend.generate_paired([(sp, G, seeds[0]), (tx, G, seeds[1])], temperature, 1.0,
                                                   max_new_tokens)
                    idx = [q for q in range(len(batch)) for _ in range(G)]
                    ps = backend.score(sp, s.token_ids, idx, every).pooled
                    pt = backend.score(tx, t.token_ids, idx, every).pooled
                    emb = sentence_embedder.embed_completions(s.texts + t.texts, beh_strip_tags).float().cpu()
                opts = [r.options for r in batch for _ in range(G)]
                answers = [r.answer for r in batch for _ in range(G)]
                acc_s, acc_t = accuracy_reward(s.texts, opts, answers), accuracy_reward(t.texts, opts, answers)
                for q, rec in enumerate(batch):
                    rows = slice(q * G, (q + 1) * G)
                    refs = choose_references([a == 1 for a in acc_t[rows]], G, "random",
                                             random.Random(hash_seed(seed, "reference", rec.id, 0)))
                    g = {"id": rec.id, "acc": acc_s[rows], "fmt": [format_score(x, "binary") for x in s.texts[rows]],
                         "text_acc": acc_t[rows], "reference": refs if refs[0] is not None else None,
                         "rep": {}, "beh": [0.0] * G}
                    if refs[0] is not None:
                        ref_rows = [q * G + r for r in refs]
                        for pooling in POOLINGS:
                            for name, layers in sets.items():
                                cols = [j - 1 for j in layers]
                                rep = representation_reward(ps[pooling][rows][:, cols], pt[pooling][ref_rows][:, cols])
                                g["rep"][f"{pooling} / {name}"] = rep.tolist()
                        g["beh"] = behavior_reward(emb[rows], emb[len(s.texts):][ref_rows]).tolist()
                    f.write(json.dumps(g) + "\n")
                    f.flush()
                    done[rec.id] = g
                    bar.update(1)
        bar.close()
    groups = [done[r.id] for r in records]
    summary = summarize(groups)
    n_ref = sum(g["reference"] is not None for g in groups)
    result = settings | {"start": start, "questions": len(groups), "with_reference": n_ref, "rewards": summary}
    atomic_write_text(out / "reward_signal.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "reward_signal.md", markdown(summary, len(groups), n_ref, model))
    return result


def hash_seed(seed: int, *parts) -> int:
    """A sampling seed from the run's seed and a row's name, the same on every machine and run."""
    import hashlib

    return int.from_bytes(hashlib.sha256(repr((seed, *parts)).encode()).digest()[:4], "little")
