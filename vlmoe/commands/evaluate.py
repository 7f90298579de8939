"""``vlmoe evaluate``: score a results file with the official protocol (no model is built).

    vlmoe evaluate coco --annotations instances_val2017.json --results results.json [--iou-type bbox segm]
    vlmoe evaluate captions --annotations coco_karpathy_test_gt.json --results captions.json
    vlmoe evaluate segmentation --annotations ADEChallengeData2016/annotations/validation \
        --predictions preds/ --num-classes 150 --reduce-zero-label

``coco`` prints pycocotools' 12-row summary per IoU type and a per-category AP table; ``captions``
the COCO caption toolkit's BLEU-1..4 / METEOR / ROUGE-L / CIDEr; ``segmentation`` mIoU / aAcc / mAcc
over a folder of prediction PNGs matched by name to the label PNGs (areas summed over the whole set,
:mod:`vlmoe.metrics.segmentation`). ``--json FILE`` also writes the
numbers (refusing to overwrite an existing file unless ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmoe evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    coco = sub.add_parser("coco", help="COCO detection / instance segmentation results (COCOeval)")
    coco.add_argument("--annotations", required=True, help="ground truth: instances_*.json")
    coco.add_argument("--results", required=True, help="results: [{image_id, category_id, bbox, score, ...}]")
    coco.add_argument("--iou-type", nargs="+", default=["bbox"], choices=["bbox", "segm"])
    caps = sub.add_parser("captions", help="COCO-format caption results (the COCO caption toolkit)")
    caps.add_argument("--annotations", required=True, help="ground truth: COCO-format captions file")
    caps.add_argument("--results", required=True, help="results: [{image_id, caption}]")
    caps.add_argument("--tokenizer", default="auto", choices=["auto", "ptb", "python"])
    seg = sub.add_parser("segmentation", help="semantic segmentation label PNGs (mIoU / aAcc / mAcc)")
    seg.add_argument("--annotations", required=True, help="ground truth: a folder of label PNGs")
    seg.add_argument("--predictions", required=True, help="a folder of prediction PNGs, named as the labels")
    seg.add_argument("--num-classes", type=int, required=True, help="classes (ADE20K: 150)")
    seg.add_argument("--reduce-zero-label", action="store_true",
                     help="both folders use ADE20K's numbering: 1..N, 0 = other (not evaluated)")
    for q in (coco, caps, seg):
        q.add_argument("--json", help="also write the numbers to this file")
        q.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
        q.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.json and Path(args.json).exists() and not args.overwrite:
        raise FileExistsError(f"--json {args.json} exists; choose another file or add --overwrite")
    if args.what == "segmentation":
        from vlmoe.metrics.segmentation import score_folders

        if args.num_classes < 1:
            raise ValueError(f"--num-classes must be >= 1, got {args.num_classes}")
        out = score_folders(args.annotations, args.predictions, args.num_classes,
                            reduce_zero=args.reduce_zero_label)
        print("\n".join(f"{k:>9}: {v:.4f}" for k, v in out.items() if not k.startswith("IoU/")))
        return _write(args, out)
    for name in ("annotations", "results"):
        if not Path(getattr(args, name)).is_file():
            raise FileNotFoundError(f"--{name} {getattr(args, name)}: no such file")
    if args.what == "coco":
        from vlmoe.metrics.coco import evaluate_coco, format_report

        scores = evaluate_coco(args.annotations, args.results, args.iou_type)
        print(format_report(scores))
        out: dict[str, Any] = {t: {"stats": s["stats"], "per_category": s["per_category"]} for t, s in scores.items()}
    else:
        from vlmoe.metrics.captioning import CaptionEvaluator

        out = CaptionEvaluator.score_file(args.results, args.annotations, tokenizer=args.tokenizer)
        print("\n".join(f"{k:>9}: {v:.4f}" for k, v in out.items()))
    return _write(args, out)


def _write(args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    if args.json:
        from vlmoe.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
