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
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["REDUCING_GAP", "Predictor", "fit_within", "load", "open_image", "original_size"]

ImageLike = Any  # str | os.PathLike | PIL.Image.Image | Tensor

# An image is reduced while it opens only down to this many times the size the model resizes it to
# (PIL's ``reducing_gap``: from 3 on, reduce-then-resize looks like resizing the full image).
REDUCING_GAP = 3


def open_image(image: ImageLike, min_size: int | None = None) -> Any:
    """A PIL RGB image from a path, a PIL image or a ``(3, H, W)`` tensor (uint8, or float in [0, 1]).

    Args:
        image: the image.
        min_size: scale a larger image down by the largest whole factor that keeps both sides at least
            this many pixels (JPEG files decode at that scale; others are reduced right after decoding);
            :func:`original_size` gives the size before.

    Raises:
        OSError: a file that cannot be decoded or is over PIL's decompression-bomb limit (named).
        ValueError: a tensor of another shape, or one holding NaN or infinite values.
    """
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        from vlmoe.data._io import load_image

        img = load_image(Path(image), draft=(min_size, min_size) if min_size else None)
    elif isinstance(image, Image.Image):
        img = image if image.mode == "RGB" else image.convert("RGB")
    elif isinstance(image, Tensor):
        from torchvision.transforms.functional import to_pil_image

        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be (3, H, W) or (1, H, W); got shape {tuple(image.shape)}")
        if image.is_floating_point() and not bool(torch.isfinite(image).all()):
            raise ValueError(f"the image tensor of shape {tuple(image.shape)} holds NaN or infinite values")
        img = to_pil_image(image).convert("RGB")
    else:
        raise TypeError(f"not an image: {type(image).__name__} (give a path, a PIL image or a (3, H, W) tensor)")
    factor = min(img.size) // min_size if min_size else 1
    if factor < 2:
        return img
    small = img.reduce(factor)
    small.info["original_size"] = original_size(img)
    return small


def original_size(image: Any) -> tuple[int, int]:
    """The ``(width, height)`` a PIL image had before :func:`open_image` scaled it down (its size if it
    was not)."""
    size = image.info.get("original_size")  # a tuple only when set by vlmoe (file metadata gives str)
    ok = isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    return size if ok else image.size


def fit_within(image: Any, size: int) -> Any:
    """``image`` (PIL) scaled down, aspect kept, so its longer side is ``size`` pixels; as it is when it
    already fits. The result is a picture of its own (its :func:`original_size` is its size). Its sides
    are rounded, so torchvision's detection transform, which resizes the longer side to ``size``, keeps it."""
    from PIL import Image

    w, h = image.size
    if max(w, h) <= size:
        return image
    scale = size / max(w, h)
    out = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR,
                       reducing_gap=REDUCING_GAP)
    out.info.pop("original_size", None)
    return out


def _as_list(x: Any) -> list[Any]:
    if isinstance(x, str | os.PathLike) or not isinstance(x, Iterable) or isinstance(x, Tensor) and x.ndim == 3:
        return [x]
    if isinstance(x, Tensor):  # (B, 3, H, W)
        return list(x)
    from PIL import Image

    return [x] if isinstance(x, Image.Image) else list(x)


def _strings(x: Any, name: str) -> list[str]:
    """``x`` (a str or a sequence of str) as a list; anything else is a TypeError naming ``name``."""
    items = [x] if isinstance(x, str) else list(x) if isinstance(x, Iterable) else None
    if items is None or not all(isinstance(t, str) for t in items):
        bad = x if items is None else next(t for t in items if not isinstance(t, str))
        raise TypeError(f"{name} must be a str or a list of str, got {type(bad).__name__}")
    return items


