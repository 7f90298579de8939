"""COCO: captions (Karpathy split and COCO-format annotation files) and instances (boxes, masks).

- :class:`KarpathyCaptions` reads ``dataset_coco.json`` (Karpathy's split: ``{"images": [{"filepath":
  "val2014", "filename": "COCO_val2014_...jpg", "cocoid", "split": "train" | "restval" | "val" |
  "test", "sentences": [{"raw", "tokens", ...}]}]}``). ``split="train"`` includes ``restval``, as
  BEiT-3 / BLIP train. Training yields one sample per caption, evaluation one per image.
- :class:`COCOCaptions` reads COCO-format caption files (``captions_val2014.json``: ``images`` +
  ``annotations: [{"image_id", "id", "caption"}]``), the ground truth pycocoevalcap scores against;
  :func:`karpathy_to_coco` writes one for a Karpathy split.
- :class:`COCOInstances` reads ``instances_*.json`` through pycocotools and returns torchvision
  detection targets (``boxes`` xyxy float, ``labels`` contiguous 1..K int64, ``masks`` uint8
  ``(N, H, W)``, ``area``, ``iscrowd``, ``image_id``).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlmoe.data._io import DataFormatError, load_image, load_json, require
from vlmoe.io import atomic_write_json
from vlmoe.protocols.coco import load_coco

__all__ = ["COCOCaptions", "COCOInstances", "KarpathyCaptions", "karpathy_coco", "karpathy_to_coco", "load_coco"]

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def _karpathy_images(path: str | os.PathLike) -> list[dict[str, Any]]:
    data = load_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise DataFormatError(f"{path}: not a Karpathy split file (no top-level 'images' list)")
    for i, im in enumerate(data["images"]):
        require(im, ["filepath", "filename", "split", "sentences"], f"{path}: images[{i}]")
    return data["images"]


def _karpathy_id(im: dict[str, Any]) -> int:
    return int(im["cocoid"] if "cocoid" in im else im.get("imgid", 0))


class KarpathyCaptions(Dataset):
    """COCO captions by Karpathy split.

    Args:
        path: ``dataset_coco.json``.
        image_root: folder holding the ``filepath`` folders (``train2014/``, ``val2014/``).
        split: ``"train"`` (with ``restval``), ``"val"``, ``"test"`` or ``"restval"``.
        transform: PIL image -> tensor.
        per_caption: one sample per caption (default: True for train, False otherwise).

    Samples: ``{"image", "image_id", "text"}`` per caption, or ``{"image", "image_id", "captions"}``
    per image.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        per_caption: bool | None = None,
    ):
        if split not in KARPATHY_SPLITS:
            raise ValueError(f"unknown Karpathy split {split!r}; choose from {KARPATHY_SPLITS}")
        self.path, self.image_root, self.transform = Path(path), Path(image_root), transform
        splits = ("train", "restval") if split == "train" else (split,)
        self.images = [im for im in _karpathy_images(path) if im["split"] in splits]
        self.per_caption = (split == "train") if per_caption is None else per_caption
        self.items: list[tuple[int, int]] = []  # (image index, sentence index or -1)
        for i, im in enumerate(self.images):
            if self.per_caption:
                for j, s in enumerate(im["sentences"]):
                    require(s, ["raw"], f"{path}: image {im['filename']} sentences[{j}]")
                    self.items.append((i, j))
            else:
                self.items.append((i, -1))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, j = self.items[index]
        im = self.images[i]
        img = load_image(
            self.image_root / im["filepath"] / im["filename"], record=f"{self.path}: image {im['filename']}"
        )
        sample: dict[str, Any] = {
            "image": self.transform(img) if self.transform else img,
            "image_id": _karpathy_id(im),
        }
        if j >= 0:
            sample["text"] = im["sentences"][j]["raw"].strip()
        else:
            sample["captions"] = [s["raw"].strip() for s in im["sentences"]]
        return sample


def karpathy_to_coco(path: str | os.PathLike, split: str, out: str | os.PathLike) -> Path:
    """Write a COCO-format caption file (for pycocotools / pycocoevalcap) of one Karpathy split.

    Args:
        path: ``dataset_coco.json``.
        split: ``"val"`` or ``"test"`` (or any Karpathy split name).
        out: the JSON file to write.
    """
    atomic_write_json(out, karpathy_coco(path, split))
    return Path(out)


def karpathy_coco(path: str | os.PathLike, split: str) -> dict[str, Any]:
    """The COCO-format caption ground truth of one Karpathy split (what :func:`karpathy_to_coco` writes)."""
    return _karpathy_gt(_karpathy_images(path), split, source=str(path))


def _karpathy_gt(karpathy_images: list[dict[str, Any]], split: str, source: str = "") -> dict[str, Any]:
    images, anns = [], []
    for im in karpathy_images:
        if im["split"] != split:
            continue
        image_id = _karpathy_id(im)
        images.append({"id": image_id, "file_name": f"{im['filepath']}/{im['filename']}"})
        for s in im["sentences"]:
            anns.append({"image_id": image_id, "id": len(anns) + 1, "caption": s["raw"].strip()})
    if not images:
        raise ValueError(f"{source or 'Karpathy split'}: no image in split {split!r}")
    info = {"description": f"Karpathy {split} split"}
    return {"info": info, "licenses": [], "type": "captions", "images": images, "annotations": anns}


