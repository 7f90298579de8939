"""File helpers shared by the readers and writers: JSON with positioned errors, images with named
paths (atomic writes: :mod:`vlmoe.io`).

Every error raised here names the file and, where there is one, the record and the field at fault,
so a user pointing a config at a broken download sees what to fix.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vlmoe.io import DataFormatError, load_json, load_jsonl

__all__ = [
    "DataFormatError",
    "decode_image",
    "load_image",
    "load_json",
    "load_jsonl",
    "require",
]


def require(record: Any, fields: Sequence[str], where: str) -> None:
    """Check that ``record`` is a mapping holding ``fields``.

    Args:
        record: one parsed record.
        fields: the keys it must have.
        where: a description of the record for the message, e.g. ``"file.json: annotations[3]"``.
    """
    if not isinstance(record, Mapping):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in fields if f not in record]
    if missing:
        raise DataFormatError(f"{where}: missing field(s) {missing}; it has {sorted(record)}")


def decode_image(data: bytes, mode: str = "RGB", draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode encoded image bytes fully (so truncation is detected here, not later).

    Args:
        data: the encoded image (JPEG, PNG, WebP, ...).
        mode: PIL mode to convert to.
        draft: for JPEG, let the decoder scale down by a power of two while keeping at least this
            (width, height): several times faster on large web images, same result after a resize. A
            scaled-down image keeps the file's (width, height) in ``img.info["original_size"]``.
    """
    img = Image.open(io.BytesIO(data))
    size = img.size
    if draft is not None and img.format == "JPEG":
        img.draft(mode, draft)
    img.load()  # raises OSError on a truncated or corrupt file
    if img.size != size:
        img.info["original_size"] = size
    return img.convert(mode) if img.mode != mode else img


def load_image(
    path: str | os.PathLike, record: str = "", mode: str = "RGB", draft: tuple[int, int] | None = None
) -> Image.Image:
    """Open an image file, naming the path and the record that refers to it on failure.

    An image over PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` times two) is an
    ``OSError`` like a corrupt one: it is refused before its pixels are decoded.

    Args:
        path: the image file.
        record: a description of the record that points at the image (for the message).
        mode: PIL mode to convert to.
        draft: see :func:`decode_image`.
    """
    path = Path(path)
    ref = f" (referenced by {record})" if record else ""
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}{ref}")
    try:
        with open(path, "rb") as f:
            return decode_image(f.read(), mode, draft)
    except (OSError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot decode image {path}{ref}: {e}") from None
