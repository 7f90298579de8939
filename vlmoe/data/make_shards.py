"""Webdataset shards from the files users have (``vlmoe data shards``).

:func:`write_shards` writes shards from
  (a) an image folder plus a captions file (JSON / JSONL / CSV / TSV) -> image-text pairs,
  (a') an image folder alone -> images (with ``cls`` from class subfolders, if any),
  (b) a COCO captions JSON plus its image folder -> image-text pairs,
  (c) text files (one text per line) -> texts.

Images are checked by decoding them fully; unreadable images, missing files, empty captions and
text lines that are not UTF-8 are skipped, counted by reason and listed (file, line) in the report.
The shards are written into a staging folder beside ``out`` and moved into place only when the whole
job has succeeded, so a failure never leaves a half-written set, and an ``out`` that already holds
files is refused unless ``overwrite`` (which removes the old shard set first).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vlmoe.data._io import DataFormatError, decode_image, load_json

__all__ = ["Skipped", "read_captions", "read_text_lines", "write_shards"]

_IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_IMAGE_KEYS = ("image", "file_name", "filename", "file", "path", "image_path", "img")
_CAPTION_KEYS = ("caption", "text", "captions", "sentence", "raw")


class Skipped:
    """Skipped inputs: counts per reason and the items (file, line) behind them."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.items: list[dict[str, Any]] = []

    def add(self, reason: str, source: str | os.PathLike, line: int | None = None) -> None:
        self.counts[reason] += 1
        item: dict[str, Any] = {"reason": reason, "source": str(source)}
        if line is not None:
            item["line"] = line
        self.items.append(item)


def read_text_lines(path: str | os.PathLike, skipped: Skipped) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each UTF-8 line of ``path`` (newline stripped); lines that are not
    valid UTF-8 are skipped into ``skipped`` (``bad_encoding``, with file and line)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                skipped.add("bad_encoding", path, lineno)


def _pick(record: dict[str, Any], keys: Sequence[str], where: str, what: str) -> Any:
    for k in keys:
        if k in record:
            return record[k]
    raise DataFormatError(f"{where}: no {what} field (looked for {list(keys)}); it has {sorted(record)}")


