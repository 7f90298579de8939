"""Semantic segmentation label maps as the ADE20K release (and mmsegmentation) define them.

A label map is a one-channel PNG of class indices (mode ``L`` or ``P``; 16-bit ``I;16`` for more than
255 classes). ADE20K numbers its 150 classes 1..150 and uses 0 for "other", which is not evaluated:
*reducing the zero label* maps 0 -> :data:`IGNORE_INDEX` (255) and k -> k - 1, so the classes are
0..149. :func:`read_label_map` reads such a file and refuses, naming the file, an RGB image, a size
other than its image's and values above the class count; the data readers (training targets) and the
evaluator (scores) read label maps through it, so both follow the same rule.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["IGNORE_INDEX", "read_label_map", "reduce_zero_label"]

IGNORE_INDEX = 255


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's numbering to 0-based classes: 0 ("other") -> 255 (ignored), k -> k - 1; 255 stays 255."""
    out = label.astype(np.int64) - 1
    out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return out


def read_label_map(
    path: str | os.PathLike,
    num_classes: int | None = None,
    *,
    reduce_zero: bool = False,
    size: tuple[int, int] | None = None,
    what: str = "label",
) -> np.ndarray:
    """A label PNG as an ``(H, W)`` int64 array of class indices (255 = ignore).

    Args:
        path: the PNG.
        num_classes: classes of the task; a value at or above it (other than 255, after the zero label
            is reduced) is an error naming the file and the value.
        reduce_zero: the file uses ADE20K's numbering (see :func:`reduce_zero_label`).
        size: ``(width, height)`` the map must have (its image's).
        what: ``label`` or ``prediction``, for messages.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} PNG")
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{path}: a {img.mode} image; a {what} map has one channel of class indices "
                             "(mode L or P)")
        if size is not None and img.size != tuple(size):
            raise ValueError(f"{path}: {what} map of {img.size[0]}x{img.size[1]} pixels, but its image is "
                             f"{size[0]}x{size[1]}")
        label = np.asarray(img, dtype=np.int64)
    if reduce_zero:
        label = reduce_zero_label(label)
    if num_classes is not None:
        bad = (label >= num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            raise ValueError(f"{path}: {what} value {int(label[bad].max()) + (1 if reduce_zero else 0)} is above the "
                             f"{num_classes} classes" + (" (ADE20K numbering: 1..N, 0 = other)" if reduce_zero else "")
                             + f"; {int(bad.sum())} pixels")
    return label
