"""A cache of large CPU buffers, reused from one training step to the next without page faults.

The MoE layer's largest tensors - the (k * tokens, ffn) expert hidden activations and their
gradients, the (E, in, out) expert-weight gradients, the dispatched rows - are hundreds of MiB each.
glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it on free, so every
step page-faults all of them in again: ~0.25 ms per MiB on a typical x86 VM, which for 32 experts is
~600 MiB of weight gradients alone and added a quarter to the layer's time. PyTorch's CUDA allocator
caches freed blocks; its CPU allocator does not. This module does it for the buffers the MoE kernels
allocate themselves (nothing else in the process is affected, unlike a global ``mallopt``).

How it stays safe: the pool owns storages; :func:`empty` hands out a tensor viewing a cached storage
only if nobody else references that storage any more (its use count is the pool's own reference).
A buffer saved for backward, held as ``param.grad`` or kept by the caller is therefore never reused
while alive - reuse happens exactly where the memory would otherwise have been freed.

What it costs: the pool keeps up to :func:`limit` bytes (default ``min(8 GiB, RAM / 4)``; set with
:func:`set_limit` or ``VLMOE_WORKSPACE_MB``; ``0`` disables it) allocated between steps, the same
trade the CUDA caching allocator makes. :func:`release` returns everything not in use;
:func:`stats` reports what is held.
"""

from __future__ import annotations

import os
import threading

import torch
from torch import Tensor

_MIN_BYTES = 1 << 20  # smaller buffers come from malloc's heap, which already reuses them
_SLACK = 2.0  # a cached storage serves requests down to 1/_SLACK of its size
_ALIGN = 1 << 16

_lock = threading.Lock()
_storages: list[torch.UntypedStorage] = []  # owned by the pool, most recently used last
_limit: int | None = None
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _default_limit() -> int:
    env = os.environ.get("VLMOE_WORKSPACE_MB")
    if env is not None:
        try:
            return max(0, int(env)) << 20
        except ValueError:
            raise ValueError(f"VLMOE_WORKSPACE_MB={env!r} is not an integer number of MiB") from None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 << 30
    return min(8 << 30, ram // 4)


def limit() -> int:
    """Most bytes the pool may hold (in use + cached)."""
    global _limit
    if _limit is None:
        _limit = _default_limit()
    return _limit


def set_limit(nbytes: int) -> None:
    """Set the most bytes the pool may hold; ``0`` disables caching (and releases the cache)."""
    global _limit
    if nbytes < 0:
        raise ValueError(f"workspace limit must be >= 0 bytes, got {nbytes}")
    _limit = int(nbytes)
    if _limit == 0:
        release()


def _free(s: torch.UntypedStorage) -> bool:
    return _use_count(s._cdata) == 1


def release() -> int:
    """Drop every cached storage nobody uses; returns the bytes released."""
    with _lock:
        keep = [s for s in _storages if not _free(s)]
        freed = sum(s.nbytes() for s in _storages) - sum(s.nbytes() for s in keep)
        _storages[:] = keep
    return freed


def stats() -> dict[str, int]:
    """``held`` (all cached bytes), ``in_use`` (referenced outside the pool), ``buffers``."""
    with _lock:
        held = sum(s.nbytes() for s in _storages)
        in_use = sum(s.nbytes() for s in _storages if not _free(s))
        return {"held": held, "in_use": in_use, "buffers": len(_storages)}


def _enabled(device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and _use_count is not None
        and limit() > 0
        and not torch.compiler.is_compiling()
    )


def empty(shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor, from the pool when it is a large CPU buffer."""
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size() if numel else 0
    if nbytes < _MIN_BYTES or not _enabled(torch.device(device)):
        return torch.empty(shape, dtype=dtype, device=device)
    storage = _take(nbytes)
    if storage is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape)


def empty_like(t: Tensor) -> Tensor:
    """An uninitialised tensor of ``t``'s shape and memory layout (its strides, where ``t`` is dense: a gradient
    buffer of a weight stored transposed must have the weight's strides, or autograd copies it into them)."""
    if t.is_contiguous():
        return empty(t.shape, dtype=t.dtype, device=t.device)
    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))  # dims from outermost to innermost
    if not t.permute(order).is_contiguous():  # not a permutation of a dense tensor: row-major
        return empty(t.shape, dtype=t.dtype, device=t.device)
    buf = empty(tuple(t.shape[i] for i in order), dtype=t.dtype, device=t.device)
    return buf.permute(tuple(order.index(i) for i in range(t.dim())))  # storage-order dims -> t.shape, with t's strides


def _take(nbytes: int) -> torch.UntypedStorage | None:
    with _lock:
        best, best_i = None, -1
        for i, s in enumerate(_storages):  # best fit among the free storages that are large enough
            n = s.nbytes()
            if nbytes <= n <= nbytes * _SLACK + _ALIGN and (best is None or n < best.nbytes()) and _free(s):
                best, best_i = s, i
        if best is not None:
            _storages.append(_storages.pop(best_i))
            return best
        size = -(-nbytes // _ALIGN) * _ALIGN
        cap = limit()
        held = sum(s.nbytes() for s in _storages)
        i = 0
        while held + size > cap and i < len(_storages):  # evict free storages, least recently used first
            if _free(_storages[i]):
                held -= _storages.pop(i).nbytes()
            else:
                i += 1
        if held + size > cap:
            return None  # the pool is full of buffers in use: a plain allocation
        s = torch.UntypedStorage(size)
        _storages.append(s)
        return s
