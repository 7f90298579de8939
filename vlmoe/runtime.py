"""Process-level runtime settings for CPU training.

``reuse_freed_memory()``: glibc serves every allocation above 32 MiB with a fresh ``mmap`` and
returns it to the kernel on free, so each training step page-faults its large buffers in again
(activations, and for MoE layers the (E, d, h) expert-weight gradients: ~600 MiB per step for 32
experts at d=768). Disabling mmap-served allocations and heap trimming makes freed memory reusable by
the next step without faults. The process keeps its peak memory instead of returning it between steps.
The MoE layers' own buffers do not need this (they are cached by :mod:`vlmoe.moe.workspace`); it
still helps every other large allocation (attention activations, dense FFNs, optimizer temporaries).

Opt-in (call it, or set ``VLMOE_MALLOC_TUNING=1`` for the commands that honour it): it suits a training
loop whose allocations repeat step after step (RSS stays flat: ``vlmoe pretrain`` of ``base_moe8`` on the
demo data, batch 12, held 18.1 GB from its 5th step to its 12th, against 15.5 GB untuned, for 3 s -> 0.1 s
of kernel time per step and no wall-time gain beyond that VM's noise - hence not the default), but a
process that mixes very different allocation patterns can fragment the never-trimmed heap - one
benchmark process running the peers' multi-GB one-hot dispatch tensors after our layers grew to the
machine's 23 GiB and was killed. A no-op off glibc (macOS, Windows, musl), and with ``VLMOE_MALLOC_TUNING=0``.

``request_huge_pages()`` (the ``vlmoe`` command calls it first thing): PyTorch's CPU allocator puts
each tensor of >= 2 MiB on transparent huge pages when ``THP_MEM_ALLOC_ENABLE=1``, so every activation
and gradient a training step allocates afresh costs one page fault per 2 MiB instead of one per 4 KiB
(the kernel's THP mode must be ``madvise`` or ``always``). PyTorch reads the variable once, at its first
large allocation: in your own script set it in the environment, or call this before creating tensors.
On this project's 2-core benchmark VM (THP ``madvise``): zero-filling a 197 MB tensor (the text
embedding's gradient, once per step) 56 -> 12 ms; the kernel (sys) time of a dense base model's
training step 0.8-2.8 s -> 0.02-1.0 s. Unlike the malloc tuning it changes no reuse policy: freed memory
still goes back to the kernel. ``THP_MEM_ALLOC_ENABLE=0`` keeps 4 KiB pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def malloc_tuning_requested() -> bool:
    """``VLMOE_MALLOC_TUNING=1`` in the environment."""
    return os.environ.get("VLMOE_MALLOC_TUNING", "0") == "1"


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


def request_huge_pages() -> bool:
    """``THP_MEM_ALLOC_ENABLE=1`` unless the environment already sets it. Returns whether it is on.

    Takes effect only before PyTorch's first large CPU allocation in this process (see the module notes)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return huge_pages_requested()


def huge_pages_requested() -> bool:
    """Whether ``THP_MEM_ALLOC_ENABLE`` asks PyTorch for huge pages."""
    return os.environ.get("THP_MEM_ALLOC_ENABLE", "0") not in ("", "0")


def set_cpu_threads(processes: int = 1, data_workers: int = 0) -> int:
    """On CPU, leave one core per DataLoader worker (and per training process on the machine).

    PyTorch's intra-op threads busy-wait; with more threads than free cores (data workers, other
    ranks) every small GEMM waits for a descheduled thread, which was measured to slow the demo run
    about 4x on 2 cores. An explicit ``OMP_NUM_THREADS`` wins, and the thread count is only lowered.

    Returns:
        The thread count now in use.
    """
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, processes) - max(0, data_workers))
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()
