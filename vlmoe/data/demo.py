"""Demo data: the ``easy-vqa`` package's real images and questions in every format vlmoe reads.

easy-VQA ships 4,000 train and 1,000 test 64 x 64 PNG images, each showing one shape (circle,
rectangle, triangle) in one of 8 colours on a light background, and 48k questions about them with
13 possible answers. :func:`build_demo` turns them into:

- pretraining shards (img2dataset layout) for the three streams, train and val:
  image-text pairs (``jpg`` + ``txt`` caption + ``json``), images (``jpg`` + ``cls`` = shape id),
  texts (``txt``: the image's questions followed by their answers);
- VQAv2 files: ``v2_OpenEnded_mscoco_{train,val}2014_questions.json``,
  ``v2_mscoco_{train,val}2014_annotations.json`` (easy-VQA has one answer per question; it is
  given as all 10 annotator answers) and ``answer2label.txt``;
- COCO: images as ``coco/{train,val}2014/COCO_<split>_<id:012d>.jpg``, a Karpathy-style
  ``dataset_coco.json`` (train / restval from the train images, val / test from the test images),
  COCO-format ``captions_{train,val}2014.json`` and Karpathy ``val`` / ``test`` ground-truth files,
  ``instances_{train,val}2014.json`` with boxes, areas and RLE masks *measured from the pixels*;
- NLVR2: ``nlvr2/{train,dev,test1}.json`` (JSON lines) with true/false statements about two images,
  four image pairs per statement (so the consistency metric is meaningful; 10,000 training examples,
  1,000 in dev and in test1), images as ``nlvr2/images/<split>/[<dir>/]<prefix>-img{0,1}.png`` (hard
  links to one file per easy-vqa image where the filesystem allows);
- ImageFolders: ``imagefolder/shape/{train,val}/<shape>/`` and
  ``imagefolder/color_shape/{train,val}/<color>_<shape>/``.

Facts behind captions and statements: the shape and colour are taken from the image's own
questions when they state them and otherwise measured (colour: the shape's exact RGB matched to the
palette those questions reveal; shape: how much of its bounding box the shape fills); position and
size are measured from the shape's mask (pixels far from the background colour).

The build is deterministic (fixed seed, fixed tar metadata), takes seconds, writes into a temporary
folder renamed into place, and is cached: a second call finds the stamp file and returns at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmoe.data.shards import ShardWriter
from vlmoe.io import atomic_write_json, atomic_write_text

__all__ = ["DEMO_VERSION", "DemoPaths", "ImageFacts", "build_demo", "default_demo_dir", "measure_shape"]

DEMO_VERSION = 2

# NLVR2 statements per split, each over 4 image pairs: 10,000 training examples (a two-image
# comparison needs thousands to be learnt), 1,000 in dev and in test1
NLVR2_SETS = {"train": 2500, "dev": 250, "test1": 250}
STAMP = ".vlmoe-demo.json"
SHAPES = ("circle", "rectangle", "triangle")  # category ids 1, 2, 3 and cls 0, 1, 2
SHARD_SIZE = 500  # samples per pretraining shard: 8 train shards per stream (>= 2 ranks x 2 workers)


def default_demo_dir() -> Path:
    """``$VLMOE_DATA/demo`` if ``VLMOE_DATA`` is set, else ``~/.cache/vlmoe/demo``."""
    root = os.environ.get("VLMOE_DATA")
    return Path(root).expanduser() / "demo" if root else Path.home() / ".cache" / "vlmoe" / "demo"


@dataclass(frozen=True)
class DemoPaths:
    """Where :func:`build_demo` put each dataset (absolute paths; shard entries are brace patterns)."""

    root: Path
    # pretraining shards
    pretrain_pairs: str
    pretrain_images: str
    pretrain_texts: str
    val_pairs: str
    val_images: str
    val_texts: str
    # VQAv2
    vqa_train_questions: Path
    vqa_train_annotations: Path
    vqa_val_questions: Path
    vqa_val_annotations: Path
    vqa_answers: Path
    # COCO (images under coco_images/{train2014,val2014})
    coco_images: Path
    coco_karpathy: Path
    coco_captions_train: Path
    coco_captions_val: Path
    coco_karpathy_val_gt: Path
    coco_karpathy_test_gt: Path
    coco_instances_train: Path
    coco_instances_val: Path
    # NLVR2
    nlvr2_images: Path
    nlvr2_train: Path
    nlvr2_dev: Path
    nlvr2_test: Path
    # ImageFolders (each with train/ and val/)
    imagefolder_shape: Path
    imagefolder_color_shape: Path

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def _paths(root: Path, shard_counts: dict[str, int]) -> DemoPaths:
    def pattern(split: str, stream: str) -> str:
        n = shard_counts[f"{split}/{stream}"]
        last = f"{n - 1:06d}"
        names = f"{{000000..{last}}}" if n > 1 else "000000"
        return str(root / "pretrain" / split / stream / f"{stream}-{names}.tar")

    ann = root / "coco" / "annotations"
    vqa = root / "vqav2"
    return DemoPaths(
        root=root,
        pretrain_pairs=pattern("train", "pairs"),
        pretrain_images=pattern("train", "images"),
        pretrain_texts=pattern("train", "texts"),
        val_pairs=pattern("val", "pairs"),
        val_images=pattern("val", "images"),
        val_texts=pattern("val", "texts"),
        vqa_train_questions=vqa / "v2_OpenEnded_mscoco_train2014_questions.json",
        vqa_train_annotations=vqa / "v2_mscoco_train2014_annotations.json",
        vqa_val_questions=vqa / "v2_OpenEnded_mscoco_val2014_questions.json",
        vqa_val_annotations=vqa / "v2_mscoco_val2014_annotations.json",
        vqa_answers=vqa / "answer2label.txt",
        coco_images=root / "coco",
        coco_karpathy=root / "coco" / "dataset_coco.json",
        coco_captions_train=ann / "captions_train2014.json",
        coco_captions_val=ann / "captions_val2014.json",
        coco_karpathy_val_gt=ann / "coco_karpathy_val_gt.json",
        coco_karpathy_test_gt=ann / "coco_karpathy_test_gt.json",
        coco_instances_train=ann / "instances_train2014.json",
        coco_instances_val=ann / "instances_val2014.json",
        nlvr2_images=root / "nlvr2" / "images",
        nlvr2_train=root / "nlvr2" / "train.json",
        nlvr2_dev=root / "nlvr2" / "dev.json",
        nlvr2_test=root / "nlvr2" / "test1.json",
        imagefolder_shape=root / "imagefolder" / "shape",
        imagefolder_color_shape=root / "imagefolder" / "color_shape",
    )


# ------------------------------------------------------------------------------------ measurement
@dataclass
class ImageFacts:
    """What one easy-VQA image shows."""

    index: int  # easy-VQA image id within its split
    split: str  # "train" or "test"
    png: bytes  # the original file
    shape: str
    color: str
    bbox: tuple[int, int, int, int]  # x, y, w, h in pixels
    area: int  # mask pixels
    mask: np.ndarray  # (H, W) bool
    size: str  # small / medium / large
    position: str  # e.g. "top left", "center"
    shape_from_questions: bool  # the shape was stated by a question (else measured)
    measured_shape: str  # the shape measured from the pixels, for checks


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int64 0xRRGGBB, so colours compare and count as scalars."""
    a = rgb.astype(np.int64)
    return (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]


