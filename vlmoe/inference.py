"""Inference on one's own images: ``vlmoe.load`` returns a task-aware :class:`Predictor`.

    import vlmoe
    model = vlmoe.load("out/vqa")                       # a `vlmoe export` folder or a training .ckpt
    model.answer(["cat.jpg"], ["what colour is the cat?"], topk=3)
    model.caption("photos/beach.png")                   # KV-cached beam search
    model.classify(images, topk=5); model.detect(images, score_threshold=0.5)
    model.verify(left, right, "the left image has more dogs"); model.match(images, texts)

A model folder (or a ``vlmoe pretrain`` / ``finetune`` checkpoint) carries the weights, the backbone
config, the task (head type, answers / class names / special ids) and the preprocessing (image size,
normalisation, tokenizer), so nothing else is needed. Images may be paths, PIL images, ``(3, H, W)``
tensors (uint8, or float in [0, 1]) or lists of them, of any size and mode (converted to RGB); they
are resized as the model was evaluated (detection answers in the original pixels). Work is batched
(``batch_size``) under ``torch.inference_mode``. A method the model's task does not have raises an
error naming the task.

A large image is held at full size only while it decodes: it is scaled down by the largest whole
factor that keeps both sides at least :data:`REDUCING_GAP` times the size the model resizes it to (JPEG
files decode at that scale, :meth:`PIL.Image.Image.draft`; others are reduced by a box filter right
after decoding, :meth:`PIL.Image.Image.reduce`), which PIL documents as indistinguishable, in most
cases, from resizing the full image. The detector gets each image at its own input size, so its masks
are pasted at that size; ``detect`` scales the boxes (and the masks, when asked for) back to the
original pixels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vlmoe.data.images import REDUCING_GAP, ImageLike, fit_within, open_image, original_size
from vlmoe.data.inputs import check_count

__all__ = ["REDUCING_GAP", "Predictor", "fit_within", "load", "open_image", "original_size"]


class Predictor:
    """A task model with its preprocessing (see the module docstring).

    Args:
        model: a task model (:mod:`vlmoe.models.task_models`) or a backbone.
        preprocess: the preprocessing dict (:class:`vlmoe.data.Preprocess`).
        device / dtype: where and in which precision to run.
        batch_size: images per forward.
    """

    def __init__(self, model: nn.Module, preprocess: dict[str, Any] | None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, batch_size: int = 16) -> None:
        from vlmoe.data.preprocess import Preprocess

        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype=dtype).eval() if dtype else model.to(self.device).eval()
        self.preprocess = Preprocess.from_dict(preprocess) if preprocess else Preprocess(
            image_size=getattr(getattr(model, "config", None), "img_size", 224))
        check_count(batch_size, "batch_size")
        self.batch_size = batch_size
        self._transform = None
        self._tokenizer = None

    @property
    def task(self) -> str:
        return getattr(self.model, "task", "") or "backbone"

    def __repr__(self) -> str:
        return f"Predictor(task={self.task!r}, device={self.device}, image_size={self.preprocess.image_size})"

    # ------------------------------------------------------------------ inputs
    @property
    def decode_size(self) -> int:
        """The shorter side an image keeps when it is opened (:func:`open_image`'s ``min_size``):
        :data:`REDUCING_GAP` times the largest size the model resizes it to."""
        pre = self.preprocess
        sizes = [math.ceil(pre.image_size / pre.crop_pct)] if pre.image_size else []
        own = getattr(self.model, "image_size", None)  # a model with its own input size (the detector)
        if isinstance(own, int):
            sizes.append(own)
        return REDUCING_GAP * max(sizes or [224])

    def open(self, image: ImageLike) -> Any:
        """One image as a PIL RGB image no larger than this model needs (see the module docstring)."""
        return open_image(image, self.decode_size)

    def open_all(self, images: Sequence[ImageLike], start: int = 0) -> list[Any]:
        """:meth:`open` on ``images``, which start at index ``start`` of the caller's list (named in errors)."""
        opened = []
        for i, image in enumerate(images, start):
            try:
                opened.append(self.open(image))
            except ValueError as e:
                raise ValueError(f"images[{i}]: {e}") from None
        return opened

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.preprocess.build_tokenizer()
        return self._tokenizer

    def images(self, images: Sequence[ImageLike], start: int = 0) -> Tensor:
        """Images -> the normalised ``(B, 3, S, S)`` batch the model was evaluated on (``start``: the index
        of the first one in the caller's list, for error messages)."""
        if self._transform is None:
            self._transform = self.preprocess.build_transform()
        x = torch.stack([self._transform(i) for i in self.open_all(images, start)])
        return x.to(self.device, dtype=self.dtype or torch.float32)

    def texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids, pad = self.tokenizer(list(texts), self.preprocess.max_len)
        return ids.to(self.device), pad.to(self.device)

    def batches(self, n: int) -> Iterable[slice]:
        """Slices of ``range(n)`` of at most ``batch_size`` items."""
        for start in range(0, n, self.batch_size):
            yield slice(start, min(n, start + self.batch_size))

    # ------------------------------------------------------------------ tasks
    def spec(self) -> Any:
        """The registered task of this model (:class:`vlmoe.tasks.registry.TaskSpec`; None for a backbone
        or a task no module has registered)."""
        from vlmoe.tasks.registry import task_for_model

        return task_for_model(self.task)

    def methods(self) -> dict[str, Any]:
        """Every registered prediction method by name -> the task it belongs to (its spec)."""
        from vlmoe.tasks.registry import tasks

        return {m: spec for spec in tasks().values() if spec.predict for m in spec.predict.methods()}

    def __getattr__(self, name: str) -> Any:
        # the task methods (answer, caption, classify, detect, verify, match, ...) come from the task
        # registry: each task module registers its own with its TaskSpec
        if name.startswith("_"):
            raise AttributeError(name)
        spec = self.methods().get(name)
        if spec is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if spec.model_task != self.task:
            raise ValueError(f"this model's task is {self.task!r}; this method needs a {spec.model_task} model "
                             f"({name}() belongs to task {spec.name!r})")
        fn = spec.predict.methods()[name]

        def method(*args: Any, **kwargs: Any) -> Any:
            with torch.inference_mode():
                return fn(self, *args, **kwargs)

        method.__name__, method.__doc__ = name, fn.__doc__
        return method

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self.methods()})


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         batch_size: int = 16) -> Predictor:
    """A :class:`Predictor` from a ``vlmoe export`` folder, a ``vlmoe pretrain`` / ``finetune`` ``.ckpt``
    or ``hf-hub:ORG/NAME`` (an export folder on the Hugging Face Hub)."""
    from vlmoe.models.loading import load as load_model
    from vlmoe.models.loading import read_source

    source = read_source(path)
    if not source.is_vlmoe_model:
        raise ValueError(f"{path}: not a vlmoe model folder or training checkpoint (convert other checkpoints with "
                         "`vlmoe export`)")
    model, _, preprocess = load_model(source, strict=True)
    return Predictor(model, preprocess, device, dtype, batch_size)
