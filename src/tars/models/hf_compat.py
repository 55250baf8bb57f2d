"""What differs between the transformers releases tars supports (pyproject: >=5.17, <5.25), in one place.

Everything here detects the feature, not the version string, so a release in the range behaves as its
own API says. So far:

- the KV cache: from transformers 5.24 a decoder's cache argument and output field are `cache`; before,
  both are `past_key_values` (5.24 still takes the old name, with a deprecation warning).
  `kv_cache(out)` reads it from a forward's output, `cache_kwargs(cache)` passes it back in.

The other differences live with the code they touch: Qwen2.5-Omni's module layout
(`qwen2_5_omni.thinker_parts`) and the GGUF tokenizer's special tokens (`convert.gguf_llama`).
"""

from __future__ import annotations

import functools


@functools.cache
def cache_name() -> str:
    """`cache` where transformers' model outputs carry the KV cache under that name, else `past_key_values`."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def kv_cache(out):
    """The KV cache a decoder forward (`use_cache=True`) returned."""
    return getattr(out, cache_name())


def cache_kwargs(cache) -> dict:
    """The keyword argument that hands `cache` to a decoder forward: `dec(..., **cache_kwargs(cache))`."""
    return {cache_name(): cache}
