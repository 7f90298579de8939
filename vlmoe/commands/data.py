"""``vlmoe data``: build the demo data, write webdataset shards.

- ``vlmoe data demo [--out DIR]``: convert the easy-vqa package into every format (cached).
- ``vlmoe data shards --out DIR ...``: write shards (see :mod:`vlmoe.data.make_shards`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmoe data", description="Build demo data and write webdataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="convert the easy-vqa package into every format vlmoe reads (cached)")
    demo.add_argument("--out", default=None, help="target folder (default: $VLMOE_DATA/demo or ~/.cache/vlmoe/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")

    sh = sub.add_parser("shards", help="write webdataset shards from images + captions, COCO captions or texts")
    sh.add_argument("--out", required=True, help="output folder (must be empty or new, unless --overwrite)")
    sh.add_argument("--images", help="image folder (alone: image-only shards, cls from class subfolders)")
    sh.add_argument("--captions", help="captions file (.json/.jsonl/.csv/.tsv) with image paths relative to --images")
    sh.add_argument("--coco-captions", help="COCO captions JSON; file_name relative to --images")
    sh.add_argument("--texts", nargs="+", default=[], help="text files, one text per line")
    sh.add_argument("--prefix", help="shard name prefix (default: pairs / images / texts)")
    sh.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most")
    sh.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    sh.add_argument("--no-validate", action="store_true", help="do not decode images to check them")
    sh.add_argument("--overwrite", action="store_true", help="replace the shard set already in --out")
    sh.add_argument("--report", metavar="FILE", help="write the report (counts and every skipped file / line) as JSON")
    return parser


def main(argv: list[str] | None = None) -> Any:
    """Entry point of ``vlmoe data``."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from vlmoe.data.demo import build_demo

        paths = build_demo(args.out, seed=args.seed, force=args.force, verbose=True)
        width = max(len(k) for k in paths.as_dict())
        for k, v in paths.as_dict().items():
            print(f"  {k.ljust(width)}  {v}")
        return paths
    from vlmoe.data.make_shards import write_shards
    from vlmoe.io import atomic_write_json

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
        overwrite=args.overwrite,
    )
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(report["skipped"].items())) or "none"
    print(f"wrote {report['written']} {report['kind']} samples into {len(report['shards'])} shard(s) in {args.out}")
    print(f"skipped: {skipped}")
    for item in report["skipped_items"][:5]:
        line = f":{item['line']}" if "line" in item else ""
        print(f"  {item['reason']}: {item['source']}{line}")
    if len(report["skipped_items"]) > 5:
        more = len(report["skipped_items"]) - 5
        print(f"  ... and {more} more" + ("" if args.report else " (--report FILE lists them all)"))
    if args.report:
        atomic_write_json(args.report, report, indent=1)
        print(f"report: {args.report}")
    print(json.dumps(report["shards"][:3] + (["..."] if len(report["shards"]) > 3 else [])))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
