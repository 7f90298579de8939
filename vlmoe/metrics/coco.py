"""COCO detection / instance-segmentation evaluation: pycocotools' ``COCOeval`` with its inputs checked.

:func:`evaluate_coco` runs ``COCO.loadRes`` -> ``COCOeval(gt, dt, iou_type)`` -> ``evaluate /
accumulate / summarize`` (the official protocol: IoU 0.50:0.05:0.95, 101 recall points, maxDets
1 / 10 / 100, area ranges small < 32² <= medium < 96² <= large) for ``bbox`` and / or ``segm`` and
returns the 12 ``COCOeval.stats`` by name, the printed summary, and the AP of every category.

pycocotools asserts or silently mis-scores on several inputs; they are refused first with a message
naming the file and the id (:func:`check_coco_ground_truth`, :func:`check_detection_results`): an
empty results list (``loadRes`` crashes on it), image or category ids not in the ground truth, boxes
of negative size, non-finite numbers, a segm result without its mask, a ground-truth annotation with
id 0 (``COCOeval`` treats id 0 as "unmatched" and scores wrongly) or without ``bbox`` / ``area`` /
``iscrowd``. Images without annotations stay in the evaluation (their detections are false
positives), crowd annotations are matched as pycocotools does (``iscrowd = 1``: ignored regions).

Results format (pycocotools'): ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]`` in
original image pixels, plus ``"segmentation"`` (RLE ``{"size": [h, w], "counts": str}``) for segm.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
from collections.abc import Sequence
from typing import Any

from .base import Evaluator

__all__ = [
    "STAT_NAMES",
    "COCOEvaluator",
    "check_coco_ground_truth",
    "check_detection_results",
    "evaluate_coco",
    "format_report",
    "load_ground_truth",
]

STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
IOU_TYPES = ("bbox", "segm")


def load_ground_truth(path: str | os.PathLike) -> Any:
    """A checked ``pycocotools.coco.COCO`` of an instances file (no prints)."""
    from vlmoe.protocols.coco import load_coco

    coco = load_coco(path)
    check_coco_ground_truth(coco, str(path))
    return coco


def check_coco_ground_truth(coco: Any, source: str = "ground truth") -> None:
    """Refuse what ``COCOeval`` would mis-score: no categories, an annotation id 0 (or missing), an
    annotation without ``bbox`` / ``area`` / ``iscrowd`` or for an unknown image / category."""
    data = coco.dataset
    if not data.get("categories"):
        raise ValueError(f"{source}: no 'categories' (COCOeval needs them)")
    images, cats = set(coco.imgs), set(coco.cats)
    for i, a in enumerate(data.get("annotations", [])):
        ident = a.get("id")
        if not isinstance(ident, int) or ident < 1:
            raise ValueError(f"{source}: annotations[{i}] has id {ident!r}; COCOeval needs ids >= 1 (id 0 counts as "
                             "'unmatched' and corrupts the matching)")
        for field in ("image_id", "category_id", "bbox", "area", "iscrowd"):
            if field not in a:
                raise ValueError(f"{source}: annotation {ident} has no {field!r}")
        if a["image_id"] not in images:
            raise ValueError(f"{source}: annotation {ident} is for image {a['image_id']}, which 'images' does not list")
        if a["category_id"] not in cats:
            raise ValueError(f"{source}: annotation {ident} has category {a['category_id']}, not in 'categories'")


def check_detection_results(results: Any, coco: Any, iou_types: Sequence[str] = ("bbox",),
                            source: str = "results") -> list[dict[str, Any]]:
    """The results list, checked against the ground truth ``coco`` (see the module docstring)."""
    if not isinstance(results, list):
        raise ValueError(f"{source}: expected a list of detections, got {type(results).__name__}")
    if not results:
        raise ValueError(f"{source}: no detections (an empty results list cannot be scored; pycocotools' loadRes "
                         "crashes on it)")
    images, cats = set(coco.imgs), set(coco.cats)
    for i, r in enumerate(results):
        where = f"{source}: detection {i}"
        if not isinstance(r, dict):
            raise ValueError(f"{where} is not an object: {str(r)[:80]}")
        for field in ("image_id", "category_id", "score"):
            if field not in r:
                raise ValueError(f"{where} has no {field!r}")
        where += f" (image {r['image_id']})"
        if r["image_id"] not in images:
            raise ValueError(f"{where}: the image is not in the ground truth ({len(images)} images)")
        if r["category_id"] not in cats:
            raise ValueError(f"{where}: category {r['category_id']} is not in the ground truth's categories "
                             f"{sorted(cats)[:10]}{'...' if len(cats) > 10 else ''}")
        if not isinstance(r["score"], int | float) or not math.isfinite(r["score"]):
            raise ValueError(f"{where}: score {r['score']!r} is not a finite number")
        if "bbox" in iou_types or "bbox" in r:
            box = r.get("bbox")
            if not (isinstance(box, list | tuple) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
                raise ValueError(f"{where}: bbox must be [x, y, w, h], got {box!r}")
            if not all(math.isfinite(v) for v in box):
                raise ValueError(f"{where}: bbox {box} has a non-finite value")
            if box[2] < 0 or box[3] < 0:
                raise ValueError(f"{where}: bbox {box} has a negative size (COCO boxes are [x, y, width, height])")
        if "segm" in iou_types:
            seg = r.get("segmentation")
            if not isinstance(seg, dict | list) or (isinstance(seg, dict) and not {"size", "counts"} <= set(seg)):
                raise ValueError(f"{where}: a segm result needs 'segmentation' (RLE {{'size', 'counts'}} or polygons)")
    return results


def _per_category(ev: Any, coco: Any) -> dict[str, float]:
    """AP@[.5:.95] of every category (area all, maxDets 100), from ``ev.eval["precision"]``."""
    import numpy as np

    precision = ev.eval["precision"]  # (T iou, R recall, K cat, A area, M maxdets)
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[coco.cats[cat_id]["name"]] = float(np.mean(p)) if p.size else float("nan")
    return out


def evaluate_coco(
    coco: Any | str | os.PathLike,
    results: list[dict[str, Any]] | str | os.PathLike,
    iou_types: Sequence[str] = ("bbox", "segm"),
    img_ids: Sequence[int] | None = None,
    source: str | None = None,
) -> dict[str, dict[str, Any]]:
    """COCOeval of ``results`` against ``coco`` (a file or a ``COCO``) per IoU type.

    Returns:
        ``{iou_type: {"stats": {name: value} (the 12 of STAT_NAMES), "summary": the printed table,
        "per_category": {category name: AP}}}``.
    """
    from pycocotools.cocoeval import COCOeval

    from vlmoe.io import load_json

    for t in iou_types:
        if t not in IOU_TYPES:
            raise ValueError(f"unknown iou type {t!r}; choose from {IOU_TYPES}")
    if isinstance(coco, str | os.PathLike):
        coco = load_ground_truth(coco)
    else:
        check_coco_ground_truth(coco)
    if isinstance(results, str | os.PathLike):
        source = source or str(results)
        results = load_json(results)
    results = check_detection_results(results, coco, iou_types, source or "results")
    out: dict[str, dict[str, Any]] = {}
    for t in iou_types:
        dets = copy.deepcopy(results)  # loadRes writes area / id / bbox into the dicts
        if t == "bbox":
            for d in dets:
                d.pop("segmentation", None)  # loadRes would derive the boxes from the masks
        with contextlib.redirect_stdout(io.StringIO()):
            dt = coco.loadRes(dets)
            ev = COCOeval(coco, dt, t)
            if img_ids is not None:
                ev.params.imgIds = list(img_ids)
            ev.evaluate()
            ev.accumulate()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev.summarize()
        out[t] = {"stats": dict(zip(STAT_NAMES, (float(s) for s in ev.stats))), "summary": buf.getvalue(),
                  "per_category": _per_category(ev, coco)}
    return out


def format_report(scores: dict[str, dict[str, Any]]) -> str:
    """The standard 12-row summary per IoU type and a per-category AP table (markdown)."""
    lines = []
    for t, s in scores.items():
        lines += [f"== {t} ==", s["summary"].rstrip(), "", "| category | AP |", "|---|---:|"]
        lines += [f"| {name} | {ap:.4f} |" for name, ap in s["per_category"].items()]
        lines.append("")
    return "\n".join(lines)


class COCOEvaluator(Evaluator):
    """Records ``{"image_id", "detections": [results-format dicts]}``, one per image (so a sampler's
    padding duplicates count once); scores the union with :func:`evaluate_coco` over the images seen, as
    ``bbox_AP``, ``bbox_AP50``, ..., ``segm_AR_large`` (no ``/``: the names go into checkpoint file names).

    Args:
        ground_truth: an instances file or a ``COCO``.
        iou_types: ``bbox`` and / or ``segm``.
    """

    id_key = "image_id"

    def __init__(self, ground_truth: Any, iou_types: Sequence[str] = ("bbox", "segm")) -> None:
        self.coco = load_ground_truth(ground_truth) if isinstance(ground_truth, str | os.PathLike) else ground_truth
        self.iou_types = tuple(iou_types)
        super().__init__()

    def results(self) -> list[dict[str, Any]]:
        return [d for r in self.records for d in r["detections"]]

    def compute(self) -> dict[str, float]:
        dets = self.results()
        if not dets:
            return {f"{t}_AP": 0.0 for t in self.iou_types}
        scores = evaluate_coco(self.coco, dets, self.iou_types, img_ids=[r["image_id"] for r in self.records],
                               source="detections")
        out = {f"{t}_{k}": v for t, s in scores.items() for k, v in s["stats"].items()}
        out["num_images"] = float(len(self))
        return out
