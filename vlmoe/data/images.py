"""Opening the user's own images for a model: any path, PIL image or tensor as a PIL RGB image no
larger than the model needs (the predictor and the web page read images through these).

A large image is held at full size only while it decodes: it is scaled down by the largest whole
factor that keeps both sides at least :data:`REDUCING_GAP` times the size the model resizes it to (JPEG
files decode at that scale, :meth:`PIL.Image.Image.draft`; others are reduced by a box filter right
after decoding, :meth:`PIL.Image.Image.reduce`), which PIL documents as indistinguishable, in most
cases, from resizing the full image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlmoe.data._io import load_image

__all__ = ["REDUCING_GAP", "ImageLike", "fit_within", "open_image", "original_size"]

ImageLike = Any  # str | os.PathLike | PIL.Image.Image | Tensor

# An image is reduced while it opens only down to this many times the size the model resizes it to
# (PIL's ``reducing_gap``: from 3 on, reduce-then-resize looks like resizing the full image).
REDUCING_GAP = 3


def open_image(image: ImageLike, min_size: int | None = None) -> Any:
    """A PIL RGB image from a path, a PIL image or a ``(3, H, W)`` tensor (uint8, or float in [0, 1]).

    Args:
        image: the image.
        min_size: scale a larger image down by the largest whole factor that keeps both sides at least
            this many pixels (JPEG files decode at that scale; others are reduced right after decoding);
            :func:`original_size` gives the size before.

    Raises:
        OSError: a file that cannot be decoded or is over PIL's decompression-bomb limit (named).
        ValueError: a tensor of another shape, or one holding NaN or infinite values.
    """
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        img = load_image(Path(image), draft=(min_size, min_size) if min_size else None)
    elif isinstance(image, Image.Image):
        img = image if image.mode == "RGB" else image.convert("RGB")
    elif isinstance(image, Tensor):
        from torchvision.transforms.functional import to_pil_image

        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be (3, H, W) or (1, H, W); got shape {tuple(image.shape)}")
        if image.is_floating_point() and not bool(torch.isfinite(image).all()):
            raise ValueError(f"the image tensor of shape {tuple(image.shape)} holds NaN or infinite values")
        img = to_pil_image(image).convert("RGB")
    else:
        raise TypeError(f"not an image: {type(image).__name__} (give a path, a PIL image or a (3, H, W) tensor)")
    factor = min(img.size) // min_size if min_size else 1
    if factor < 2:
        return img
    small = img.reduce(factor)
    small.info["original_size"] = original_size(img)
    return small


def original_size(image: Any) -> tuple[int, int]:
    """The ``(width, height)`` a PIL image had before :func:`open_image` scaled it down (its size if it
    was not)."""
    size = image.info.get("original_size")  # a tuple only when set by vlmoe (file metadata gives str)
    ok = isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    return size if ok else image.size


def fit_within(image: Any, size: int) -> Any:
    """``image`` (PIL) scaled down, aspect kept, so its longer side is ``size`` pixels; as it is when it
    already fits. The result is a picture of its own (its :func:`original_size` is its size). Its sides
    are rounded, so torchvision's detection transform, which resizes the longer side to ``size``, keeps it."""
    from PIL import Image

    w, h = image.size
    if max(w, h) <= size:
        return image
    scale = size / max(w, h)
    out = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR,
                       reducing_gap=REDUCING_GAP)
    out.info.pop("original_size", None)
    return out