def _unpack(c: int) -> np.ndarray:
    return np.array([(c >> 16) & 255, (c >> 8) & 255, c & 255], dtype=np.int64)


def measure_shape(rgb: np.ndarray) -> dict[str, Any]:
    """Background colour, shape colour and shape mask of an easy-VQA style image.

    The background is the most common colour on the border; the shape colour is the most common
    other colour (the flat fill; anti-aliased edge pixels are blends). A pixel belongs to the shape
    when it is closer to the shape colour than to the background (L1 distance, halfway threshold),
    so edge pixels count by majority coverage.

    Args:
        rgb: ``(H, W, 3)`` uint8 image.

    Returns:
        ``{"background", "color" (0xRRGGBB ints), "mask" (H, W) bool, "bbox" (x, y, w, h), "area",
        "fill" (area / bbox area), "centroid" (x, y)}``.
    """
    packed = _pack(rgb)
    border = np.concatenate([packed[0], packed[-1], packed[:, 0], packed[:, -1]])
    vals, counts = np.unique(border, return_counts=True)
    bg = int(vals[counts.argmax()])
    vals, counts = np.unique(packed[packed != bg], return_counts=True)
    if vals.size == 0:
        raise ValueError("image has a single colour: no shape to measure")
    fg = int(vals[counts.argmax()])
    dist = np.abs(rgb.astype(np.int64) - _unpack(bg)).sum(-1)  # (H, W) L1 distance to background
    mask = dist * 2 > int(np.abs(_unpack(fg) - _unpack(bg)).sum())
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    w, h = int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1
    area = int(mask.sum())
    return {
        "background": bg,
        "color": fg,
        "mask": mask,
        "bbox": (x0, y0, w, h),
        "area": area,
        "fill": area / (w * h),
        "centroid": (float(xs.mean()), float(ys.mean())),
    }


