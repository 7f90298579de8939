"""Image transforms for pretraining and each task, built from torchvision and timm parts.

Recipes (BEiT-3's ``build_transform``, see the reference notes):

- ``"pretrain"``: random resized crop (scale 0.5-1, bicubic), horizontal flip, normalise.
- ``"train"`` (VQAv2 / NLVR2 / captioning finetuning): the same crop and flip plus RandAugment
  (2 ops, magnitude 7, BEiT-3's ``RandomAugment(2, 7)``; any timm ``rand-...`` string).
- ``"eval"``: a plain resize to ``size x size`` (bicubic), deterministic.
- ``"imagenet_train"`` / ``"imagenet_eval"``: timm's ``create_transform`` (RandAugment
  ``rand-m9-mstd0.5-inc1``, colour jitter 0.4, random erasing 0.25; eval resizes ``size / crop_pct``
  then centre-crops).

Normalisation constants are selectable by name: ``"inception"`` (mean = std = 0.5, BEiT-3's VL
tasks and pretraining), ``"imagenet"`` (timm defaults, BEiT-3's ImageNet finetuning), ``"clip"``,
or an explicit ``(mean, std)`` pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    create_transform,
    rand_augment_transform,
)
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = [
    "NORMALIZATION",
    "RandomResizedCrop",
    "TRANSFORM_KINDS",
    "build_transform",
    "draft_size",
    "normalize_batch",
    "pil_to_uint8",
    "resolve_mean_std",
]

MeanStd = tuple[Sequence[float], Sequence[float]]


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, with the 0-bit case Pillow >= 13 refuses done as older Pillow did it (keep no
    bit: a black image). timm's ``rand-...-inc1`` RandAugment reaches 0 bits at magnitude 10, which
    magnitude noise (``mstd``) hits, so BEiT-3's ImageNet recipe crashed a DataLoader worker."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize


_patch_timm_posterize()

NORMALIZATION: dict[str, MeanStd] = {
    "inception": (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}

TRANSFORM_KINDS = ("pretrain", "train", "eval", "imagenet_train", "imagenet_eval")


def resolve_mean_std(mean_std: str | MeanStd) -> MeanStd:
    """Normalisation constants from a name in :data:`NORMALIZATION` or an explicit pair."""
    if isinstance(mean_std, str):
        if mean_std not in NORMALIZATION:
            raise ValueError(f"unknown normalisation {mean_std!r}; choose from {sorted(NORMALIZATION)}")
        return NORMALIZATION[mean_std]
    mean, std = mean_std
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {mean} and {std}")
    return tuple(mean), tuple(std)


class RandomResizedCrop(T.RandomResizedCrop):
    """torchvision's random resized crop (same crop distribution) that resizes PIL images straight
    from the crop box (``Image.resize(box=...)``) instead of copying the crop first: about 15%
    faster; the filter may read pixels just outside the box, so edges differ slightly."""

    _PIL = {InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.BILINEAR: Image.BILINEAR}

    def forward(self, img: Any) -> Any:
        if not isinstance(img, Image.Image) or self.interpolation not in self._PIL:
            return super().forward(img)
        top, left, h, w = self.get_params(img, self.scale, self.ratio)
        return img.resize(
            (self.size[1], self.size[0]), self._PIL[self.interpolation], box=(left, top, left + w, top + h)
        )


def pil_to_uint8(img: Image.Image) -> Tensor:
    """PIL image -> ``(3, H, W)`` uint8 tensor (a channels-first view of one copy of the pixels)."""
    arr = np.array(img.convert("RGB") if img.mode != "RGB" else img)  # (H, W, 3), writable copy
    return torch.from_numpy(arr).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W), no copy


def normalize_batch(images: Tensor, mean_std: str | MeanStd, out: Tensor | None = None) -> Tensor:
    """``(B, 3, H, W)`` pixel values in [0, 255] -> normalised float32, ``(x / 255 - mean) / std``.

    Args:
        images: uint8 (or float with 0..255 values; may be ``out`` itself, converted in place).
        mean_std: normalisation name or ``(mean, std)``.
        out: optional float32 destination (e.g. in shared memory), same shape.
    """
    mean, std = resolve_mean_std(mean_std)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)  # (3,) -> (1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)  # (3,) -> (1, 3, 1, 1)
    out = torch.empty(images.shape, dtype=torch.float32) if out is None else out
    if out.data_ptr() != images.data_ptr():
        out.copy_(images)
    return out.mul_(scale).sub_(shift)


def draft_size(size: int, min_scale: float = 0.5) -> int:
    """The smallest side a JPEG may be draft-decoded to without losing detail in a random resized
    crop of ``size`` px covering at least ``min_scale`` of the image area."""
    return math.ceil(size / math.sqrt(min_scale))


def build_transform(
    kind: str = "eval",
    size: int = 224,
    mean_std: str | MeanStd = "inception",
    scale: tuple[float, float] = (0.5, 1.0),
    hflip: float = 0.5,
    randaug: str | None = None,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    output: str = "float",
    imagenet_scale: tuple[float, float] | None = None,
    re_prob: float = 0.25,
) -> Callable[[Image.Image], Tensor]:
    """A PIL image -> normalised ``(3, size, size)`` float tensor transform.

    Args:
        kind: one of :data:`TRANSFORM_KINDS`.
        size: output side in pixels.
        mean_std: normalisation name or ``(mean, std)``, used as given for every kind (BEiT-3 uses
            "inception" for VL tasks and "imagenet" for ImageNet finetuning).
        scale: random resized crop area range (pretrain / train).
        hflip: horizontal flip probability (pretrain / train / imagenet_train).
        randaug: timm RandAugment string for ``"train"`` / ``"imagenet_train"``; None picks the
            recipe's (``"rand-n2-m7"`` / ``"rand-m9-mstd0.5-inc1"``), ``""`` disables it.
        crop_pct: ``"imagenet_eval"`` resizes to ``size / crop_pct`` before the centre crop.
        interpolation: ``"bicubic"`` or ``"bilinear"``.
        imagenet_scale: the random resized crop area range of ``"imagenet_train"`` (default timm's
            ``(0.08, 1)``).
        re_prob: random erasing probability of ``"imagenet_train"`` (BEiT-3: 0.25).
        output: ``"float"``: a normalised float tensor; ``"uint8"``: an unnormalised ``(3, H, W)``
            uint8 tensor, for loaders that normalise whole batches in the collate step
            (:class:`~vlmoe.data.collate.Collator` with ``mean_std``): 4x less data per sample and
            one fused conversion per batch (``"pretrain"``, ``"train"``, ``"eval"`` only).
    """
    if output not in ("float", "uint8"):
        raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
    mean, std = resolve_mean_std(mean_std)
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[interpolation]
    to_tensor = [T.ToTensor(), T.Normalize(mean, std)] if output == "float" else [pil_to_uint8]
    if kind in ("pretrain", "train"):
        ops: list[Callable] = [RandomResizedCrop(size, scale=scale, interpolation=interp)]
        if hflip > 0:
            ops.append(T.RandomHorizontalFlip(hflip))
        randaug = "rand-n2-m7" if randaug is None else randaug
        if kind == "train" and randaug:
            # timm's RandAugment works on PIL images; the fill colour is the dataset mean.
            hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
            ops.append(rand_augment_transform(randaug, hparams))
        return T.Compose(ops + to_tensor)
    if kind == "eval":
        return T.Compose([T.Resize((size, size), interpolation=interp), *to_tensor])
    if output == "uint8":
        raise ValueError(f"output='uint8' is not available for {kind!r} (timm's transform normalises itself)")
    if kind == "imagenet_train":
        randaug = "rand-m9-mstd0.5-inc1" if randaug is None else randaug
        return create_transform(
            size,
            is_training=True,
            scale=imagenet_scale if imagenet_scale is not None else (0.08, 1.0),
            hflip=hflip,
            color_jitter=0.4,
            auto_augment=randaug or None,
            interpolation=interpolation,
            mean=mean,
            std=std,
            re_prob=re_prob,
            re_mode="pixel",
            re_count=1,
        )
    if kind == "imagenet_eval":
        return create_transform(
            size, is_training=False, interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct
        )
    raise ValueError(f"unknown transform kind {kind!r}; choose from {TRANSFORM_KINDS}")
