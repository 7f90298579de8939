"""``vlmoe predict TASK --model DIR INPUTS...``: a model folder on the user's own images, JSON lines out.

    vlmoe predict caption --model out/caption photos/                 # every image under photos/
    vlmoe predict answer --model out/vqa img.jpg --question "what colour is the shape?"
    vlmoe predict classify --model out/cls "shots/*.png" --topk 3 --out preds.jsonl
    vlmoe predict detect --model out/det street.jpg --score-threshold 0.6

INPUTS are image files, folders (searched recursively for .jpg .jpeg .png .webp .bmp .gif .tif .tiff)
or glob patterns. Each line of the output (stdout, or ``--out FILE``, never overwritten without
``--overwrite``) is ``{"image": path, ...}`` with the task's result; images that cannot be read are
reported on stderr, skipped and counted. Detection lines carry boxes, labels and scores (masks are not
written; use ``vlmoe.load(...).detect`` for them).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "find_images", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TASKS = ("answer", "caption", "classify", "detect")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmoe predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS)
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--model", required=True, help="a `vlmoe export` folder or a training .ckpt")
    p.add_argument("--question", help="answer: the question asked of every image")
    p.add_argument("--topk", type=int, default=1, help="answer / classify: how many answers or classes")
    p.add_argument("--beam", type=int, default=3, help="caption: beam size (1: greedy)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="detect: the lowest score kept")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write JSON lines here instead of stdout")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def find_images(inputs: list[str]) -> list[Path]:
    """The image files named by ``inputs`` (files, folders searched recursively, glob patterns), in order,
    each once; an input that matches nothing is an error naming it."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            matches = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        elif p.is_file():
            matches = [p]
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
        if not matches:
            raise FileNotFoundError(f"{item}: no image file, folder with images or matching glob")
        found += matches
    seen: set[Path] = set()
    return [f for f in found if not (f.resolve() in seen or seen.add(f.resolve()))]


def main(argv: list[str] | None = None) -> dict[str, int]:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.task == "answer" and not args.question:
        raise ValueError("vlmoe predict answer needs --question")
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; choose another file or add --overwrite")
    images = find_images(args.inputs)
    from vlmoe.inference import load, open_image

    model = load(args.model, device=args.device, batch_size=args.batch_size)
    run = {
        "answer": lambda ims: model.answer(ims, args.question, topk=args.topk),
        "caption": lambda ims: [{"caption": c} for c in model.caption(ims, beam=args.beam)],
        "classify": lambda ims: model.classify(ims, topk=args.topk),
        "detect": lambda ims: [[{k: v for k, v in d.items() if k != "mask"} for d in dets]
                               for dets in model.detect(ims, score_threshold=args.score_threshold, masks=False)],
    }[args.task]
    lines: list[str] = []
    skipped = 0
    progress = _progress(len(images))
    for start in range(0, len(images), args.batch_size):
        ok, opened = [], []
        for path in images[start : start + args.batch_size]:
            try:
                opened.append(open_image(path))
                ok.append(path)
            except (OSError, ValueError) as e:
                skipped += 1
                print(f"vlmoe predict: skipped {path}: {e}", file=sys.stderr)
        if opened:
            for path, result in zip(ok, run(opened)):
                key = "predictions" if isinstance(result, list) else None
                row: dict[str, Any] = {"image": str(path), **({key: result} if key else result)}
                lines.append(json.dumps(row))
        progress(min(len(images), start + args.batch_size))
    text = "\n".join(lines) + ("\n" if lines else "")
    if args.out:
        from vlmoe.io import atomic_write_text

        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    summary = {"images": len(images), "predicted": len(lines), "skipped": skipped}
    print(f"vlmoe predict {args.task}: {len(lines)} of {len(images)} images"
          + (f", {skipped} skipped (unreadable)" if skipped else "") + (f" -> {args.out}" if args.out else ""),
          file=sys.stderr)
    return summary


def _progress(total: int):
    """A one-line progress counter on stderr for more than one batch of images (only on a terminal)."""
    if total <= 16 or not sys.stderr.isatty():
        return lambda done: None
    return lambda done: print(f"\r{done}/{total} images", end="\n" if done >= total else "", file=sys.stderr,
                              flush=True)
