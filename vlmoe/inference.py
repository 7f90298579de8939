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
are resized as the model was evaluated (detection keeps the original size: the detector resizes and
maps its boxes back). Work is batched (``batch_size``) under ``torch.inference_mode``. A method the
model's task does not have raises an error naming the task.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Predictor", "load", "open_image"]

ImageLike = Any  # str | os.PathLike | PIL.Image.Image | Tensor


def open_image(image: ImageLike) -> Any:
    """A PIL RGB image from a path, a PIL image or a ``(3, H, W)`` tensor (uint8, or float in [0, 1])."""
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        from vlmoe.data._io import load_image

        return load_image(Path(image))
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        from torchvision.transforms.functional import to_pil_image

        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be (3, H, W) or (1, H, W); got shape {tuple(image.shape)}")
        return to_pil_image(image).convert("RGB")
    raise TypeError(f"not an image: {type(image).__name__} (give a path, a PIL image or a (3, H, W) tensor)")


def _as_list(x: Any) -> list[Any]:
    if isinstance(x, str | os.PathLike) or not isinstance(x, Iterable) or isinstance(x, Tensor) and x.ndim == 3:
        return [x]
    if isinstance(x, Tensor):  # (B, 3, H, W)
        return list(x)
    from PIL import Image

    return [x] if isinstance(x, Image.Image) else list(x)


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
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.preprocess.build_tokenizer()
        return self._tokenizer

    def images(self, images: Sequence[ImageLike]) -> Tensor:
        """Images -> the normalised ``(B, 3, S, S)`` batch the model was evaluated on."""
        if self._transform is None:
            self._transform = self.preprocess.build_transform()
        x = torch.stack([self._transform(open_image(i)) for i in images])
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
        imgs, qs = _as_list(images), [questions] if isinstance(questions, str) else list(questions)
        if len(qs) == 1 and len(imgs) > 1:
            qs = qs * len(imgs)
        if len(qs) != len(imgs):
            raise ValueError(f"{len(imgs)} images but {len(qs)} questions")
        out = []
        for s in self._batches(len(imgs)):
            ids, pad = self.texts(qs[s])
            scores = self.model(self.images(imgs[s]), ids, pad).float().sigmoid()
            top = scores.topk(min(topk, scores.shape[1]), dim=1)
            out += [[{"answer": self.model.answers[i], "score": float(v)} for v, i in zip(vs, ix)]
                    for vs, ix in zip(top.values.tolist(), top.indices.tolist())]
        return out

    @torch.inference_mode()
    def caption(self, images: Any, beam: int = 3, max_len: int | None = None, length_penalty: float = 0.6) -> list[str]:
        """Captioning: one caption per image (beam search; ``beam=1``: greedy)."""
        self._need("captioning")
        imgs = _as_list(images)
        n = max_len or min(32, self.model.config.max_text_positions)
        out = []
        for s in self._batches(len(imgs)):
            gen = self.model.generate(self.images(imgs[s]), max_len=n, num_beams=beam, length_penalty=length_penalty)
            out += [_detokenize(self.tokenizer.decode(t)) for t in gen.tokens]
        return out

    @torch.inference_mode()
    def classify(self, images: Any, topk: int = 5) -> list[list[dict[str, Any]]]:
        """Classification: per image the ``topk`` classes ``{"label", "index", "score"}`` (softmax)."""
        self._need("image_classification")
        names = self.model.class_names
        out = []
        imgs = _as_list(images)
        for s in self._batches(len(imgs)):
            probs = self.model(self.images(imgs[s])).float().softmax(-1)
            top = probs.topk(min(topk, probs.shape[1]), dim=1)
            out += [[{"label": names[i] if names else str(i), "index": int(i), "score": float(v)}
                     for v, i in zip(vs, ix)] for vs, ix in zip(top.values.tolist(), top.indices.tolist())]
        return out

    @torch.inference_mode()
    def detect(self, images: Any, score_threshold: float = 0.5, masks: bool = True,
               mask_threshold: float = 0.5) -> list[list[dict[str, Any]]]:
        """Detection: per image ``{"label", "score", "box": [x0, y0, x1, y1]}`` (original pixels) above
        ``score_threshold``, with ``"mask"`` (bool ``(H, W)`` tensor) when the model has masks."""
        self._need("detection")
        from torchvision.transforms.functional import pil_to_tensor

        imgs = _as_list(images)
        out = []
        for s in self._batches(len(imgs)):
            batch = [pil_to_tensor(open_image(i)).to(self.device, dtype=self.dtype or torch.float32) / 255.0
                     for i in imgs[s]]
            for det in self.model(batch):
                keep = det["scores"] >= score_threshold
                rows = []
                for j in keep.nonzero().flatten().tolist():
                    r = {"label": self.model.class_names[int(det["labels"][j]) - 1], "score": float(det["scores"][j]),
                         "box": [round(float(v), 2) for v in det["boxes"][j]]}
                    if masks and "masks" in det:
                        r["mask"] = (det["masks"][j, 0] > mask_threshold).cpu()
                    rows.append(r)
                out.append(rows)
        return out

    @torch.inference_mode()
    def verify(self, left: Any, right: Any, sentences: str | Sequence[str]) -> list[dict[str, Any]]:
        """NLVR2: is the sentence true of the (left, right) pair? ``{"true": bool, "score": p(true)}``."""
        self._need("nlvr2")
        a, b = _as_list(left), _as_list(right)
        ss = [sentences] * len(a) if isinstance(sentences, str) else list(sentences)
        if not len(a) == len(b) == len(ss):
            raise ValueError(f"{len(a)} left images, {len(b)} right images and {len(ss)} sentences")
        out = []
        for s in self._batches(len(a)):
            ids, pad = self.texts(ss[s])
            p = self.model(self.images(a[s]), self.images(b[s]), ids, pad).float().softmax(-1)[:, 1]
            out += [{"true": bool(v > 0.5), "score": float(v)} for v in p.tolist()]
        return out

    @torch.inference_mode()
    def embed_images(self, images: Any) -> Tensor:
        """Retrieval: unit-norm image embeddings ``(N, D)``."""
        self._need("retrieval")
        imgs = _as_list(images)
        return torch.cat([self.model.encode_image(self.images(imgs[s])).float() for s in self._batches(len(imgs))])

    @torch.inference_mode()
    def embed_texts(self, texts: str | Sequence[str]) -> Tensor:
        """Retrieval: unit-norm text embeddings ``(N, D)``."""
        self._need("retrieval")
        ts = [texts] if isinstance(texts, str) else list(texts)
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
