"""Key / value cache for incremental decoding (BEiT-3's ``incremental_state``).

Each attention layer of the backbone gets a :class:`LayerKV`: preallocated key and value buffers
``(B, H, capacity, head_dim)`` filled left to right, of which the first ``length`` positions are valid.
A decoding step feeds only its new tokens; every layer appends their keys / values and attends over
the valid prefix. :class:`KVCache` holds one per block and the three edits a decoder needs:

- :meth:`KVCache.truncate` drops the last positions (BEiT-3's captioning decoder drops the ``[MASK]``
  slot it predicted from after each step);
- :meth:`KVCache.reorder` makes the rows follow the surviving beams (``index_select`` on the batch),
  from a start position on: the image's keys are the same for every beam of an image and are never
  copied;
- :meth:`KVCache.select` picks rows, any number (one row per image becomes ``num_beams`` rows after
  the image has been encoded once).

The buffers grow geometrically when a step would overflow them; ``reserve`` extra positions are
allocated up front so a decoder that knows its maximum length never reallocates.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache", "LayerKV"]


class LayerKV:
    """One layer's keys and values, ``(B, H, length, head_dim)`` valid out of ``capacity``."""

    def __init__(self, reserve: int = 0) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0
        self.reserve = reserve

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``(B, H, n, hd)`` keys / values; return every valid key / value (views of the buffers)."""
        end = self.length + k.shape[2]
        if self.k is not None and (k.shape[0] != self.k.shape[0] or k.shape[1] != self.k.shape[1]):
            raise ValueError(
                f"KV cache holds {self.k.shape[0]} rows x {self.k.shape[1]} heads; the new keys have shape "
                f"{tuple(k.shape)} (reorder or repeat_interleave the cache when the batch changes)"
            )
        if self.k is None or end > self.k.shape[2]:
            capacity = end + self.reserve if self.k is None else max(end, 2 * self.k.shape[2])
            self.k, self.v = (self._grow(buf, src, capacity) for buf, src in ((self.k, k), (self.v, v)))
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def _grow(self, buf: Tensor | None, like: Tensor, capacity: int) -> Tensor:
        B, H, _, hd = like.shape
        new = like.new_empty(B, H, capacity, hd)
        if buf is not None and self.length:
            new[:, :, : self.length] = buf[:, :, : self.length]
        return new


class KVCache:
    """The key / value caches of every attention layer of a backbone.

    Args:
        num_layers: blocks of the backbone (``len(model.blocks)``).
        reserve: positions to allocate beyond the first step's tokens (the decoder's maximum length).
    """

    def __init__(self, num_layers: int, reserve: int = 0) -> None:
        self.layers = [LayerKV(reserve) for _ in range(num_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    @property
    def length(self) -> int:
        """Valid positions (the same in every layer between forwards)."""
        return self.layers[0].length

    @property
    def batch_size(self) -> int:
        k = self.layers[0].k
        return 0 if k is None else k.shape[0]

    def truncate(self, n: int) -> None:
        """Forget the last ``n`` positions of every layer."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot drop {n} positions from a KV cache of length {self.length}")
        for layer in self.layers:
            layer.length -= n

    @torch.no_grad()
    def reorder(self, index: Tensor, start: int = 0) -> None:
        """Rows follow ``index`` (row ``i`` becomes old row ``index[i]``) at positions ``start:``, in place.

        The positions before ``start`` are left as they are: the caller guarantees they are equal in a
        row and the row it takes from (beams of one image share the image's keys).
        """
        if self.batch_size and index.numel() != self.batch_size:
            raise ValueError(f"reorder keeps the {self.batch_size} rows; got an index of {index.numel()} (use select)")
        for layer in self.layers:
            if layer.k is None or layer.length <= start:
                continue
            for buf in (layer.k, layer.v):
                buf[:, :, start : layer.length] = buf[index, :, start : layer.length]

    @torch.no_grad()
    def select(self, index: Tensor) -> None:
        """Keep rows ``index`` (any number, repeats allowed), whole buffers: row ``i`` = old row ``index[i]``."""
        for layer in self.layers:
            if layer.k is not None:
                layer.k = layer.k.index_select(0, index)
                layer.v = layer.v.index_select(0, index)
