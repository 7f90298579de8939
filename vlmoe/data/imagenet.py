"""ImageNet (or any ImageFolder): ``<root>/<split>/<class>/<image>``, classes in sorted folder order.

When the folders are WordNet synsets (``n01440764``), human-readable class names come from timm's
bundled ImageNet metadata (works offline); otherwise the folder names are the class names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from vlmoe.data._io import load_image

__all__ = ["ImageFolderDataset", "class_names"]


def class_names(classes: list[str]) -> list[str]:
    """Readable names for class folders: timm's ImageNet descriptions for synset ids, else as is."""
    if classes and all(c.startswith("n") and c[1:].isdigit() and len(c) == 9 for c in classes):
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        known = set(info.label_names())
        if all(c in known for c in classes):
            return [info.label_name_to_description(c).split(",")[0].strip() for c in classes]
    return list(classes)


class ImageFolderDataset(Dataset):
    """Images by class folder.

    Args:
        root: the split folder (holding one folder per class), e.g. ``imagenet/train``.
        transform: PIL image -> tensor.

    Attributes:
        classes: folder names in label order; ``class_names``: readable names.

    Samples: ``{"image", "label"}``.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Any], Any] | None = None):
        self.root, self.transform = Path(root), transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(f"{self.root} holds no class folders")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = make_dataset(str(self.root), self.class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise FileNotFoundError(f"{self.root}: no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")
        self.class_names = class_names(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        img = load_image(path, record=f"{self.root} sample {index}")
        return {"image": self.transform(img) if self.transform else img, "label": label}
