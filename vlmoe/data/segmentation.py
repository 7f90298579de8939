"""Semantic segmentation data: images with label maps, and the joint transforms of BEiT's recipe.

- :class:`SegmentationFolder`: a folder of images and a folder of label PNGs matched by file name
  (ADE20K's release: ``ADEChallengeData2016/images/{training,validation}/ADE_*.jpg`` and
  ``annotations/{training,validation}/ADE_*.png`` in 1..150 numbering with 0 = "other", read with
  ``reduce_zero=True``; or any such pair of folders, e.g. Cityscapes-style data with a class list).
- :class:`COCOSemantic`: the semantic label maps of a COCO instances file (every instance mask painted
  with its category's index 1..K, 0 = background): the demo's shapes, or any COCO-format data.
- :class:`SegmentationTransform`: joint image / label transforms through torchvision transforms v2
  (``tv_tensors.Mask`` keeps the label map aligned and nearest-neighbour): for training a random resize
  to ``ratio`` x the scale (keeping the aspect), a random crop (padded with 0 for the image and 255 for
  the label where the image is smaller), a horizontal flip and photometric distortion (colour jitter);
  for evaluation the whole image resized to the model's side.

Samples: ``{"image": uint8 (3, H, W), "label": int64 (H, W) with 255 = ignore, "image_id": str}``.
Label maps are read by :func:`vlmoe.protocols.segmentation.read_label_map` (the evaluator's rule).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlmoe.data._io import load_image
from vlmoe.protocols.coco import load_coco
from vlmoe.protocols.segmentation import IGNORE_INDEX, read_label_map

__all__ = ["COCOSemantic", "SegmentationFolder", "SegmentationTransform", "ade20k_folders"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def ade20k_folders(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """``(images, annotations)`` of ADE20K's release for ``split`` (``training`` / ``validation``)."""
    root = Path(root)
    images, annotations = root / "images" / split, root / "annotations" / split
    for folder in (images, annotations):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (ADE20K's release layout: "
                                    "ADEChallengeData2016/{images,annotations}/{training,validation})")
    return images, annotations


class SegmentationFolder(Dataset):
    """Images and their label PNGs, matched by file name (see the module docstring).

    Args:
        images: the image folder (searched recursively).
        annotations: the label folder, laid out as ``images`` with ``.png`` files.
        num_classes: classes; a label value at or above it (other than 255) is an error naming the file.
        reduce_zero: the labels use ADE20K's numbering (0 = "other" -> ignored, k -> k - 1).
        transform: ``(image, label) -> (image, label)`` (:class:`SegmentationTransform`); default: the
            image as a uint8 tensor, the label as it is.
        class_names: names of the classes, kept for the task and the predictions.
    """

    def __init__(self, images: str | os.PathLike, annotations: str | os.PathLike, num_classes: int, *,
                 reduce_zero: bool = False, transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        self.images, self.annotations = Path(images), Path(annotations)
        for folder in (self.images, self.annotations):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: no such folder")
        self.files = sorted(p for p in self.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"{self.images}: no images")
        self.labels = [self.annotations / p.relative_to(self.images).with_suffix(".png") for p in self.files]
        missing = [str(lab) for lab in self.labels if not lab.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: no label map for the image "
                                    f"{self.files[self.labels.index(Path(missing[0]))]}"
                                    + (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.num_classes, self.reduce_zero, self.transform = num_classes, reduce_zero, transform
        self.class_names = list(class_names) if class_names is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = load_image(self.files[i])
        label = read_label_map(self.labels[i], self.num_classes, reduce_zero=self.reduce_zero, size=img.size)
        return _sample(img, label, str(self.files[i].relative_to(self.images).with_suffix("")), self.transform)


class COCOSemantic(Dataset):
    """Semantic label maps painted from a COCO instances file (see the module docstring).

    Args:
        annotations: ``instances_*.json``.
        image_root: folder the ``file_name`` entries are relative to.
        transform: as :class:`SegmentationFolder`'s.

    Classes: 0 = background, then the categories in id order (:attr:`class_names`). Where instances
    overlap, the later annotation's category wins; crowd regions are ignored (255).
    """

    def __init__(self, annotations: str | os.PathLike, image_root: str | os.PathLike,
                 transform: Callable[[Any, Any], tuple[Any, Any]] | None = None) -> None:
        self.path, self.image_root = Path(annotations), Path(image_root)
        self.coco = load_coco(annotations)
        self.ids = sorted(self.coco.imgs)
        cats = sorted(self.coco.cats)
        self.category_to_label = {c: i + 1 for i, c in enumerate(cats)}
        self.class_names = ["background", *(self.coco.cats[c]["name"] for c in cats)]
        self.num_classes = len(self.class_names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def label_map(self, image_id: int) -> np.ndarray:
        """The ``(H, W)`` int64 label map of one image."""
        info = self.coco.imgs[image_id]
        label = np.zeros((info["height"], info["width"]), dtype=np.int64)
        for ann in self.coco.imgToAnns.get(image_id, []):
            mask = self.coco.annToMask(ann).astype(bool)
            label[mask] = IGNORE_INDEX if ann.get("iscrowd", 0) else self.category_to_label[ann["category_id"]]
        return label

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.ids[i]
        info = self.coco.imgs[image_id]
        img = load_image(self.image_root / info["file_name"], f"{self.path}: image {image_id}")
        label = self.label_map(image_id)
        if label.shape != (img.height, img.width):
            raise ValueError(f"{self.path}: image {image_id} is {img.width}x{img.height} pixels, but the file "
                             f"gives {info['width']}x{info['height']}")
        return _sample(img, label, str(image_id), self.transform)


def _sample(img: Any, label: np.ndarray, image_id: str, transform: Callable[[Any, Any], Any] | None) -> dict[str, Any]:
    from torchvision.transforms.v2.functional import pil_to_tensor

    image, mask = pil_to_tensor(img), torch.from_numpy(label)
    if transform is not None:
        image, mask = transform(image, mask)
    return {"image": image, "label": mask.long(), "image_id": image_id}


class SegmentationTransform:
    """Joint image / label transforms of BEiT's segmentation recipe (see the module docstring).

    Args:
        train: the training pipeline (else the evaluation resize).
        size: the crop side (training) or the side images are resized to (evaluation, where the label
            keeps its own size: the protocol scores predictions at the original resolution).
        short_side: the short side the random resize ratio multiplies (mmsegmentation scales images to
            (2048, 512) x ratio for 512 crops; default: ``size``).
        ratio: the range of the random resize ratio.
        hflip: probability of a horizontal flip.
        photometric: colour jitter (brightness, contrast, saturation 0.5, hue 0.07: mmsegmentation's
            PhotoMetricDistortion ranges) in training.
    """

    def __init__(self, train: bool, size: int, short_side: int | None = None,
                 ratio: tuple[float, float] = (0.5, 2.0), hflip: float = 0.5, photometric: bool = True) -> None:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.train, self.size = train, size
        short = short_side or size
        steps = [
            v2.RandomResize(int(short * ratio[0]), int(short * ratio[1]) + 1),  # the short side; aspect kept
            v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(hflip),
        ]
        if photometric:
            steps.append(v2.ColorJitter(0.5, 0.5, 0.5, 0.07))
        self.pipeline = v2.Compose(steps)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        if not self.train:
            return TF.resize(image, [self.size, self.size], antialias=True), label
        img, mask = self.pipeline(tv_tensors.Image(image), tv_tensors.Mask(label))
        return img.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
