"""Masking for masked data modeling: block-wise image-patch masks (MIM) and BERT-style text masks (MLM).

- :class:`BlockMaskingGenerator` follows BEiT v2's ``MaskingGenerator``: rectangles of random area in
  ``[min_num_patches, remaining]`` and log-uniform aspect ratio are placed at random until the target
  count is reached (at most 10 tries per block), then the count is made *exact* by unmasking or
  masking random extra patches. BEiT-3 masks 40% of 14 x 14 patches (``num_masking_patches = 78``).
- :func:`mlm_mask` picks ``round(ratio * n)`` of each row's ``n`` maskable tokens (at least one),
  never special tokens or padding, and replaces 80% of them by the mask id, 10% by a random
  regular token and keeps 10%; labels are the original ids there and ``-100`` elsewhere.
  Vectorised over the batch.
- :func:`caption_mask` is BEiT-3's captioning masking (``CaptioningDataset._masking_on_text_tokens``):
  of a caption's ``n`` tokens (bos and eos included) ``min(max(int(n * prob + 0.5), 1), n - 1)`` are
  chosen uniformly among positions ``1 .. n-1`` (never the bos, the eos may be chosen: that is how
  the model learns to stop), replaced 80 / 10 / 10 like MLM.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "BlockMaskingGenerator", "caption_mask", "mlm_mask", "worker_rng"]

IGNORE_INDEX = -100  # label value of positions the loss skips (torch's CrossEntropyLoss default)

_rng_cache: dict[str, tuple[int, np.random.Generator]] = {}


def worker_rng() -> np.random.Generator:
    """A numpy Generator that differs per DataLoader worker and per run.

    NumPy's global state is copied unchanged into forked workers, so every worker would draw the
    same masks. ``torch.initial_seed()`` is distinct per worker (DataLoader seeds each one), so the
    generator is seeded from it, once per process.
    """
    pid = os.getpid()
    cached = _rng_cache.get("rng")
    if cached is None or cached[0] != pid:
        cached = (pid, np.random.default_rng(torch.initial_seed() % 2**63))
        _rng_cache["rng"] = cached
    return cached[1]


class BlockMaskingGenerator:
    """Block-wise patch masking with an exact masked count (BEiT v2 semantics).

    Args:
        input_size: the patch grid, ``(H, W)`` or ``H`` for a square grid (14 for 224 px / patch 16).
        num_masking_patches: patches to mask; default ``floor(mask_ratio * H * W)``.
        mask_ratio: used when ``num_masking_patches`` is None (BEiT-3: 0.4).
        min_num_patches: smallest block area tried (BEiT v2: 16).
        max_num_patches: largest block area tried; default ``num_masking_patches``.
        min_aspect: smallest block aspect ratio h / w; the largest is ``max_aspect`` or its inverse.
        max_aspect: default ``1 / min_aspect``.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 14,
        num_masking_patches: int | None = None,
        mask_ratio: float = 0.4,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.num_patches = self.height * self.width
        if num_masking_patches is None:
            if not 0.0 <= mask_ratio <= 1.0:
                raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
            num_masking_patches = int(mask_ratio * self.num_patches)
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(f"num_masking_patches={num_masking_patches} outside [0, {self.num_patches}]")
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"BlockMaskingGenerator(grid={self.height}x{self.width}, masked={self.num_masking_patches}, "
            f"block_area=[{self.min_num_patches}, {self.max_num_patches}], "
            f"aspect=[{math.exp(self.log_aspect_ratio[0]):.3f}, {math.exp(self.log_aspect_ratio[1]):.3f}])"
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _place_block(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        """Try up to 10 random blocks; mask the first that adds 1..max_mask_patches new patches.

        Returns:
            The number of newly masked patches (0 if all 10 tries failed).
        """
        # Draw everything the 10 tries need at once (one generator call instead of ~30 scalar
        # ones); only the acceptance test depends on the mask. Column 0: area, 1: log aspect,
        # 2 and 3: top and left positions as fractions of the free range.
        u = rng.random((10, 4))
        lo = self.min_num_patches
        # a + (b - a) * U like Python's random.uniform: also valid when the budget b < min area a.
        areas = lo + (max_mask_patches - lo) * u[:, 0]
        log_lo, log_hi = self.log_aspect_ratio
        aspects = np.exp(log_lo + (log_hi - log_lo) * u[:, 1])
        hs = np.rint(np.sqrt(areas * aspects)).astype(np.int64).tolist()
        ws = np.rint(np.sqrt(areas / aspects)).astype(np.int64).tolist()
        fracs = u[:, 2:].tolist()
        for h, w, (ft, fl) in zip(hs, ws, fracs):
            # Strict "<" as in BEiT: a block never spans the whole grid side.
            if w < self.width and h < self.height:
                top = int(ft * (self.height - h + 1))  # uniform in [0, H - h]
                left = int(fl * (self.width - w + 1))
                window = mask[top : top + h, left : left + w]  # a view: writes go into `mask`
                new = h * w - int(window.sum())
                if 0 < new <= max_mask_patches:
                    window[...] = True
                    return new
        return 0

    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """One mask.

        Args:
            rng: random generator; default :func:`worker_rng`.

        Returns:
            A ``(H, W)`` bool array with exactly ``num_masking_patches`` True entries.
        """
        rng = worker_rng() if rng is None else rng
        mask = np.zeros(self.shape, dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._place_block(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        # Exact count (the BEiT v2 fix-up): unmask random extras, or mask random free patches.
        flat = mask.reshape(-1)  # (H, W) -> (H*W,) view
        if count > self.num_masking_patches:
            on = np.flatnonzero(flat)
            flat[rng.choice(on, count - self.num_masking_patches, replace=False)] = False
        elif count < self.num_masking_patches:
            off = np.flatnonzero(~flat)
            flat[rng.choice(off, self.num_masking_patches - count, replace=False)] = True
        return mask

    def batch(self, n: int, rng: np.random.Generator | None = None) -> Tensor:
        """``n`` masks flattened to patches, as the models take them.

        Returns:
            A ``(n, H*W)`` BoolTensor, True = masked patch.
        """
        rng = worker_rng() if rng is None else rng
        masks = np.stack([self(rng) for _ in range(n)]) if n else np.zeros((0, *self.shape), bool)
        return torch.from_numpy(masks.reshape(n, self.num_patches))  # (n, H, W) -> (n, H*W)


def mlm_mask(
    ids: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    ratio: float = 0.15,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT-style masking of a batch of token ids.

    Per row, exactly ``max(1, round(ratio * n))`` of the ``n`` maskable tokens are chosen (tokens
    whose id is not in ``special_ids``; padding must be one of them); rows with no maskable token are
    left alone. A chosen token becomes ``mask_id`` with probability ``replace_prob``, a random regular
    (non-special) token with probability ``random_prob``, and stays itself otherwise.

    Args:
        ids: ``(B, L)`` token ids (bos/eos/pad included).
        mask_id: the id written at masked positions.
        vocab_size: ids drawn for random replacement are below this.
        special_ids: ids never chosen and never drawn (bos, eos, pad, mask, ...).
        ratio: fraction of maskable tokens to choose.
        replace_prob: probability a chosen token becomes ``mask_id``.
        random_prob: probability a chosen token becomes a random regular token.
        generator: torch random generator (default: the global one, seeded per DataLoader worker).

    Returns:
        ``(masked_ids, labels)``, both ``(B, L)`` long: labels hold the original id at chosen
        positions and :data:`IGNORE_INDEX` elsewhere.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, L), got shape {tuple(ids.shape)}")
    special = sorted({int(s) for s in special_ids} | {int(mask_id)})
    special_t = torch.tensor(special, dtype=ids.dtype, device=ids.device)
    maskable = ~torch.isin(ids, special_t)  # (B, L)
    n = maskable.sum(dim=1)  # (B,)
    n_pick = torch.where(n > 0, torch.clamp(torch.round(n.float() * ratio).long(), min=1), 0)
    n_pick = torch.minimum(n_pick, n)

    # Random ranks among maskable positions: unmaskable ones get +inf scores and rank last.
    scores = torch.rand(ids.shape, generator=generator, device=ids.device)
    scores = scores.masked_fill(~maskable, float("inf"))
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (B, L): rank of each position within its row
    chosen = ranks < n_pick[:, None]

    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return _replace(ids, chosen, mask_id, vocab_size, special, replace_prob, random_prob, generator), labels


def _replace(ids: Tensor, chosen: Tensor, mask_id: int, vocab_size: int, special: list[int], replace_prob: float,
             random_prob: float, generator: torch.Generator | None) -> Tensor:
    """BERT's replacement of the ``chosen`` positions: ``mask_id`` with ``replace_prob``, a uniformly
    drawn regular (non-``special``) id with ``random_prob``, the id itself otherwise."""
    u = torch.rand(ids.shape, generator=generator, device=ids.device)
    to_mask = chosen & (u < replace_prob)
    to_random = chosen & (u >= replace_prob) & (u < replace_prob + random_prob)
    # Uniform over regular ids: draw from [0, vocab - |specials below vocab|) and step over each
    # special id in increasing order (a compact way to skip them without a vocab-sized table).
    in_vocab = [s for s in special if s < vocab_size]
    rand = torch.randint(0, vocab_size - len(in_vocab), ids.shape, generator=generator, device=ids.device)
    for s in in_vocab:
        rand = rand + (rand >= s).long()
    out = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    return torch.where(to_random, rand.to(ids.dtype), out)


def caption_mask(
    ids: Tensor,
    lengths: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    prob: float = 0.6,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BEiT-3's caption masking of a batch (see the module docstring).

    Args:
        ids: ``(B, L)`` token ids, each row ``[bos, ..., eos]`` then padding.
        lengths: ``(B,)`` tokens of each row before the padding (bos and eos included, >= 2).
        mask_id: the id written at masked positions.
        vocab_size: random replacements are drawn below this, never a special id.
        special_ids: ids never drawn as random replacements.
        prob: fraction of each caption's tokens to mask (BEiT-3's ``captioning_mask_prob``).
        replace_prob / random_prob: of the chosen tokens, the share set to ``mask_id`` / to a random
            regular token (the rest keep their id).
        generator: torch random generator.

    Returns:
        ``(masked_ids, masked_positions)``: ``(B, L)`` long and bool.
    """
    if ids.dim() != 2 or lengths.shape != ids.shape[:1]:
        raise ValueError(f"ids must be (B, L) and lengths (B,); got {tuple(ids.shape)} and {tuple(lengths.shape)}")
    if bool((lengths < 2).any()) or bool((lengths > ids.shape[1]).any()):
        raise ValueError(f"caption lengths must be in [2, {ids.shape[1]}] (bos + eos at least); got {lengths.tolist()}")
    B, L = ids.shape
    n = lengths.to(ids.device)
    n_pick = torch.clamp((n.double() * prob + 0.5).floor().long(), min=1)
    n_pick = torch.minimum(n_pick, n - 1)
    pos = torch.arange(L, device=ids.device)
    eligible = (pos[None] >= 1) & (pos[None] < n[:, None])  # positions 1 .. n-1
    scores = torch.rand(ids.shape, generator=generator, device=ids.device).masked_fill(~eligible, float("inf"))
    ranks = scores.argsort(dim=1).argsort(dim=1)
    chosen = ranks < n_pick[:, None]

    special = sorted({int(s) for s in special_ids} | {int(mask_id)})
    return _replace(ids, chosen, mask_id, vocab_size, special, replace_prob, random_prob, generator), chosen
