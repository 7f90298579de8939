"""Semantic segmentation scores as the ADE20K SceneParsing devkit and mmsegmentation's ``IoUMetric``
compute them.

Per class c, over the whole evaluation set (not per image, not per batch): I_c = pixels labelled c and
predicted c, P_c = pixels predicted c, L_c = pixels labelled c, with ignored pixels (label 255) left out
of all three; U_c = P_c + L_c - I_c. IoU_c = I_c / U_c; **mIoU** = the mean of IoU_c over the classes
with U_c > 0; **aAcc** = sum I_c / sum L_c; **mAcc** = the mean of I_c / L_c over the classes with
L_c > 0. A prediction outside the classes (e.g. "other") at a labelled pixel counts in L_c only.

:class:`SegmentationEvaluator` keeps one record of areas per image id (the padding duplicates of a
distributed sampler count once; :meth:`~vlmoe.metrics.Evaluator.gather` merges the ranks), so the
areas are summed exactly once per image under DDP. :func:`score_folders` scores a folder of prediction
PNGs against a folder of label PNGs (``vlmoe evaluate segmentation``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmoe.protocols.segmentation import IGNORE_INDEX, read_label_map

from .base import Evaluator

__all__ = ["SegmentationEvaluator", "intersect_and_union", "score_folders", "segmentation_record",
           "segmentation_scores"]


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(I, P, L)``: per class the pixels predicted and labelled c, predicted c, labelled c, over the
    pixels whose label is not ``ignore_index`` (each ``(num_classes,)`` int64)."""
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction of shape {pred.shape} for a label map of shape {label.shape}")
    keep = label != ignore_index
    p, y = pred[keep].astype(np.int64), label[keep].astype(np.int64)
    inside = (p >= 0) & (p < num_classes)
    inter = np.bincount(y[p == y], minlength=num_classes)[:num_classes]
    area_pred = np.bincount(p[inside], minlength=num_classes)[:num_classes]
    area_label = np.bincount(y, minlength=num_classes)[:num_classes]
    return inter.astype(np.int64), area_pred.astype(np.int64), area_label.astype(np.int64)


def segmentation_record(image_id: Any, pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> dict[str, Any]:
    """The evaluator's record of one image: its per-class areas (:func:`intersect_and_union`)."""
    i, p, lab = intersect_and_union(pred, label, num_classes, ignore_index)
    return {"image_id": image_id, "intersect": i.tolist(), "pred": p.tolist(), "label": lab.tolist()}


def segmentation_scores(inter: np.ndarray, area_pred: np.ndarray, area_label: np.ndarray,
                        class_names: Sequence[str] | None = None) -> dict[str, float]:
    """mIoU, aAcc, mAcc and the per-class IoU (``IoU/<class>``, classes with U_c > 0) of summed areas."""
    inter, area_pred, area_label = (np.asarray(a, dtype=np.float64) for a in (inter, area_pred, area_label))
    union = area_pred + area_label - inter
    seen, labelled = union > 0, area_label > 0
    iou = np.divide(inter, union, out=np.full_like(inter, np.nan), where=seen)
    acc = np.divide(inter, area_label, out=np.full_like(inter, np.nan), where=labelled)
    out = {
        "mIoU": float(iou[seen].mean()) if seen.any() else float("nan"),
        "aAcc": float(inter.sum() / area_label.sum()) if area_label.sum() else float("nan"),
        "mAcc": float(acc[labelled].mean()) if labelled.any() else float("nan"),
        "num_classes_seen": float(seen.sum()),
    }
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(inter))]
    out.update({f"IoU/{names[c]}": float(iou[c]) for c in np.flatnonzero(seen)})
    return out


class SegmentationEvaluator(Evaluator):
    """Records ``{"image_id", "intersect", "pred", "label"}`` (per-class areas of one image, see
    :func:`intersect_and_union`); :meth:`compute` sums them over the set.

    Args:
        num_classes: the classes.
        class_names: names for the per-class IoU keys.
        ignore_index: the label value left out.
    """

    id_key = "image_id"

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None,
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        super().__init__()

    def record(self, image_id: Any, pred: np.ndarray, label: np.ndarray) -> dict[str, Any]:
        """The record of one image's prediction (class indices) against its label map."""
        return segmentation_record(image_id, pred, label, self.num_classes, self.ignore_index)

    def check(self, record: dict[str, Any]) -> None:
        for k in ("intersect", "pred", "label"):
            if len(record.get(k, ())) != self.num_classes:
                raise ValueError(f"SegmentationEvaluator: image {record['image_id']!r}: {k!r} holds "
                                 f"{len(record.get(k, ()))} classes, not {self.num_classes}")

    def compute(self) -> dict[str, float]:
        recs = self.records
        if not recs:
            return {}
        sums = [np.sum([r[k] for r in recs], axis=0, dtype=np.int64) for k in ("intersect", "pred", "label")]
        return {**segmentation_scores(*sums, class_names=self.class_names), "num_images": float(len(recs))}


def score_folders(annotations: str | os.PathLike, predictions: str | os.PathLike, num_classes: int, *,
                  reduce_zero: bool = False, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """The scores of the prediction PNGs in ``predictions`` against the label PNGs in ``annotations``
    (matched by file name; both in the same numbering, e.g. ADE20K's 1..150 with ``reduce_zero``). A
    label map without its prediction, of another size, RGB, or with values above the class count is an
    error naming the file."""
    ann, pred_dir = Path(annotations), Path(predictions)
    for folder, what in ((ann, "--annotations"), (pred_dir, "--predictions")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} {folder}: no such folder")
    labels = sorted(ann.rglob("*.png"))
    if not labels:
        raise FileNotFoundError(f"{ann}: no label PNGs")
    ev = SegmentationEvaluator(num_classes, class_names)
    for path in labels:
        rel = path.relative_to(ann)
        p = pred_dir / rel
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no prediction for the label map {path}")
        from PIL import Image

        with Image.open(path) as im:
            size = im.size
        label = read_label_map(path, num_classes, reduce_zero=reduce_zero)
        pred = read_label_map(p, num_classes, reduce_zero=reduce_zero, size=size, what="prediction")
        ev.update([ev.record(str(rel), pred, label)])
    return ev.compute()
