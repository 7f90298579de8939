"""Collation: lists of samples -> the batch dict every model and task reads.

Batch dict (B = batch size, L = ``max_len``, N = patches of the MIM grid):

=====================  ==================  ====================================================
key                    shape / type        meaning
=====================  ==================  ====================================================
``image``              (B, 3, H, W) float  normalised images
``image2``             (B, 3, H, W) float  the second image (NLVR2)
``image_mask``         (B, N) bool         True = masked patch (MIM), when a mask generator is set
``text_ids``           (B, L) long         ``[bos] ids [eos] pad...``; with MLM, the masked ids
``text_padding_mask``  (B, L) bool         True = padding (BEiT-3 convention)
``mlm_labels``         (B, L) long         original id where masked, -100 elsewhere (with MLM)
``label``              (B,) long           class / NLVR2 label, when samples carry one
``vqa_targets``        (B, A) float        VQA soft scores over the answer vocabulary
other numbers          (B,) tensor         e.g. ``question_id``, ``image_id``
anything else          list                e.g. ``key`` (sample keys), ``answers``
=====================  ==================  ====================================================

Pretraining batches are one such dict per stream present:
``{"pair": {...}, "image": {...}, "text": {...}}`` (see :mod:`vlmoe.data.pretrain`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from vlmoe.data.masking import BlockMaskingGenerator, mlm_mask
from vlmoe.data.tokenizers import Tokenizer
from vlmoe.data.transforms import resolve_mean_std

__all__ = ["Collator", "collate_detection"]

# Per-sample bookkeeping that batches do not need.
_DROP = frozenset({"url", "__url__", "__key__"})


class Collator:
    """Stack images, tokenize texts, draw MIM/MLM masks: samples -> batch dict.

    Args:
        tokenizer: turns each sample's ``text`` into ``text_ids`` / ``text_padding_mask``
            (required when samples have text).
        max_len: the text length L.
        mlm_ratio: if set, mask this fraction of text tokens (80/10/10) and add ``mlm_labels``.
        mim: if set, draw one block-wise mask per image into ``image_mask``.
        generator: torch generator for MLM (default: global RNG, distinct per DataLoader worker).
        mean_std: normalisation applied to uint8 image tensors (from transforms built with
            ``output="uint8"``): they become normalised float32 here, one fused pass per batch.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        max_len: int = 64,
        mlm_ratio: float | None = None,
        mim: BlockMaskingGenerator | None = None,
        generator: torch.Generator | None = None,
        mean_std: str | tuple | None = None,
    ):
        if mlm_ratio is not None and not 0.0 < mlm_ratio <= 1.0:
            raise ValueError(f"mlm_ratio must be in (0, 1], got {mlm_ratio}")
        self.tokenizer, self.max_len = tokenizer, max_len
        self.mlm_ratio, self.mim, self.generator = mlm_ratio, mim, generator
        self.mean_std = mean_std

    def __repr__(self) -> str:
        return (
            f"Collator(tokenizer={type(self.tokenizer).__name__ if self.tokenizer else None}, "
            f"max_len={self.max_len}, mlm_ratio={self.mlm_ratio}, mim={self.mim})"
        )

    def text(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenize (and MLM-mask) a list of texts into the text part of a batch dict."""
        if self.tokenizer is None:
            raise ValueError("samples carry 'text' but the Collator has no tokenizer")
        ids, pad = self.tokenizer(list(texts), self.max_len)
        out = {"text_ids": ids, "text_padding_mask": pad}
        if self.mlm_ratio is not None:
            tok = self.tokenizer
            out["text_ids"], out["mlm_labels"] = mlm_mask(
                ids,
                mask_id=tok.mask_id,
                vocab_size=tok.vocab_size,
                special_ids=tok.special_ids,
                ratio=self.mlm_ratio,
                generator=self.generator,
            )
        return out

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        batch: dict[str, Any] = {}
        # Keys every sample has (an optional member such as an image's cls may be missing in some).
        common = set(samples[0]).intersection(*samples[1:])
        keys = [k for k in samples[0] if k in common and k not in _DROP]
        for k in keys:
            values = [s[k] for s in samples]
            if k == "text":
                batch.update(self.text(values))
            elif isinstance(values[0], Tensor):
                batch[k] = self._stack(values)
            elif isinstance(values[0], bool | int | float) and not isinstance(values[0], str):
                batch[k] = torch.tensor(values)
            else:
                batch[k] = values
        if self.mim is not None and "image" in batch:
            batch["image_mask"] = self.mim.batch(len(samples))
        return batch

    def _stack(self, values: Sequence[Tensor]) -> Tensor:
        """Stack into a fresh tensor, allocated in shared memory inside a DataLoader worker (as
        torch's default_collate does) so sending the batch to the main process copies nothing;
        uint8 images are converted and normalised on the way when ``mean_std`` is set."""
        first = values[0]
        to_float = first.dtype == torch.uint8 and self.mean_std is not None and first.dim() == 3
        shape = (len(values), *first.shape)
        dtype = torch.float32 if to_float else first.dtype
        out = _shared_empty(shape, dtype) if get_worker_info() is not None else torch.empty(shape, dtype=dtype)
        if to_float:
            mean, std = resolve_mean_std(self.mean_std)
            scale = torch.tensor([1.0 / (255.0 * x) for x in std]).view(3, 1, 1)  # (3,) -> (3, 1, 1)
            shift = torch.tensor([m / x for m, x in zip(mean, std)]).view(3, 1, 1)  # (3,) -> (3, 1, 1)
            for i, v in enumerate(values):
                # Convert and normalise one image at a time while its 600 KB are still in cache:
                # cheaper than three passes over the whole batch (measured: no table lookup or
                # numpy path beats it on one thread).
                dst = out[i]
                dst.copy_(v)
                dst.mul_(scale).sub_(shift)
            return out
        return torch.stack(values, out=out)


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor whose storage lives in shared memory."""
    numel = 1
    for d in shape:
        numel *= d
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def collate_detection(samples: Sequence[tuple[Tensor, dict[str, Any]]]) -> dict[str, Any]:
    """Detection batches keep images of different sizes apart, as torchvision's detectors take them.

    Args:
        samples: ``(image (3, H, W), target)`` pairs from :class:`~vlmoe.data.coco.COCOInstances`.

    Returns:
        ``{"image": [Tensor, ...], "targets": [dict, ...]}``.
    """
    return {"image": [s[0] for s in samples], "targets": [s[1] for s in samples]}
