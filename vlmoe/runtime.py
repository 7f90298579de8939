"""Process-level runtime settings for CPU training.

``reuse_freed_memory()``: glibc serves every allocation above 32 MiB with a fresh ``mmap`` and
returns it to the kernel on free, so each training step page-faults its large buffers in again
(activations, and for MoE layers the (E, d, h) expert-weight gradients: ~600 MiB per step for 32
experts at d=768). Disabling mmap-served allocations and heap trimming makes freed memory reusable by
the next step without faults. The process keeps its peak memory instead of returning it between steps,
which is what a training process wants anyway. Set ``VLMOE_MALLOC_TUNING=0`` to opt out; a no-op off
glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def reuse_freed_memory() -> bool:
    """Tune glibc malloc so freed large blocks are reused without page faults. Returns True if applied."""
    global _done
    if _done:
        return True
    if os.environ.get("VLMOE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _done = ok
    return ok