def classify_fill(fill: float) -> str:
    """Shape from the fraction of its bounding box it covers: ~1/2 triangle, ~pi/4 circle, ~1 rectangle."""
    return "triangle" if fill < 0.69 else "circle" if fill < 0.94 else "rectangle"


def _position(cx: float, cy: float, width: int, height: int) -> str:
    row = ("top", "middle", "bottom")[min(2, int(3 * cy / height))]
    col = ("left", "center", "right")[min(2, int(3 * cx / width))]
    if row == "middle":
        return "center" if col == "center" else col
    return row if col == "center" else f"{row} {col}"


def _size(area_fraction: float) -> str:
    return "small" if area_fraction < 0.06 else "medium" if area_fraction < 0.12 else "large"


def _load_split(split: str) -> tuple[list[ImageFacts], list[tuple[str, str, int]]]:
    import easy_vqa

    if split == "train":
        questions, image_paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    else:
        questions, image_paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    qa = list(zip(*questions))  # [(question, answer, image id)]
    colors = [a for a in easy_vqa.get_answers() if a not in SHAPES and a not in ("yes", "no")]
    stated_shape: dict[int, str] = {}
    stated_color: dict[int, str] = {}
    for _, answer, i in qa:
        if answer in SHAPES:
            stated_shape[i] = answer
        elif answer in colors:
            stated_color[i] = answer
    measured = {}
    for i in sorted(image_paths):
        png = Path(image_paths[i]).read_bytes()
        with Image.open(io.BytesIO(png)) as im:
            rgb = np.asarray(im.convert("RGB"))
        measured[i] = (png, rgb.shape, measure_shape(rgb))
    # The palette as the questions reveal it: exact fill colour -> name.
    palette: dict[int, str] = {}
    for i, name in stated_color.items():
        palette.setdefault(measured[i][2]["color"], name)
    facts = []
    for i, (png, hw, m) in measured.items():
        color = stated_color.get(i)
        if color is None:  # nearest named colour of the palette
            c = _unpack(m["color"])
            color = min(palette.items(), key=lambda kv: int(np.abs(_unpack(kv[0]) - c).sum()))[1]
        shape_m = classify_fill(m["fill"])
        h, w = hw[:2]
        facts.append(
            ImageFacts(
                index=i,
                split=split,
                png=png,
                shape=stated_shape.get(i, shape_m),
                color=color,
                bbox=m["bbox"],
                area=m["area"],
                mask=m["mask"],
                size=_size(m["area"] / (h * w)),
                position=_position(*m["centroid"], w, h),
                shape_from_questions=i in stated_shape,
                measured_shape=shape_m,
            )
        )
    return facts, qa


