"""LoRA on a Speech LLM's decoder: injecting it, toggling it, merging it, and saving / loading it as a
small adapter folder that any tars command can take in place of a model folder.

An adapter folder holds `adapter_model.safetensors` (the LoRA weights under decoder-relative names,
float32) and `tars_adapter.json` (the base model, r / α / dropout, the adapted layers, how it was
trained). `load_backend` (models/loading.py) loads such a folder as its base model with the LoRA merged,
so `tars eval --model runs/x/adapter` works like `--model runs/x/model` without the merged copy's disk.
"""

from __future__ import annotations

import functools
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from pydantic import Field
from torch import Tensor

from tars.atomic import atomic_dir
from tars.config import Config
from tars.errors import UserError
from tars.paths import resolve

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "tars_adapter.json"


class LoraSettings(Config):
    """LoRA on the LLM's linear layers (paper: r 8, α 32, dropout 0.05, all attention and MLP
    projections). `target_modules` are module names matched against the decoder blocks' linear layers;
    names a model lacks are ignored, so one list serves Qwen (q/k/v/o, gate/up/down) and Phi-4 (fused
    `qkv_proj`, `gate_up_proj`)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                 "qkv_proj", "gate_up_proj"]


_LORA_PARAM = re.compile(r"(.+)\.lora_([AB])\.default\.weight")


def lora_targets(backend, names: Sequence[str]) -> list[str]:
    """Decoder-relative names of the linear layers inside the decoder blocks whose own name is in
    `names`: only the LLM's blocks, never an encoder or vision tower a decoder module may also hold."""
    in_blocks = {id(m) for m in backend.decoder_layers().modules()}
    wanted = set(names)
    return [n for n, m in backend.decoder().named_modules()
            if id(m) in in_blocks and isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in wanted]


def add_lora(backend, lora: LoraSettings, targets: Sequence[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """Freeze the whole model and inject trainable LoRA layers (peft) into the decoder, in place, so
    `backend.decoder()` and `lm_head()` keep working unchanged. Returns the LoRA parameters by their
    adapter-free names (`layers.0.self_attn.q_proj.lora_A.weight`), kept in float32 whatever the
    model's dtype (Adam on bf16 weights loses the small updates)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    for p in backend.parameters():
        p.requires_grad_(False)
    targets = list(targets) if targets is not None else lora_targets(backend, lora.target_modules)
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in backend.decoder_layers().named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise UserError(f"lora.target_modules {lora.target_modules} match no linear layer of the decoder "
                        f"blocks (they have: {', '.join(linear)})")
    inject_adapter_in_model(PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                           target_modules=targets), backend.decoder())
    params = lora_parameters(backend)
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    # peft casts each adapted layer's INPUT to the adapter's dtype: under a bf16 model that is a float32
    # copy of every [tokens × hidden] activation entering q/k/v/o/gate/up/down, kept for the backward.
    # Instead the adapter's small weights are cast to the activations' dtype in each matmul; the
    # float32 parameters stay the optimizer's master weights (the cast's backward hands them float32
    # gradients, accumulated in float32 across micro-batches). A float32 model is unchanged.
    for module in _tuner_layers(backend):
        module.cast_input_dtype_enabled = False
        for linear in (*module.lora_A.values(), *module.lora_B.values()):
            linear.forward = functools.partial(_linear_in_input_dtype, linear)
    return params


def _linear_in_input_dtype(linear: torch.nn.Linear, x: Tensor) -> Tensor:
    weight = linear.weight if linear.weight.dtype == x.dtype else linear.weight.to(x.dtype)
    bias = None if linear.bias is None else linear.bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def lora_parameters(backend) -> dict[str, torch.nn.Parameter]:
    out = {}
    for name, p in backend.decoder().named_parameters():
        m = _LORA_PARAM.fullmatch(name)
        if m:
            out[f"{m.group(1)}.lora_{m.group(2)}.weight"] = p
    return out


def _tuner_layers(backend) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in backend.decoder().modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(backend) -> Iterator[None]:
    """The base model without its LoRA (β > 0's reference policy): toggled in place, no second copy.
    peft's toggle also flips `requires_grad`, so use it only around no-grad forwards."""
    layers = _tuner_layers(backend)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def merge_lora(backend) -> None:
    """Fold the LoRA into the linear weights and restore the plain modules: the model then saves,
    loads and runs like any checkpoint of its architecture (`tars eval --model out/model`)."""
    dec = backend.decoder()
    tuners = {id(m) for m in _tuner_layers(backend)}
    for name, module in [(n, m) for n, m in dec.named_modules() if id(m) in tuners]:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(dec.get_submodule(parent) if parent else dec, child, module.get_base_layer())
    dec.__dict__.pop("peft_config", None)


def save_adapter(backend, folder: Path, base_model: str, lora: LoraSettings, steps: int, method: str) -> None:
    """The LoRA weights (safetensors, decoder-relative names) and a small json naming the base model
    both as given (`mini:soft`, a hub id) and as the folder it resolved to on this machine."""
    from safetensors.torch import save_file

    params = lora_parameters(backend)
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in params})
    meta = {"format": "tars-lora", "base_model": base_model, "base_model_path": str(resolve(base_model).resolve()),
            "r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": targets,
            "method": method, "steps": steps}
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base(meta: dict) -> str | Path:
    """An adapter's base model from its json: the path it had when the adapter was saved while that
    still exists, else its given name (a shipped adapter has only that)."""
    base = Path(meta.get("base_model_path") or meta["base_model"])
    return base if base.exists() else meta["base_model"]


def read_adapter_meta(folder: str | Path) -> dict:
    """`folder`'s adapter json, a one-line error when it is not valid JSON."""
    meta_file = Path(folder) / ADAPTER_CONFIG
    try:
        return json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_file}: not valid JSON ({e})") from None


