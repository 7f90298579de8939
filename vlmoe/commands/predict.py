"""``vlmoe predict METHOD --model DIR INPUTS...``: a model folder on the user's own images, JSON lines out.

    vlmoe predict caption --model out/caption photos/                 # every image under photos/
    vlmoe predict answer --model out/vqa img.jpg --question "what colour is the shape?"
    vlmoe predict classify --model out/cls "shots/*.png" --topk 3 --out preds.jsonl
    vlmoe predict detect --model out/det street.jpg --score-threshold 0.6
    vlmoe predict verify --model out/nlvr2 left/ --right right.png --sentence "both shapes are red"
    vlmoe predict rank_texts --model out/retrieval photos/ --text "a red circle" --text "a blue square"

METHOD is the prediction method of a registered task (:mod:`vlmoe.tasks.registry`; ``vlmoe predict
--help`` lists them with their options); the model must be of that task.

INPUTS are image files, folders (searched recursively for .jpg .jpeg .png .webp .bmp .gif .tif .tiff,
following links to folders) or glob patterns. Each line of the output (stdout, or ``--out FILE``, never
overwritten without ``--overwrite``, never a directory) is ``{"image": path, ...}`` with the task's
result; a path that is not valid UTF-8 is written with its undecodable bytes as ``\\xNN`` escapes
(Python's ``backslashreplace``), so the output is always valid UTF-8. Images that cannot be read or
are over PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are reported on stderr,
skipped and counted; so are the parts of a folder that cannot be searched (an unreadable folder, a
symbolic link loop, a link back into the folder being searched, a broken link named like an image).
Detection lines carry boxes, labels and scores (masks are not written; use ``vlmoe.load(...).detect``
for them).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["build_parser", "find_images", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--model", required=True, help="a `vlmoe export` folder or a training .ckpt")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write JSON lines here instead of stdout")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


_TYPES = {"text": str, "texts": str, "image": str, "int": int, "float": float}


def build_parser() -> argparse.ArgumentParser:
    """One sub-command per registered prediction method, with its task's inputs as options."""
    from vlmoe.tasks.registry import tasks

    p = argparse.ArgumentParser(prog="vlmoe predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    for spec in tasks().values():
        pred = spec.predict
        if pred is None:
            continue
        q = sub.add_parser(pred.method, help=f"{pred.help} (a {spec.name} model)",
                           description=f"{pred.help} (a {spec.name} model)")
        _common(q)
        for i in pred.inputs:
            kind = "a path" if i.kind == "image" else ""
            q.add_argument(i.option, dest=i.name, type=_TYPES[i.kind], default=None,
                           action="append" if i.kind == "texts" else "store",
                           help=f"{i.help}{' (' + kind + ')' if kind else ''}"
                           + (" (repeat the option for several)" if i.kind == "texts" else "")
                           + ("" if i.required else f" (default {i.default})"))
    return p


def display_name(path: str | os.PathLike) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 become ``\\xNN`` escapes (``ls -b`` style)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _search(folder: Path, left_out: list[str], parents: tuple[str, ...] = ()) -> Iterator[Path]:
    """The image files under ``folder`` (links to folders followed); what cannot be searched is appended to
    ``left_out`` as ``"<path>: <why>"``."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        left_out.append(f"{display_name(folder)}: cannot list this folder ({e.strerror})")
        return
    parents = (*parents, os.path.realpath(folder))
    for entry in entries:
        path = Path(entry.path)
        try:
            if entry.is_dir():  # follows a link; raises on a link loop
                if os.path.realpath(path) in parents:
                    left_out.append(f"{display_name(path)}: a link back to a folder being searched (a loop)")
                else:
                    yield from _search(path, left_out, parents)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                if entry.is_file():
                    yield path
                elif entry.is_symlink():
                    left_out.append(f"{display_name(path)}: a broken symbolic link")
        except OSError as e:
            left_out.append(f"{display_name(path)}: {e.strerror or e}")


def find_images(inputs: list[str], left_out: list[str] | None = None) -> list[Path]:
    """The image files named by ``inputs`` (files, folders searched recursively, glob patterns), in order,
    each once; an input that matches nothing is an error naming it.

    Args:
        inputs: files, folders or glob patterns.
        left_out: receives one ``"<path>: <why>"`` line per part of a folder that cannot be searched (an
            unreadable folder, a symbolic link loop, a link back into the folder, a broken image link).
    """
    left_out = [] if left_out is None else left_out
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        problems: list[str] = []
        if p.is_dir():
            matches = sorted(_search(p, problems))
        elif p.is_file():
            matches = [p]
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
        if not matches:
            why = f" ({problems[0]})" if problems else ""
            raise FileNotFoundError(f"{item}: no image file, folder with images or matching glob{why}")
        left_out += problems
        found += matches
    seen: set[Path] = set()
    return [f for f in found if not (f.resolve() in seen or seen.add(f.resolve()))]


def main(argv: list[str] | None = None) -> dict[str, int]:
    from vlmoe.tasks.registry import tasks

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    spec = next(s for s in tasks().values() if s.predict and s.predict.method == args.method)
    pred = spec.predict
    values = {}
    for i in pred.inputs:
        try:
            values[i.name] = i.check(getattr(args, i.name), name=i.option)
        except ValueError:
            if i.required and not getattr(args, i.name):
                raise ValueError(f"vlmoe predict {args.method} needs {i.option} ({i.help})") from None
            raise
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out and Path(args.out).is_dir():
        raise IsADirectoryError(f"--out {args.out} is a directory; give a file path (a directory is never replaced)")
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; choose another file or add --overwrite")
    left_out: list[str] = []
    images = find_images(args.inputs, left_out)
    for problem in left_out:
        print(f"vlmoe predict: left out {problem}", file=sys.stderr)
    from vlmoe.inference import load

    model = load(args.model, device=args.device, batch_size=args.batch_size)
    if model.task != spec.model_task:
        raise ValueError(f"{args.model}: a {model.task!r} model; vlmoe predict {args.method} needs a "
                         f"{spec.model_task} model (task {spec.name!r})")
    for i in pred.inputs:  # a second image (NLVR2's right image) is opened once, as the inputs are
        if i.kind == "image" and values[i.name] is not None:
            values[i.name] = model.open(values[i.name])
    method = getattr(model, args.method)
    lines: list[str] = []
    skipped = 0
    progress = _progress(len(images))
    for start in range(0, len(images), args.batch_size):
        ok, opened = [], []
        for path in images[start : start + args.batch_size]:
            try:
                opened.append(model.open(path))  # at most the size the model needs (see vlmoe.inference)
                ok.append(path)
            except (OSError, ValueError) as e:
                skipped += 1
                print(f"vlmoe predict: skipped {display_name(path)}: {display_name(str(e))}", file=sys.stderr)
        if opened:
            for path, result in zip(ok, method(opened, **values, **pred.cli_kwargs)):
                lines.append(json.dumps({"image": display_name(path), **pred.row(result)}))
        progress(min(len(images), start + args.batch_size))
    text = "\n".join(lines) + ("\n" if lines else "")
    if args.out:
        from vlmoe.io import atomic_write_text

        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    summary = {"images": len(images), "predicted": len(lines), "skipped": skipped, "left_out": len(left_out)}
    print(f"vlmoe predict {args.method}: {len(lines)} of {len(images)} images"
          + (f", {skipped} skipped (unreadable or too large)" if skipped else "")
          + (f", {len(left_out)} folder entries left out (see above)" if left_out else "")
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return summary


def _progress(total: int):
    """A one-line progress counter on stderr for more than one batch of images (only on a terminal)."""
    if total <= 16 or not sys.stderr.isatty():
        return lambda done: None
    return lambda done: print(f"\r{done}/{total} images", end="\n" if done >= total else "", file=sys.stderr,
                              flush=True)