class COCOCaptions(Dataset):
    """Images of a COCO-format caption file with all their captions.

    Args:
        annotations: ``captions_*.json`` (COCO format).
        image_root: folder the ``file_name`` entries are relative to.
        transform: PIL image -> tensor.
        per_caption: one sample per caption instead of per image.

    Samples: ``{"image", "image_id", "captions"}`` (or ``"text"`` per caption).
    """

    def __init__(
        self,
        annotations: str | os.PathLike,
        image_root: str | os.PathLike,
        transform: Callable[[Any], Any] | None = None,
        per_caption: bool = False,
    ):
        self.path, self.image_root, self.transform = Path(annotations), Path(image_root), transform
        data = load_json(annotations)
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise DataFormatError(f"{annotations}: not a COCO caption file (needs 'images' and 'annotations')")
        self.captions: dict[int, list[str]] = defaultdict(list)
        for i, a in enumerate(data["annotations"]):
            require(a, ["image_id", "caption"], f"{annotations}: annotations[{i}]")
            self.captions[int(a["image_id"])].append(a["caption"].strip())
        self.images = []
        for i, im in enumerate(data["images"]):
            require(im, ["id", "file_name"], f"{annotations}: images[{i}]")
            self.images.append(im)
        self.items = [
            (i, j)
            for i, im in enumerate(self.images)
            for j in (range(len(self.captions[int(im["id"])])) if per_caption else [-1])
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, j = self.items[index]
        im = self.images[i]
        img = load_image(self.image_root / im["file_name"], record=f"{self.path}: image id {im['id']}")
        sample: dict[str, Any] = {
            "image": self.transform(img) if self.transform else img,
            "image_id": int(im["id"]),
        }
        caps = self.captions[int(im["id"])]
        if j >= 0:
            sample["text"] = caps[j]
        else:
            sample["captions"] = list(caps)
        return sample


class COCOInstances(Dataset):
    """COCO instance annotations as torchvision detection targets.

    Args:
        annotations: ``instances_*.json``.
        image_root: folder the ``file_name`` entries are relative to.
        transforms: ``(image, target) -> (image, target)``; default: the image as a float tensor in
            [0, 1] (torchvision detectors normalise inside the model).
        masks: decode instance masks (polygons or RLE) into ``target["masks"]``.
        include_crowd: keep ``iscrowd=1`` annotations (torchvision's references drop them for training).

    Samples: ``(image, target)``; the target holds ``boxes`` (N, 4) xyxy float, ``labels`` (N,)
    int64 in 1..K (contiguous; see ``label_to_category``), ``category_ids`` (N,) the original ids,
    ``masks`` (N, H, W) uint8, ``area``, ``iscrowd``, ``image_id``.
    """

    def __init__(
        self,
        annotations: str | os.PathLike,
        image_root: str | os.PathLike,
        transforms: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]] | None = None,
        masks: bool = True,
        include_crowd: bool = False,
    ):
        self.path, self.image_root = Path(annotations), Path(image_root)
        self.coco = load_coco(annotations)
        self.transforms, self.masks, self.include_crowd = transforms, masks, include_crowd
        self.ids = sorted(self.coco.imgs)
        cats = sorted(self.coco.cats)
        self.category_to_label = {c: i + 1 for i, c in enumerate(cats)}  # 0 is the background
        self.label_to_category = {v: k for k, v in self.category_to_label.items()}
        self.class_names = ["__background__"] + [self.coco.cats[c]["name"] for c in cats]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        img = load_image(self.image_root / info["file_name"], record=f"{self.path}: image id {image_id}")
        w, h = img.size
        anns = self.coco.imgToAnns.get(image_id, [])
        if not self.include_crowd:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        boxes, keep = [], []
        for i, a in enumerate(anns):
            require(a, ["bbox", "category_id"], f"{self.path}: annotation id {a.get('id')}")
            x, y, bw, bh = a["bbox"]
            # Clip to the image and drop degenerate boxes, as torchvision's COCO reference does.
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(w), x + bw), min(float(h), y + bh)
            if x1 > x0 and y1 > y0:
                boxes.append([x0, y0, x1, y1])
                keep.append(i)
        anns = [anns[i] for i in keep]
        target: dict[str, Any] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),  # (N, 4) xyxy; (0,) -> (0, 4) when no box
            "labels": torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "category_ids": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "image_id": int(image_id),
        }
        if self.masks:
            m = [self.coco.annToMask(a) for a in anns]
            target["masks"] = torch.from_numpy(np.stack(m)) if m else torch.zeros((0, h, w), dtype=torch.uint8)
        if self.transforms is not None:
            return self.transforms(img, target)
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(img).float().div_(255), target
