"""The shuffled-image control of a vision-language evaluation.

A vision-language metric alone does not say whether a model reads the image: a VQA model can score
well from the question's words (the answer prior of each question type). The control scores the same
evaluation once more with every sample's image replaced by another sample's: the gap between the two
is what the image contributes. A model that ignores the image scores the same both ways.

The replacement is a fixed derangement of the distinct images (a random order, each image handed to
the next one in it), so

- no sample keeps its own image, also when several samples share it (the questions of one VQA image
  all get the same other image);
- it is a function of the dataset alone (seeded), not of batches or ranks: the control of a sample is
  the same in one process and under DDP, and the gathered control metric is exact.

    data = ShuffledImages(dataset, keys=[r["image_id"] for r in dataset.records])
    sample = data[i]          # dataset[i] plus "control_image" (and "control_image2" for NLVR2)
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from typing import Any

from torch.utils.data import Dataset

__all__ = ["CONTROL_KEYS", "ShuffledImages", "image_derangement"]

CONTROL_KEYS = {"image": "control_image", "image2": "control_image2"}
"""Sample key of an image -> the key its control image goes under."""


def image_derangement(keys: Sequence[Hashable], seed: int = 0) -> list[int]:
    """For each position ``i``, a position ``j`` whose image key differs from ``keys[i]``.

    The distinct keys are put in a seeded random order and each is mapped to the next one in it (one
    cycle, so no key maps to itself); position ``i`` gets the first position holding the key its own
    key maps to. With a single distinct image there is nothing to swap: ``ValueError``.
    """
    first: dict[Hashable, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    distinct = list(first)
    if len(distinct) < 2:
        raise ValueError(f"a shuffled-image control needs at least 2 distinct images; the set has {len(distinct)}")
    order = list(range(len(distinct)))
    random.Random(seed).shuffle(order)
    nxt = {distinct[order[p]]: distinct[order[(p + 1) % len(order)]] for p in range(len(order))}
    return [first[nxt[k]] for k in keys]


class ShuffledImages(Dataset):
    """``dataset`` whose samples also carry another sample's image(s) under :data:`CONTROL_KEYS`.

    Args:
        dataset: a map-style dataset of dict samples with ``image`` (and ``image2``).
        keys: the image key of every sample (image id, file path, or a tuple of both NLVR2 images),
            in dataset order: samples with equal keys show the same image(s).
        seed: the derangement's seed.
    """

    def __init__(self, dataset: Dataset, keys: Sequence[Hashable], seed: int = 0) -> None:
        if len(keys) != len(dataset):
            raise ValueError(f"ShuffledImages: {len(keys)} image keys for {len(dataset)} samples")
        self.dataset = dataset
        self.donor = image_derangement(keys, seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # the wrapped dataset's attributes (records, image paths, ...) stay reachable
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        other = self.dataset[self.donor[index]]
        for key, control in CONTROL_KEYS.items():
            if key in sample:
                sample[control] = other[key]
        return sample