def _check_count(value: Any, name: str) -> None:
    """``value`` must be a whole number >= 1 (``topk``, ``beam``, ``batch_size``); the error names ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _detokenize(text: str) -> str:
    """``"a red circle ."`` -> ``"a red circle."`` (BPE decoders leave spaces before punctuation)."""
    import re

    return re.sub(r"\s+([.,!?;:])", r"\1", " ".join(text.split()))


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
        _check_count(batch_size, "batch_size")
        self.batch_size = batch_size
        self._transform = None
        self._tokenizer = None

    @property
    def task(self) -> str:
        return getattr(self.model, "task", "") or "backbone"

    def __repr__(self) -> str:
        return f"Predictor(task={self.task!r}, device={self.device}, image_size={self.preprocess.image_size})"

    def _need(self, *tasks: str) -> None:
        if self.task not in tasks:
            raise ValueError(f"this model's task is {self.task!r}; this method needs a {' / '.join(tasks)} model")

    # ------------------------------------------------------------------ inputs
    @property
    def decode_size(self) -> int:
        """The shorter side an image keeps when it is opened (:func:`open_image`'s ``min_size``):
        :data:`REDUCING_GAP` times the largest size the model resizes it to."""
        pre = self.preprocess
        sizes = [math.ceil(pre.image_size / pre.crop_pct)] if pre.image_size else []
        if self.task == "detection":
            sizes.append(self.model.image_size)
        return REDUCING_GAP * max(sizes or [224])

    def open(self, image: ImageLike) -> Any:
        """One image as a PIL RGB image no larger than this model needs (see the module docstring)."""
        return open_image(image, self.decode_size)

    def _open(self, images: Sequence[ImageLike], start: int) -> list[Any]:
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
        x = torch.stack([self._transform(i) for i in self._open(images, start)])
        return x.to(self.device, dtype=self.dtype or torch.float32)

    def texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids, pad = self.tokenizer(list(texts), self.preprocess.max_len)
        return ids.to(self.device), pad.to(self.device)

    def _batches(self, n: int) -> Iterable[slice]:
        for start in range(0, n, self.batch_size):
            yield slice(start, min(n, start + self.batch_size))

    # ------------------------------------------------------------------ tasks
    @torch.inference_mode()
    def answer(self, images: Any, questions: str | Sequence[str], topk: int = 1) -> list[list[dict[str, Any]]]:
        """VQA: per image + question the ``topk`` answers ``{"answer", "score"}`` (sigmoid scores)."""
        self._need("vqa")
        _check_count(topk, "topk")
        imgs, qs = _as_list(images), _strings(questions, "questions")
        if len(qs) == 1 and len(imgs) > 1:
            qs = qs * len(imgs)
        if len(qs) != len(imgs):
            raise ValueError(f"{len(imgs)} images but {len(qs)} questions")
        out = []
        for s in self._batches(len(imgs)):
            ids, pad = self.texts(qs[s])
            scores = self.model(self.images(imgs[s], s.start), ids, pad).float().sigmoid()
            top = scores.topk(min(topk, scores.shape[1]), dim=1)
            out += [[{"answer": self.model.answers[i], "score": float(v)} for v, i in zip(vs, ix)]
                    for vs, ix in zip(top.values.tolist(), top.indices.tolist())]
        return out

    @torch.inference_mode()
    def caption(self, images: Any, beam: int = 3, max_len: int | None = None, length_penalty: float = 0.6) -> list[str]:
        """Captioning: one caption per image (beam search; ``beam=1``: greedy)."""
        self._need("captioning")
        _check_count(beam, "beam")
        imgs = _as_list(images)
        n = max_len or min(32, self.model.config.max_text_positions)
        out = []
        for s in self._batches(len(imgs)):
            gen = self.model.generate(self.images(imgs[s], s.start), max_len=n, num_beams=beam,
                                      length_penalty=length_penalty)
            out += [_detokenize(self.tokenizer.decode(t)) for t in gen.tokens]
        return out

    @torch.inference_mode()
    def classify(self, images: Any, topk: int = 5) -> list[list[dict[str, Any]]]:
        """Classification: per image the ``topk`` classes ``{"label", "index", "score"}`` (softmax)."""
        self._need("image_classification")
        _check_count(topk, "topk")
        names = self.model.class_names
        out = []
        imgs = _as_list(images)
        for s in self._batches(len(imgs)):
            probs = self.model(self.images(imgs[s], s.start)).float().softmax(-1)
            top = probs.topk(min(topk, probs.shape[1]), dim=1)
            out += [[{"label": names[i] if names else str(i), "index": int(i), "score": float(v)}
                     for v, i in zip(vs, ix)] for vs, ix in zip(top.values.tolist(), top.indices.tolist())]
        return out

    @torch.inference_mode()
    def detect(self, images: Any, score_threshold: float = 0.5, masks: bool = True,
               mask_threshold: float = 0.5) -> list[list[dict[str, Any]]]:
        """Detection: per image ``{"label", "score", "box": [x0, y0, x1, y1]}`` (original pixels) above
        ``score_threshold``, with ``"mask"`` (bool ``(H, W)`` tensor) when the model has masks and
        ``masks`` is True (each mask is scaled up to the original size only then)."""
        self._need("detection")
        from torch.nn.functional import interpolate
        from torchvision.transforms.functional import pil_to_tensor

        imgs = _as_list(images)
        out = []
        for s in self._batches(len(imgs)):
            opened = self._open(imgs[s], s.start)
            # the detector's own input size: its masks are pasted at this size, not the original's
            inputs = [fit_within(im, self.model.image_size) for im in opened]
            batch = [pil_to_tensor(im).to(self.device, dtype=self.dtype or torch.float32) / 255.0 for im in inputs]
            for im, x, det in zip(opened, inputs, self.model(batch)):
                w, h = original_size(im)
                sx, sy = w / x.width, h / x.height
                keep = det["scores"] >= score_threshold
                rows = []
                for j in keep.nonzero().flatten().tolist():
                    x0, y0, x1, y1 = det["boxes"][j].tolist()
                    r = {"label": self.model.class_names[int(det["labels"][j]) - 1], "score": float(det["scores"][j]),
                         "box": [round(min(v, lim), 2) for v, lim in ((x0 * sx, w), (y0 * sy, h), (x1 * sx, w),
                                                                     (y1 * sy, h))]}
                    if masks and "masks" in det:
                        m = det["masks"][j : j + 1].float()  # (1, 1, h', w') probabilities
                        if m.shape[-2:] != (h, w):
                            m = interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                        r["mask"] = (m[0, 0] > mask_threshold).cpu()
                    rows.append(r)
                out.append(rows)
        return out

    @torch.inference_mode()
    def verify(self, left: Any, right: Any, sentences: str | Sequence[str]) -> list[dict[str, Any]]:
        """NLVR2: is the sentence true of the (left, right) pair? ``{"true": bool, "score": p(true)}``."""
        self._need("nlvr2")
        a, b = _as_list(left), _as_list(right)
        ss = _strings(sentences, "sentences")
        ss = ss * len(a) if isinstance(sentences, str) else ss
        if not len(a) == len(b) == len(ss):
            raise ValueError(f"{len(a)} left images, {len(b)} right images and {len(ss)} sentences")
        out = []
        for s in self._batches(len(a)):
            ids, pad = self.texts(ss[s])
            p = self.model(self.images(a[s], s.start), self.images(b[s], s.start), ids, pad).float().softmax(-1)[:, 1]
            out += [{"true": bool(v > 0.5), "score": float(v)} for v in p.tolist()]
        return out

    @torch.inference_mode()
    def embed_images(self, images: Any) -> Tensor:
        """Retrieval: unit-norm image embeddings ``(N, D)``."""
        self._need("retrieval")
        imgs = _as_list(images)
        return torch.cat([self.model.encode_image(self.images(imgs[s], s.start)).float()
                          for s in self._batches(len(imgs))])

    @torch.inference_mode()
    def embed_texts(self, texts: str | Sequence[str]) -> Tensor:
        """Retrieval: unit-norm text embeddings ``(N, D)``."""
        self._need("retrieval")
        ts = _strings(texts, "texts")
        return torch.cat([self.model.encode_text(*self.texts(ts[s])).float() for s in self._batches(len(ts))])

    def match(self, images: Any, texts: str | Sequence[str]) -> Tensor:
        """Retrieval: the ``(images, texts)`` cosine-similarity matrix."""
        return self.embed_images(images) @ self.embed_texts(texts).t()


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         batch_size: int = 16) -> Predictor:
    """A :class:`Predictor` from a ``vlmoe export`` folder or a ``vlmoe pretrain`` / ``finetune`` ``.ckpt``."""
    from vlmoe.models import VLMoE, VLMoEConfig, build_task_model, load_checkpoint, load_pretrained
    from vlmoe.models.export import CONFIG_NAME, _training_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model folder or checkpoint")
    if p.is_dir() or p.suffix == ".safetensors":
        if p.is_dir() and not (p / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{p}: not a model folder (no {CONFIG_NAME}; write one with `vlmoe export`)")
        model = load_pretrained(p)
        return Predictor(model, model.preprocess, device, dtype, batch_size)
    trained = _training_checkpoint(p)
    if trained is None:
        raise ValueError(f"{p}: not a vlmoe model folder or training checkpoint (convert other checkpoints with "
                         "`vlmoe export`)")
    model = build_task_model(VLMoE(VLMoEConfig.from_dict(trained["config"])), trained["task"])
    load_checkpoint(model, trained["state_dict"], format="vlmoe", strict=True)
    return Predictor(model, trained["preprocess"], device, dtype, batch_size)
