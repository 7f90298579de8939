"""How a model's inputs are prepared, as plain data that travels with checkpoints and exports.

    pre = Preprocess(image_size=480, mean_std="inception", tokenizer="clip", max_len=64)
    pre.to_dict()        # {"image_size": 480, "mean": [0.5, 0.5, 0.5], "std": [...], ...}
    transform = Preprocess.from_dict(d).build_transform()   # PIL image -> normalised tensor
    tokenizer = Preprocess.from_dict(d).build_tokenizer()

The evaluation transforms are the training recipes' (:func:`vlmoe.data.build_transform`): ``squash``
resizes the whole image to ``image_size x image_size`` (BEiT-3's VL tasks), ``center_crop`` resizes
to ``image_size / crop_pct`` and crops the centre (ImageNet).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RESIZE_MODES", "Preprocess", "preprocess_dict"]

RESIZE_MODES = ("squash", "center_crop")


@dataclass
class Preprocess:
    """Input preparation of a model.

    Attributes:
        image_size: image side in pixels (None: a text-only model).
        mean: per-channel mean of the normalisation.
        std: per-channel std.
        resize: ``squash`` or ``center_crop`` (see the module docstring).
        crop_pct: ``center_crop`` resizes to ``image_size / crop_pct`` first.
        interpolation: ``bicubic`` or ``bilinear``.
        tokenizer: a tokenizer name (``clip``) or a file (SentencePiece model, ``tokenizer.json``);
            None for a vision-only model.
        max_len: text length, special tokens included.
    """

    image_size: int | None = 224
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    resize: str = "squash"
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    tokenizer: str | None = "clip"
    max_len: int = 64

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"preprocess resize={self.resize!r}: choose from {RESIZE_MODES}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"preprocess mean / std need 3 values each, got {self.mean} / {self.std}")
        self.mean, self.std = [float(x) for x in self.mean], [float(x) for x in self.std]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocess key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def build_transform(self) -> Callable[[Any], Any]:
        """The evaluation transform: PIL image -> normalised ``(3, S, S)`` float tensor."""
        from .transforms import build_transform

        if self.image_size is None:
            raise ValueError("this model takes no images (preprocess image_size is None)")
        kind = "eval" if self.resize == "squash" else "imagenet_eval"
        return build_transform(kind, self.image_size, mean_std=(self.mean, self.std), crop_pct=self.crop_pct,
                               interpolation=self.interpolation)

    def build_tokenizer(self) -> Any:
        """The tokenizer (see :func:`vlmoe.data.build_tokenizer`)."""
        from .tokenizers import build_tokenizer

        if self.tokenizer is None:
            raise ValueError("this model takes no text (preprocess tokenizer is None)")
        return build_tokenizer(self.tokenizer)


def preprocess_dict(
    image_size: int | None,
    mean_std: str | tuple = "inception",
    tokenizer: str | None = "clip",
    max_len: int = 64,
    resize: str = "squash",
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
) -> dict[str, Any]:
    """:class:`Preprocess` as a dict, with the normalisation given by name or as ``(mean, std)``."""
    from .transforms import resolve_mean_std

    mean, std = resolve_mean_std(mean_std)
    return Preprocess(image_size, mean, std, resize, crop_pct, interpolation, tokenizer, max_len).to_dict()
