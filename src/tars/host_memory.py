"""Freed tensor memory back to the operating system at once, so a CPU process's RSS follows the
tensors it holds rather than the largest heap it ever needed.

glibc's malloc serves a request below its mmap threshold from its heap and one above it with its own
mmap, unmapped on free. The threshold starts at 128 KiB and rises to the size of every mmapped block
freed, up to 32 MiB, so after the first forward almost every activation of the mini model (1–30 MB)
comes from the heap; the heap is given back only from its top, and blocks kept across layers
(checkpointed blocks' inputs, the KV cache) pin everything below them. Measured on the mini model
(docs/performance.md, "Peak memory of a training step"): a checkpointed step peaked at 6.1 GB RSS with
glibc's default and at 1.9 GB with the threshold fixed at 1 MiB. The price is a page fault per fresh
page of every large tensor: that step ran 1.38× as long, which is why this is a switch
(`release_memory`) and not the default. `peak_rss_gb` reads the peak that such limits are about.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: mallopt's parameter number for the mmap threshold (glibc malloc.h).
M_MMAP_THRESHOLD = -3
#: The threshold `release_freed_memory` sets: blocks of 1 MiB and more are mapped and unmapped on
#: their own.
THRESHOLD_BYTES = 1 << 20


def release_freed_memory(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for the rest of the process (it also stops the
    threshold's rise). Returns whether it took effect: False off glibc (macOS, musl) and when the
    user already chose one with `MALLOC_MMAP_THRESHOLD_`, which wins."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))


def peak_rss_gb() -> float | None:
    """This process's largest resident set so far (not its children's), in the unit docs/ read GNU
    time's "Maximum resident set size (kbytes)" in: that figure / 10^6, so the demo's log and the
    documented peaks compare directly. None where the OS does not say (no `resource` module: Windows)."""
    try:
        import resource
    except ImportError:
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 1024 / 1e6 if sys.platform == "darwin" else peak / 1e6