# ------------------------------------------------------------------------------------ text makers
def captions(f: ImageFacts) -> list[str]:
    """Five captions stating the image's facts (COCO has five per image)."""
    where = "the center" if f.position == "center" else f"the {f.position}"
    return [
        f"a {f.color} {f.shape} on a light background.",
        f"a {f.size} {f.color} {f.shape} in {where} of the image.",
        f"there is one {f.color} {f.shape} in this picture.",
        f"the image shows a {f.shape} that is {f.color}.",
        f"a {f.size} {f.shape} colored {f.color}, placed in {where}.",
    ]


def _statement(rng: random.Random, a: ImageFacts, b: ImageFacts) -> tuple[str, Any]:
    """A statement template (with parameters drawn from the pair a, b) and its truth function."""
    kind = rng.randrange(6)
    if kind == 0:
        side, f = rng.choice([("left", 0), ("right", 1)])
        ref = (a, b)[f]
        return (
            f"the {side} image contains a {ref.color} {ref.shape}.",
            lambda x, y, s=ref.shape, c=ref.color, k=f: (x, y)[k].shape == s and (x, y)[k].color == c,
        )
    if kind == 1:
        s = rng.choice([a.shape, b.shape])
        return f"both images contain a {s}.", lambda x, y, s=s: x.shape == s and y.shape == s
    if kind == 2:
        return "the two shapes are the same color.", lambda x, y: x.color == y.color
    if kind == 3:
        return "the two images show the same kind of shape.", lambda x, y: x.shape == y.shape
    if kind == 4:
        c = rng.choice([a.color, b.color])
        return (
            f"exactly one image contains a {c} shape.",
            lambda x, y, c=c: (x.color == c) != (y.color == c),
        )
    return (
        "the shape in the left image is bigger than the shape in the right image.",
        lambda x, y: x.area > y.area,
    )


