"""Loading a Speech LLM from a folder (or hub id where a hub is reachable), with one-line errors.

`load_backend(path)` reads `config.json`, picks the backend by `model_type`, and loads weights and
tokenizer. User mistakes (no such folder, no config, a corrupt weight file, an architecture tars does not
know) raise `UserError`s naming the path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tars.errors import UserError
from tars.quiet import hf_progress_off

#: model_type in config.json → backend class path.
BACKENDS = {
    "qwen2_audio": "tars.models.qwen2_audio:Qwen2AudioBackend",
    "qwen2_5_omni": "tars.models.qwen2_5_omni:Qwen25OmniBackend",
    "qwen2_5_omni_thinker": "tars.models.qwen2_5_omni:Qwen25OmniBackend",
    "phi4_multimodal": "tars.models.phi4_mm:Phi4MMBackend",
}


def read_config(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"{path}: model folder not found")
    cfg = path / "config.json"
    if not cfg.exists():
        raise UserError(f"{path}: no config.json (expected a model folder saved with save_pretrained)")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg}: not valid JSON ({e})") from None


def require_architecture(path: Path, config: dict, *model_types: str) -> None:
    mt = config.get("model_type")
    if mt not in model_types:
        raise UserError(
            f"{path / 'config.json'}: model_type {mt!r} is not {' or '.join(model_types)}"
        )


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: could not load the tokenizer ({str(e).splitlines()[0][:200]})") from None


def load_backend(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 cache_dir: Path | None = None):
    """The backend for the model folder `path`, chosen by its config's `model_type`; for an adapter
    folder (`tars_adapter.json`), its base model's with the LoRA merged."""
    return load_local_backend(local_model(path), device, dtype, cache_dir)


@hf_progress_off()  # tars's own lines and bars only (tars.quiet)
def load_local_backend(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       cache_dir: Path | None = None):
    """`load_backend` of a path `local_model` has already given (a shipped stage's pack is hashed to
    check it, which need not happen twice for one load)."""
    import importlib

    from tars.models.lora import is_adapter, load_adapter

    if is_adapter(path):  # a LoRA adapter folder (models/lora.py): its base model, the LoRA merged in
        return load_adapter(path, device=device, dtype=dtype, merge=True, cache_dir=cache_dir)
    if not path.exists() and looks_like_hub_id(str(path)):
        path = hub_snapshot(str(path))
    mt = read_config(path).get("model_type")
    if mt not in BACKENDS:
        raise UserError(
            f"{path / 'config.json'}: unknown architecture {mt!r}; tars supports {', '.join(sorted(BACKENDS))}"
        )
    module, cls = BACKENDS[mt].split(":")
    return getattr(importlib.import_module(module), cls).from_pretrained(path, device=device, dtype=dtype,
                                                                        cache_dir=cache_dir)


def local_model(path: str | Path) -> Path:
    """`path` as a folder (`mini:NAME` → its place under $TARS_HOME), a mini stage or adapter shipped with
    tars unpacked there first when it is one, so every command that takes a model takes those names on a
    fresh machine."""
    from tars.models.mini import (SHIPPED_ADAPTERS, SHIPPED_STAGES, custom_stage, mini_dir, shipped_adapter,
                                  shipped_stage)
    from tars.paths import resolve

    path = resolve(path)
    for name in SHIPPED_STAGES:  # mini:demo and mini:soft need nothing but the packs shipped with tars
        if path == mini_dir(name) and not custom_stage(name):  # made when missing or stale
            shipped_stage(name, keep_custom=True)
    for name in SHIPPED_ADAPTERS:
        if path == mini_dir(name):
            shipped_adapter(name)
    return path


def looks_like_hub_id(name: str) -> bool:
    """`org/name` with no path-like parts: what the Hugging Face hub calls a repo id."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub model (downloaded once into the Hugging Face cache, or found there)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as e:  # offline, unknown repo, gated: all mean "not available here"
        raise UserError(f"{repo_id}: not a local folder, and the Hugging Face hub could not provide it "
                        f"({type(e).__name__}; offline? pass the path of a downloaded copy instead)") from None
