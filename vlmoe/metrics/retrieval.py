"""Image-text retrieval recall (BEiT-3's ``RetrievalHandler.after_eval``, the usual COCO 5k / Flickr30k 1k
protocol): the full image x text similarity matrix; image -> text R@k is the share of images with at
least one of their captions among the k best texts, text -> image R@k the share of captions whose
image is among the k best images; ``average_score`` is the mean of the six.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Evaluator

__all__ = ["RetrievalEvaluator", "retrieval_recall"]

KS = (1, 5, 10)


def retrieval_recall(scores: Tensor, text_image: Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@k of a similarity matrix.

    Args:
        scores: ``(Ni, Nt)`` similarity of every image with every text.
        text_image: ``(Nt,)`` the row (image index) each text belongs to.
        ks: the k of R@k.

    Returns:
        ``tr_r{k}`` (image -> text), ``ir_r{k}`` (text -> image), ``tr_mean``, ``ir_mean``, ``average_score``.
    """
    Ni, Nt = scores.shape
    if text_image.shape != (Nt,):
        raise ValueError(f"text_image must be ({Nt},) for a ({Ni}, {Nt}) score matrix; got {tuple(text_image.shape)}")
    out: dict[str, float] = {}
    # image -> text: rank of the best-ranked own caption of each image
    order = scores.argsort(dim=1, descending=True)  # (Ni, Nt) text indices by score
    own = text_image[order] == torch.arange(Ni, device=scores.device)[:, None]  # (Ni, Nt)
    first = torch.where(own.any(dim=1), own.float().argmax(dim=1), torch.full((Ni,), Nt, device=scores.device))
    # text -> image: rank of each caption's image
    order_t = scores.t().argsort(dim=1, descending=True)  # (Nt, Ni)
    rank_t = (order_t == text_image[:, None]).float().argmax(dim=1)
    for k in ks:
        out[f"tr_r{k}"] = float((first < k).float().mean())
        out[f"ir_r{k}"] = float((rank_t < k).float().mean())
    out["tr_mean"] = sum(out[f"tr_r{k}"] for k in ks) / len(ks)
    out["ir_mean"] = sum(out[f"ir_r{k}"] for k in ks) / len(ks)
    out["average_score"] = (out["tr_mean"] + out["ir_mean"]) / 2
    return out


class RetrievalEvaluator(Evaluator):
    """Records: ``{"key": "i<image_id>", "image_id", "embedding"}`` per image and ``{"key":
    "t<image_id>-<j>", "image_id", "embedding"}`` per caption (unit-norm embeddings as lists), so the
    padding duplicates of a distributed sampler count once. Every caption's image must be embedded."""

    id_key = "key"

    def check(self, record: dict[str, Any]) -> None:
        for field in ("image_id", "embedding"):
            if field not in record:
                raise ValueError(f"retrieval record {record.get('key')!r} has no {field!r}")

    def compute(self) -> dict[str, float]:
        images = [r for r in self.records if str(r["key"]).startswith("i")]
        texts = [r for r in self.records if str(r["key"]).startswith("t")]
        if not images or not texts:
            raise ValueError(f"retrieval needs image and text embeddings; got {len(images)} images, {len(texts)} texts")
        row = {r["image_id"]: i for i, r in enumerate(images)}
        missing = [r["image_id"] for r in texts if r["image_id"] not in row]
        if missing:
            raise ValueError(
                f"{len(missing)} captions belong to images that were not embedded (e.g. image {missing[0]})"
            )
        img = torch.tensor([r["embedding"] for r in images], dtype=torch.float32)
        txt = torch.tensor([r["embedding"] for r in texts], dtype=torch.float32)
        out = retrieval_recall(img @ txt.t(), torch.tensor([row[r["image_id"]] for r in texts]))
        out.update(num_images=float(len(images)), num_texts=float(len(texts)))
        return out