def _nlvr2_examples(
    rng: random.Random, facts: list[ImageFacts], split: str, num_sets: int, pairs_per_set: int = 4
) -> Iterator[tuple[dict[str, Any], ImageFacts, ImageFacts]]:
    """Statements, each over ``pairs_per_set`` image pairs, half true and half false when possible."""
    for s in range(num_sets):
        a, b = rng.sample(facts, 2)
        sentence, truth = _statement(rng, a, b)
        wanted = [True, False] * (pairs_per_set // 2) + [True] * (pairs_per_set % 2)
        rng.shuffle(wanted)
        for p, want in enumerate(wanted):
            for _ in range(200):  # rejection sampling for the wanted label
                x, y = rng.sample(facts, 2)
                if truth(x, y) == want:
                    break
            ident = f"{split}-{s}-{p}-0"
            row = {
                "identifier": ident,
                "sentence": sentence,
                "label": str(bool(truth(x, y))),
                "left_url": f"easy-vqa:{x.split}/{x.index}.png",
                "right_url": f"easy-vqa:{y.split}/{y.index}.png",
                "writer": "demo",
                "synset": x.shape,
                "query": sentence,
            }
            if split == "train":
                row["directory"] = str(s % 100)
            yield row, x, y


_QUESTION_TYPES = (
    "what color is the",
    "what is the color of the",
    "what shape is",
    "what shape does",
    "what is the",
    "is there a",
    "is there not a",
    "is there",
    "does the image contain",
    "does the image not contain",
    "does the image",
    "is no",
    "is a",
    "is",
)


def _question_type(q: str) -> str:
    return next((t for t in _QUESTION_TYPES if q.startswith(t + " ")), "none of the above")


# ------------------------------------------------------------------------------------------ build
def _jpeg(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")}


@dataclass
class _Split:
    """What every demo artefact is written from: easy-vqa's images with their measured facts and their
    questions, the COCO-style ids and the JPEG files every format shares."""

    train: list[ImageFacts]
    test: list[ImageFacts]
    train_qa: list[tuple[str, str, int]]
    test_qa: list[tuple[str, str, int]]
    image_id: dict[tuple[str, int], int]
    coco_files: dict[tuple[str, int], Path] = field(default_factory=dict)
    jpegs: dict[tuple[str, int], bytes] = field(default_factory=dict)

    COCO_SPLIT = {"train": "train2014", "test": "val2014"}


def _build(root: Path, seed: int) -> dict[str, int]:
    """Write every demo artefact under ``root`` (one random stream, ``seed``, drawn in this order)."""
    rng = random.Random(seed)
    train, train_qa = _load_split("train")
    test, test_qa = _load_split("test")
    # COCO-style ids: unique across splits, >= 1.
    image_id = {("train", f.index): f.index + 1 for f in train}
    image_id.update({("test", f.index): 100_000 + f.index + 1 for f in test})
    data = _Split(train, test, train_qa, test_qa, image_id)
    _write_coco_images(root, data)
    shard_counts = _write_pretraining_shards(root, data, rng)
    paths = _paths(root, shard_counts)
    _write_vqav2(paths, data)
    _write_coco_annotations(paths, data)
    _write_nlvr2(root, paths, data, rng)
    _write_imagefolders(paths, data)
    return shard_counts


def _write_coco_images(root: Path, data: _Split) -> None:
    """The images as COCO ships them (JPEG, ``COCO_<split>_<id>.jpg``)."""
    for sub in data.COCO_SPLIT.values():
        (root / "coco" / sub).mkdir(parents=True)
    for f in data.train + data.test:
        sub = data.COCO_SPLIT[f.split]
        p = root / "coco" / sub / f"COCO_{sub}_{data.image_id[(f.split, f.index)]:012d}.jpg"
        data.jpegs[(f.split, f.index)] = _jpeg(f.png)
        p.write_bytes(data.jpegs[(f.split, f.index)])
        data.coco_files[(f.split, f.index)] = p


def _write_pretraining_shards(root: Path, data: _Split, rng: random.Random) -> dict[str, int]:
    """The webdataset shards of the three pretraining streams (img2dataset's layout); shards per stream."""
    shard_counts: dict[str, int] = {}
    shard_counts: dict[str, int] = {}
    for split, facts, qa in (("train", data.train, data.train_qa), ("val", data.test, data.test_qa)):
        by_image: dict[int, list[str]] = {}
        for q, a, i in qa:
            by_image.setdefault(i, []).append(f"{q} {a}.")
        streams = {"pairs": [], "images": [], "texts": []}
        for n, f in enumerate(facts):
            key = f"{n // 10_000:05d}{n % 10_000:04d}"  # img2dataset's 9-digit keys
            jpg = data.jpegs[(f.split, f.index)]
            caption = rng.choice(captions(f))
            height, width = f.mask.shape
            streams["pairs"].append(
                {
                    "__key__": key,
                    "jpg": jpg,
                    "txt": caption,
                    "json": {
                        "key": key,
                        "caption": caption,
                        "status": "success",
                        "error_message": None,
                        "url": f"easy-vqa:{f.split}/{f.index}.png",
                        "width": width,
                        "height": height,
                        "original_width": width,
                        "original_height": height,
                        "shape": f.shape,
                        "color": f.color,
                    },
                }
            )
            streams["images"].append({"__key__": key, "jpg": jpg, "cls": SHAPES.index(f.shape)})
            qs = by_image.get(f.index, [])
            rng.shuffle(qs)
            streams["texts"].append({"__key__": key, "txt": " ".join(qs) or caption})
        for stream, samples in streams.items():
            folder = root / "pretrain" / split / stream
            with ShardWriter(folder / f"{stream}-%06d.tar", maxcount=SHARD_SIZE) as sink:
                for s in samples:
                    sink.write(s)
            shard_counts[f"{split}/{stream}"] = len(sink.paths)

    return shard_counts


def _write_vqav2(paths: DemoPaths, data: _Split) -> None:
    """easy-vqa's questions as VQAv2 question and annotation files (10 identical human answers each)."""
    for split, qa in (("train", data.train_qa), ("test", data.test_qa)):
        sub = data.COCO_SPLIT[split]
        questions, annotations, per_image = [], [], {}
        for q, a, i in qa:
            k = per_image[i] = per_image.get(i, -1) + 1
            iid = data.image_id[(split, i)]
            qid = iid * 100 + k
            questions.append({"image_id": iid, "question": q, "question_id": qid})
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": iid,
                    "question_type": _question_type(q),
                    "answer_type": "yes/no" if a in ("yes", "no") else "other",
                    "multiple_choice_answer": a,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)],
                }
            )
        info = {"description": "easy-VQA in VQAv2 format (vlmoe demo)", "version": "2.0"}
        qfile = paths.vqa_train_questions if split == "train" else paths.vqa_val_questions
        afile = paths.vqa_train_annotations if split == "train" else paths.vqa_val_annotations
        atomic_write_json(
            qfile,
            {
                "info": info,
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "license": {},
                "data_subtype": sub,
                "questions": questions,
            },
        )
        atomic_write_json(afile, {"info": info, "license": {}, "data_subtype": sub, "annotations": annotations})
    from vlmoe.data.vqav2 import AnswerVocab

    AnswerVocab.from_counts(Counter(a for _, a, _ in data.train_qa + data.test_qa), min_count=1).save(paths.vqa_answers)