def load_adapter(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 merge: bool = False, cache_dir: Path | None = None):
    """The base model named by `folder`'s json with the trained LoRA attached: unmerged to go on
    training it (a resumed run), merged to evaluate it at the base model's speed. The base is found at
    the path it had when the adapter was saved, else by its given name (a shipped adapter has only that)."""
    from safetensors.torch import load_file

    from tars.models.loading import load_local_backend, local_model, looks_like_hub_id

    folder = Path(folder)
    meta_file = folder / ADAPTER_CONFIG
    if not meta_file.exists():
        raise UserError(f"{folder}: no {ADAPTER_CONFIG} (expected the `adapter` folder of a tars RL run)")
    meta = read_adapter_meta(folder)
    try:
        r, alpha, dropout, targets = meta["r"], meta["alpha"], meta["dropout"], meta["target_modules"]
        base = adapter_base(meta)
    except KeyError as e:
        raise UserError(f"{meta_file}: missing field {e}") from None
    base = local_model(base)
    if not base.exists() and not looks_like_hub_id(str(base)):
        raise UserError(f"{meta_file}: its base model {meta['base_model']} is not on this machine (saved at "
                        f"{meta.get('base_model_path', meta['base_model'])}); put it there, or edit base_model to its path")
    backend = load_local_backend(base, device=device, dtype=dtype, cache_dir=cache_dir)
    params = add_lora(backend, LoraSettings(r=r, alpha=alpha, dropout=dropout), targets)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        raise UserError(f"{weights}: adapter weights not found")
    state = load_file(str(weights))
    if set(state) != set(params):
        raise UserError(f"{weights}: adapter weights do not match the base model's layers")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])
    if merge:
        merge_lora(backend)
    return backend.eval()


def export_adapter(run: str | Path, out: str | Path, command: str) -> Path:
    """An RL run's adapter as a self-contained folder to ship or share: the base model by its given
    name only (the resolved path was this machine's), and in `provenance` how it was made: the command,
    the run's whole config, the tars commit at export (the run may have begun at an earlier one) and,
    when the run was evaluated (`RUN/eval`, the mini table's layout), what it measured."""
    import shutil
    import subprocess

    import yaml

    run, out = Path(run), Path(out)
    adapter = run / "adapter"
    if not (adapter / ADAPTER_CONFIG).exists() or not (adapter / ADAPTER_WEIGHTS).exists():
        raise UserError(f"{adapter}: no finished adapter (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                        "from a completed tars RL run)")
    meta = json.loads((adapter / ADAPTER_CONFIG).read_text())
    meta.pop("base_model_path", None)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else None
    meta["provenance"] = {"command": command, "config": config, "tars_commit_at_export": commit}
    if (run / "eval" / "metrics.json").exists():
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        meta["provenance"]["evaluation"] = {"datasets": {
            d: {m: {"accuracy": v["accuracy"], "n": v["n"]} for m, v in mods.items()
                if isinstance(v, dict) and "accuracy" in v}
            for d, mods in metrics["datasets"].items()}}
    with atomic_dir(out) as tmp:
        shutil.copyfile(adapter / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out
