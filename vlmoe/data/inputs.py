"""The user's inputs to a task model's prediction method, checked and normalised: images as a list,
texts as a list of str, counts as whole numbers >= 1, and decoded text tidied. A task module's
prediction functions (:class:`vlmoe.tasks.registry.Prediction`) use these, so every task answers bad
input with the same one-line errors.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterable
from typing import Any

from PIL import Image
from torch import Tensor

__all__ = ["as_list", "check_count", "detokenize", "strings"]


def as_list(x: Any) -> list[Any]:
    """Images as a list: one path / PIL image / ``(3, H, W)`` tensor -> ``[x]``; a ``(B, 3, H, W)`` tensor
    -> its B images; any other iterable -> its items."""
    if isinstance(x, str | os.PathLike) or not isinstance(x, Iterable) or isinstance(x, Tensor) and x.ndim == 3:
        return [x]
    if isinstance(x, Tensor):  # (B, 3, H, W)
        return list(x)
    return [x] if isinstance(x, Image.Image) else list(x)


def strings(x: Any, name: str) -> list[str]:
    """``x`` (a str or a sequence of str) as a list; anything else is a TypeError naming ``name``."""
    items = [x] if isinstance(x, str) else list(x) if isinstance(x, Iterable) else None
    if items is None or not all(isinstance(t, str) for t in items):
        bad = x if items is None else next(t for t in items if not isinstance(t, str))
        raise TypeError(f"{name} must be a str or a list of str, got {type(bad).__name__}")
    return items


def check_count(value: Any, name: str) -> None:
    """``value`` must be a whole number >= 1 (``topk``, ``beam``, ``batch_size``); the error names ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def detokenize(text: str) -> str:
    """``"a red circle ."`` -> ``"a red circle."`` (BPE decoders leave spaces before punctuation)."""
    return re.sub(r"\s+([.,!?;:])", r"\1", " ".join(text.split()))