def _write_coco_annotations(paths: DemoPaths, data: _Split) -> None:
    """COCO caption and instance files and the Karpathy split file (with its ground-truth files)."""
    karpathy, sentid = [], 0
    for split, facts in (("train", data.train), ("test", data.test)):
        sub = data.COCO_SPLIT[split]
        images, cap_anns, inst_anns = [], [], []
        for n, f in enumerate(facts):
            iid = data.image_id[(split, f.index)]
            fname = data.coco_files[(split, f.index)].name
            h, w = f.mask.shape
            images.append({"id": iid, "file_name": fname, "width": w, "height": h, "license": 0})
            caps = captions(f)
            for c in caps:
                cap_anns.append({"image_id": iid, "id": len(cap_anns) + 1, "caption": c})
            inst_anns.append(
                {
                    "id": len(inst_anns) + 1,
                    "image_id": iid,
                    "category_id": SHAPES.index(f.shape) + 1,
                    "bbox": [float(v) for v in f.bbox],
                    "area": float(f.area),
                    "iscrowd": 0,
                    "segmentation": _rle(f.mask),
                }
            )
            if split == "train":
                ksplit = "train" if n < int(0.875 * len(facts)) else "restval"
            else:
                ksplit = "val" if n < len(facts) // 2 else "test"
            sents = []
            for c in caps:
                sents.append(
                    {
                        "tokens": c.rstrip(".").replace(",", "").split(),
                        "raw": c,
                        "imgid": len(karpathy),
                        "sentid": sentid,
                    }
                )
                sentid += 1
            karpathy.append(
                {
                    "filepath": sub,
                    "filename": fname,
                    "imgid": len(karpathy),
                    "split": ksplit,
                    "sentences": sents,
                    "cocoid": iid,
                    "sentids": [s["sentid"] for s in sents],
                }
            )
        info = {"description": "easy-VQA in COCO format (vlmoe demo)", "version": "1.0", "year": 2014}
        categories = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
        licenses = [{"id": 0, "name": "see the easy-vqa package", "url": ""}]
        cap_file = paths.coco_captions_train if split == "train" else paths.coco_captions_val
        inst_file = paths.coco_instances_train if split == "train" else paths.coco_instances_val
        atomic_write_json(
            cap_file,
            {
                "info": info,
                "licenses": licenses,
                "type": "captions",
                "images": images,
                "annotations": cap_anns,
            },
        )
        atomic_write_json(
            inst_file,
            {
                "info": info,
                "licenses": licenses,
                "images": images,
                "annotations": inst_anns,
                "categories": categories,
            },
        )
    atomic_write_json(paths.coco_karpathy, {"images": karpathy, "dataset": "coco"})
    from vlmoe.data.coco import _karpathy_gt

    atomic_write_json(paths.coco_karpathy_val_gt, _karpathy_gt(karpathy, "val"))
    atomic_write_json(paths.coco_karpathy_test_gt, _karpathy_gt(karpathy, "test"))