def read_captions(path: str | os.PathLike, skipped: Skipped | None = None) -> list[tuple[str, str]]:
    """``(image path, caption)`` pairs from a captions file.

    Formats: JSON (a list of objects, or ``{image: caption | [captions]}``), JSONL (one object per
    line), CSV / TSV with a header. Objects / columns name the image with one of ``image``,
    ``file_name``, ``filename``, ``file``, ``path``, ``image_path``, ``img`` and the caption with
    ``caption``, ``text``, ``captions`` (a list gives one pair per caption), ``sentence``, ``raw``.
    Lines that are not UTF-8 (JSONL, CSV, TSV) are skipped into ``skipped``; a JSON file that is not
    UTF-8 is an error naming its line.

    Args:
        path: the captions file.
        skipped: where skipped lines are counted (a fresh one when None).
    """
    path = Path(path)
    skipped = skipped if skipped is not None else Skipped()
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path}: no such file")
    suffix = path.suffix.lower()
    where_of: list[str] = []
    if suffix in (".csv", ".tsv"):
        lines = list(read_text_lines(path, skipped))
        if not lines:
            raise DataFormatError(f"{path}: no readable header line")
        reader = csv.DictReader((text for _, text in lines), delimiter="\t" if suffix == ".tsv" else ",")
        records: list[Any] = list(reader)
        where_of = [f"{path}: line {lineno}" for lineno, _ in lines[1:]]
    elif suffix == ".jsonl":
        records = []
        for lineno, text in read_text_lines(path, skipped):
            if not text.strip():
                continue
            try:
                records.append(json.loads(text))
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}: malformed JSON on line {lineno}, column {e.colno}: {e.msg}") from None
            where_of.append(f"{path}: line {lineno}")
    elif suffix == ".json":
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataFormatError(
                f"{path}: not UTF-8 text (line {line}, byte {e.start}); re-save it as UTF-8"
            ) from None
        data = load_json(path)
        records = [{"image": k, "caption": v} for k, v in data.items()] if isinstance(data, dict) else data
    else:
        raise ValueError(f"{path}: unknown captions format {suffix!r}; use .json, .jsonl, .csv or .tsv")
    pairs = []
    for i, r in enumerate(records):
        where = where_of[i] if i < len(where_of) else f"{path}: record {i + 1}"
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
    overwrite: bool = False,
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
        overwrite: replace the shard set (``*.tar``, ``sizes.json``) of a non-empty ``out``; other
            files there are left alone. Without it a non-empty ``out`` is refused.

    Returns:
        A report: ``{"kind", "written", "skipped": {reason: n}, "skipped_items": [{"reason",
        "source"[, "line"]}], "shards": [paths]}``.
    """
    from vlmoe.data.shards import SIZES_FILE, ShardWriter

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(
            f"--out {out} is not empty ({len(existing)} entries, e.g. {existing[:3]}); choose an empty "
            "folder, or pass --overwrite to replace the shards there (nothing was changed)"
        )
    skipped = Skipped()
    if texts:
        if images or captions or coco_captions:
            raise ValueError("give either texts or images (+ captions), not both")
        kind = "texts"
        for f in texts:
            if not Path(f).is_file():
                raise FileNotFoundError(f"--texts {f}: no such file")

        def samples() -> Iterator[dict[str, Any]]:
            for f in texts:
                for lineno, line in read_text_lines(f, skipped):
                    if not line.strip():
                        skipped.add("empty_text", f, lineno)
                        continue
                    yield {"txt": line.strip()}

    else:
        if images is None:
            raise ValueError("give --images (with --captions or --coco-captions for pairs) or --texts")
        root = Path(images)
        if not root.is_dir():
            raise FileNotFoundError(f"--images {root}: no such folder")
        if captions and coco_captions:
            raise ValueError("give --captions or --coco-captions, not both")
        pairs = (
            read_captions(captions, skipped) if captions else _coco_pairs(coco_captions) if coco_captions else None
        )
        kind = "pairs" if pairs is not None else "images"
        items: list[tuple[str, Any]] = pairs if pairs is not None else _folder_images(root)
        if not items:
            raise ValueError(f"nothing to write: no images found in {root}" if pairs is None else "no captions")

        def samples() -> Iterator[dict[str, Any]]:
            for rel, extra in items:
                p = root / rel
                ext = _IMAGE_SUFFIXES.get(p.suffix.lower())
                if ext is None:
                    skipped.add("not_an_image", p)
                    continue
                if kind == "pairs" and not str(extra).strip():
                    skipped.add("empty_caption", p)
                    continue
                try:
                    data = p.read_bytes()
                except FileNotFoundError:
                    skipped.add("missing_image", p)
                    continue
                if validate:
                    try:
                        decode_image(data)
                    except Exception:  # noqa: BLE001 - any decoding failure means a bad image
                        skipped.add("corrupt_image", p)
                        continue
                sample: dict[str, Any] = {ext: data}
                if kind == "pairs":
                    sample["txt"] = str(extra).strip()
                    sample["json"] = {"caption": str(extra).strip(), "image": rel}
                elif extra is not None:
                    sample["cls"] = int(extra)
                yield sample

    # Everything goes to a staging folder beside `out`; `out` changes only once the job succeeded.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    written = 0
    name = prefix or kind
    try:
        with ShardWriter(staging / f"{name}-%06d.tar", maxcount=maxcount, maxsize=maxsize) as sink:
            for sample in samples():
                sample["__key__"] = f"{written:09d}"
                sink.write(sample)
                written += 1
        if written == 0:
            raise ValueError(f"no sample was written ({dict(skipped.counts) or 'empty input'})")
        if out.is_dir():
            for old in out.iterdir():  # --overwrite: the old shard set goes first (no stale shard stays)
                if old.is_file() and (old.suffix == ".tar" or old.name == SIZES_FILE):
                    old.unlink()
            for new in staging.iterdir():
                os.replace(new, out / new.name)
            staging.rmdir()
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "kind": kind,
        "written": written,
        "skipped": dict(skipped.counts),
        "skipped_items": skipped.items,
        "shards": [str(out / p.name) for p in sink.paths],
    }
