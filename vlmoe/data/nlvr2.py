"""NLVR2 as published: JSON-lines statements about pairs of images.

Files (the NLVR repository's ``nlvr2/data/{train,dev,test1}.json``, one JSON object per line despite
the extension): ``{"identifier": "dev-850-0-1", "sentence": ..., "label": "True" | "False",
"left_url", "right_url", "directory" (train only), ...}``. The images of example ``dev-850-0-1`` are
``<image_root>/dev/dev-850-0-img0.png`` and ``...-img1.png`` (the identifier without its last field);
train images sit in numbered subfolders: ``<image_root>/train/<directory>/train-...-img0.png``.

Consistency (the NLVR2 metric besides accuracy) groups examples by the identifier with its third
field blanked (``dev-850--1``): :func:`consistency_group`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vlmoe.data._io import DataFormatError, load_image, load_jsonl, require
from vlmoe.protocols.nlvr2 import consistency_group, image_prefix

__all__ = ["NLVR2Dataset", "consistency_group", "image_prefix"]


class NLVR2Dataset(Dataset):
    """One sample per statement: left image, right image, sentence, label.

    Args:
        path: the split's ``.json`` (JSON lines) file.
        image_root: the folder holding ``train/``, ``dev/``, ``test1/`` image folders.
        transform: PIL image -> tensor, applied to both images.

    Samples: ``{"image", "image2", "text", "label" (1 = True), "identifier"}``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike,
        transform: Callable[[Any], Any] | None = None,
    ):
        self.path, self.image_root, self.transform = Path(path), Path(image_root), transform
        self.records = []
        for i, r in enumerate(load_jsonl(path)):
            where = f"{path}: line {i + 1}"
            require(r, ["identifier", "sentence", "label"], where)
            if str(r["label"]) not in ("True", "False", "true", "false"):
                raise DataFormatError(f"{where}: label must be 'True' or 'False', got {r['label']!r}")
            self.records.append(r)

    def __len__(self) -> int:
        return len(self.records)

    def image_paths(self, index: int) -> tuple[Path, Path]:
        """The left and right image files of example ``index``."""
        r = self.records[index]
        split = r["identifier"].split("-", 1)[0]
        folder = self.image_root / split
        if "directory" in r and r["directory"] not in (None, ""):
            folder = folder / str(r["directory"])
        prefix = image_prefix(r["identifier"])
        return folder / f"{prefix}-img0.png", folder / f"{prefix}-img1.png"

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        where = f"{self.path}: identifier {r['identifier']}"
        left, right = (load_image(p, record=where) for p in self.image_paths(index))
        if self.transform:
            left, right = self.transform(left), self.transform(right)
        return {
            "image": left,
            "image2": right,
            "text": r["sentence"],
            "label": int(str(r["label"]).lower() == "true"),
            "identifier": r["identifier"],
        }