def _write_nlvr2(root: Path, paths: DemoPaths, data: _Split, rng: random.Random) -> None:
    """NLVR2 statements over pairs of easy-vqa images; each pair's images are hard links to one PNG per
    easy-vqa image (NLVR2 names every pair's files)."""
    pool = root / ".nlvr2_pool"
    pool.mkdir()
    pooled: dict[tuple[str, int], Path] = {}

    def pooled_png(f: ImageFacts) -> Path:
        if (f.split, f.index) not in pooled:
            pooled[(f.split, f.index)] = pool / f"{f.split}_{f.index}.png"
            pooled[(f.split, f.index)].write_bytes(f.png)
        return pooled[(f.split, f.index)]

    half = len(data.test) // 2
    for split, facts, num_sets in (
        ("train", data.train, NLVR2_SETS["train"]),
        ("dev", data.test[:half], NLVR2_SETS["dev"]),
        ("test1", data.test[half:], NLVR2_SETS["test1"]),
    ):
        rows = []
        for row, x, y in _nlvr2_examples(rng, facts, split, num_sets):
            folder = paths.nlvr2_images / split / row.get("directory", "")
            prefix = row["identifier"].rsplit("-", 1)[0]
            _link_or_copy(pooled_png(x), folder / f"{prefix}-img0.png")
            _link_or_copy(pooled_png(y), folder / f"{prefix}-img1.png")
            rows.append(json.dumps(row))
        target = {"train": paths.nlvr2_train, "dev": paths.nlvr2_dev, "test1": paths.nlvr2_test}[split]
        atomic_write_text(target, "\n".join(rows) + "\n")
    shutil.rmtree(pool)


def _write_imagefolders(paths: DemoPaths, data: _Split) -> None:
    """Image folders by shape and by colour + shape (hard links to the COCO-layout JPEGs where the
    filesystem allows)."""
    for split, facts in (("train", data.train), ("val", data.test)):
        for f in facts:
            src = data.coco_files[(f.split, f.index)]
            name = f"{f.split}_{f.index:05d}.jpg"
            _link_or_copy(src, paths.imagefolder_shape / split / f.shape / name)
            _link_or_copy(src, paths.imagefolder_color_shape / split / f"{f.color}_{f.shape}" / name)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock so concurrent processes (DDP ranks) build once and the others wait."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_stamp(root: Path, seed: int) -> dict[str, Any] | None:
    try:
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if stamp.get("version") != DEMO_VERSION or stamp.get("seed") != seed:
        return None
    return stamp


def build_demo(
    out_dir: str | os.PathLike | None = None, seed: int = 0, force: bool = False, verbose: bool = False
) -> DemoPaths:
    """Build (or find, if already built) the demo datasets.

    Args:
        out_dir: target folder (default :func:`default_demo_dir`). It must not exist, be empty, or
            hold a previous demo build; any other folder is refused, never overwritten.
        seed: seed of every random choice.
        force: rebuild even if a complete build is there.
        verbose: print what was done and how long it took.

    Returns:
        The :class:`DemoPaths` of every dataset.
    """
    root = Path(out_dir).expanduser().resolve() if out_dir else default_demo_dir()
    stamp = None if force else _read_stamp(root, seed)
    if stamp is not None:
        return _paths(root, stamp["shards"])
    with _lock(root.parent / f".{root.name}.lock"):
        stamp = None if force else _read_stamp(root, seed)  # another process may have built it
        if stamp is not None:
            return _paths(root, stamp["shards"])
        if root.exists() and any(root.iterdir()) and not (root / STAMP).exists():
            raise FileExistsError(
                f"{root} exists and is not a vlmoe demo folder; choose another --out (nothing was changed)"
            )
        start = time.perf_counter()
        tmp = root.parent / f".{root.name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            shards = _build(tmp, seed)
            atomic_write_json(
                tmp / STAMP,
                {"version": DEMO_VERSION, "seed": seed, "shards": shards, "source": "easy-vqa"},
                indent=1,
            )
            if root.exists():
                shutil.rmtree(root)  # an empty folder or an outdated demo build (checked above)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if verbose:
            print(f"built the demo data in {root} ({time.perf_counter() - start:.1f} s)")
        return _paths(root, shards)
