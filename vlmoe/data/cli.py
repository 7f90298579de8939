"""``vlmoe data``: build the demo data, write webdataset shards.

- ``vlmoe data demo [--out DIR]``: convert the easy-vqa package into every format (cached).
- ``vlmoe data shards --out DIR ...``: write shards from
  (a) an image folder plus a captions file (JSON / JSONL / CSV / TSV) -> image-text pairs,
  (a') an image folder alone -> images (with ``cls`` from class subfolders, if any),
  (b) a COCO captions JSON plus its image folder -> image-text pairs,
  (c) text files (one text per line) -> texts.
  Images are checked by decoding them fully; unreadable images, missing files and empty captions are
  skipped and counted in the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vlmoe.data._io import DataFormatError, decode_image, load_json, load_jsonl

__all__ = ["main", "read_captions", "write_shards"]

_IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_IMAGE_KEYS = ("image", "file_name", "filename", "file", "path", "image_path", "img")
_CAPTION_KEYS = ("caption", "text", "captions", "sentence", "raw")


def _pick(record: dict[str, Any], keys: Sequence[str], where: str, what: str) -> Any:
    for k in keys:
        if k in record:
            return record[k]
    raise DataFormatError(f"{where}: no {what} field (looked for {list(keys)}); it has {sorted(record)}")


def read_captions(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(image path, caption)`` pairs from a captions file.

    Formats: JSON (a list of objects, or ``{image: caption | [captions]}``), JSONL (one object per
    line), CSV / TSV with a header. Objects / columns name the image with one of ``image``,
    ``file_name``, ``filename``, ``file``, ``path``, ``image_path``, ``img`` and the caption with
    ``caption``, ``text``, ``captions`` (a list gives one pair per caption), ``sentence``, ``raw``.

    Args:
        path: the captions file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        records: list[Any] = rows
    elif suffix == ".jsonl":
        records = load_jsonl(path)
    elif suffix == ".json":
        data = load_json(path)
        records = [{"image": k, "caption": v} for k, v in data.items()] if isinstance(data, dict) else data
    else:
        raise ValueError(f"{path}: unknown captions format {suffix!r}; use .json, .jsonl, .csv or .tsv")
    pairs = []
    for i, r in enumerate(records):
        where = f"{path}: record {i + 1}" if suffix != ".csv" else f"{path}: row {i + 2}"
        if not isinstance(r, dict):
            raise DataFormatError(f"{where}: expected an object, got {type(r).__name__}")
        image = _pick(r, _IMAGE_KEYS, where, "image")
        caps = _pick(r, _CAPTION_KEYS, where, "caption")
        for c in caps if isinstance(caps, list) else [caps]:
            pairs.append((str(image), "" if c is None else str(c)))
    return pairs


def _coco_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    data = load_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataFormatError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    files = {int(im["id"]): im["file_name"] for im in data["images"]}
    pairs = []
    for i, a in enumerate(data["annotations"]):
        if int(a.get("image_id", -1)) not in files:
            raise DataFormatError(f"{path}: annotations[{i}] refers to image_id {a.get('image_id')} not in 'images'")
        pairs.append((files[int(a["image_id"])], a.get("caption", "")))
    return pairs


def _folder_images(root: Path) -> list[tuple[str, int | None]]:
    """Image files under ``root``; with class subfolders, ``cls`` = sorted subfolder index."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    out: list[tuple[str, int | None]] = []
    if classes:
        for c, name in enumerate(classes):
            for p in sorted((root / name).rglob("*")):
                if p.suffix.lower() in _IMAGE_SUFFIXES:
                    out.append((str(p.relative_to(root)), c))
    else:
        out = [(p.name, None) for p in sorted(root.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES]
    return out


def write_shards(
    out: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    captions: str | os.PathLike | None = None,
    coco_captions: str | os.PathLike | None = None,
    texts: Sequence[str | os.PathLike] = (),
    prefix: str | None = None,
    maxcount: int = 10000,
    maxsize: float = 1e9,
    validate: bool = True,
) -> dict[str, Any]:
    """Write shards from one source; see the module docstring for the sources.

    Args:
        out: output folder (shards ``<prefix>-000000.tar`` ... and ``sizes.json``).
        images: image folder (alone: image shards; with ``captions`` / ``coco_captions``: pair shards).
        captions: captions file, see :func:`read_captions`.
        coco_captions: COCO-format captions JSON.
        texts: text files, one text per line.
        prefix: shard name prefix (default: ``pairs``, ``images`` or ``texts``).
        maxcount: samples per shard at most.
        maxsize: bytes per shard at most.
        validate: decode every image fully and skip the unreadable ones.

    Returns:
        A report: ``{"kind", "written", "skipped": {reason: n}, "shards": [paths]}``.
    """
    from vlmoe.data.shards import ShardWriter

    skipped: Counter[str] = Counter()
    if texts:
        if images or captions or coco_captions:
            raise ValueError("give either texts or images (+ captions), not both")
        kind = "texts"

        def samples() -> Iterator[dict[str, Any]]:
            for f in texts:
                with open(f, encoding="utf-8") as fh:
                    for line in fh:
                        if not line.strip():
                            skipped["empty_text"] += 1
                            continue
                        yield {"txt": line.strip()}

    else:
        if images is None:
            raise ValueError("give --images (with --captions or --coco-captions for pairs) or --texts")
        root = Path(images)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        if captions and coco_captions:
            raise ValueError("give --captions or --coco-captions, not both")
        pairs = read_captions(captions) if captions else _coco_pairs(coco_captions) if coco_captions else None
        kind = "pairs" if pairs is not None else "images"
        items: list[tuple[str, Any]] = pairs if pairs is not None else _folder_images(root)
        if not items:
            raise ValueError(f"nothing to write: no images found in {root}" if pairs is None else "no captions")

        def samples() -> Iterator[dict[str, Any]]:
            for rel, extra in items:
                p = root / rel
                ext = _IMAGE_SUFFIXES.get(p.suffix.lower())
                if ext is None:
                    skipped["not_an_image"] += 1
                    continue
                if kind == "pairs" and not str(extra).strip():
                    skipped["empty_caption"] += 1
                    continue
                try:
                    data = p.read_bytes()
                except FileNotFoundError:
                    skipped["missing_image"] += 1
                    continue
                if validate:
                    try:
                        decode_image(data)
                    except Exception:  # noqa: BLE001 - any decoding failure means a bad image
                        skipped["corrupt_image"] += 1
                        continue
                sample: dict[str, Any] = {ext: data}
                if kind == "pairs":
                    sample["txt"] = str(extra).strip()
                    sample["json"] = {"caption": str(extra).strip(), "image": rel}
                elif extra is not None:
                    sample["cls"] = int(extra)
                yield sample

    out = Path(out)
    written = 0
    with ShardWriter(out / f"{prefix or kind}-%06d.tar", maxcount=maxcount, maxsize=maxsize) as sink:
        for sample in samples():
            sample["__key__"] = f"{written:09d}"
            sink.write(sample)
            written += 1
    if written == 0:
        raise ValueError(f"no sample was written ({dict(skipped) or 'empty input'})")
    return {
        "kind": kind,
        "written": written,
        "skipped": dict(skipped),
        "shards": [str(p) for p in sink.paths],
    }


def main(argv: list[str] | None = None) -> Any:
    """Entry point of ``vlmoe data``."""
    parser = argparse.ArgumentParser(prog="vlmoe data", description="Build demo data and write webdataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="convert the easy-vqa package into every format vlmoe reads (cached)")
    demo.add_argument("--out", default=None, help="target folder (default: $VLMOE_DATA/demo or ~/.cache/vlmoe/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")

    sh = sub.add_parser("shards", help="write webdataset shards from images + captions, COCO captions or texts")
    sh.add_argument("--out", required=True, help="output folder")
    sh.add_argument("--images", help="image folder (alone: image-only shards, cls from class subfolders)")
    sh.add_argument("--captions", help="captions file (.json/.jsonl/.csv/.tsv) with image paths relative to --images")
    sh.add_argument("--coco-captions", help="COCO captions JSON; file_name relative to --images")
    sh.add_argument("--texts", nargs="+", default=[], help="text files, one text per line")
    sh.add_argument("--prefix", help="shard name prefix (default: pairs / images / texts)")
    sh.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most")
    sh.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    sh.add_argument("--no-validate", action="store_true", help="do not decode images to check them")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from vlmoe.data.demo import build_demo

        paths = build_demo(args.out, seed=args.seed, force=args.force, verbose=True)
        width = max(len(k) for k in paths.as_dict())
        for k, v in paths.as_dict().items():
            print(f"  {k.ljust(width)}  {v}")
        return paths
    try:
        report = write_shards(
            args.out,
            images=args.images,
            captions=args.captions,
            coco_captions=args.coco_captions,
            texts=args.texts,
            prefix=args.prefix,
            maxcount=args.maxcount,
            maxsize=args.maxsize,
            validate=not args.no_validate,
        )
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"vlmoe data shards: {e}") from None
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(report["skipped"].items())) or "none"
    n_shards = len(report["shards"])
    print(f"wrote {report['written']} {report['kind']} samples into {n_shards} shard(s) in {args.out}")
    print(f"skipped: {skipped}")
    print(json.dumps(report["shards"][:3] + (["..."] if len(report["shards"]) > 3 else [])))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
