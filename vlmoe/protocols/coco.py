"""COCO's annotation files: a file needs ``images`` and ``annotations``, and is read by pycocotools.

:func:`load_coco` is shared by the data readers (captions, instances) and the COCO evaluators, so both
read a file the same way and refuse the same broken ones.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

from vlmoe.io import DataFormatError, load_json

__all__ = ["load_coco"]


def load_coco(path: str | os.PathLike) -> Any:
    """A ``pycocotools.coco.COCO`` from a file, with vlmoe's positioned JSON errors and no prints."""
    from pycocotools.coco import COCO

    data = load_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataFormatError(f"{path}: not a COCO annotation file (needs 'images' and 'annotations')")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
