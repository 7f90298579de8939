"""The demo builder: every format loads with pycocotools and with the readers; cached; deterministic."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

from vlmoe.data import build_demo
from vlmoe.data.coco import COCOCaptions, COCOInstances, KarpathyCaptions
from vlmoe.data.demo import _load_split, measure_shape
from vlmoe.data.imagenet import ImageFolderDataset
from vlmoe.data.nlvr2 import NLVR2Dataset, consistency_group
from vlmoe.data.shards import count_samples, expand_shards, stream_pipeline
from vlmoe.data.vqav2 import AnswerVocab, VQAv2Dataset

# pycocotools 2.0.11 passes copy=False to numpy 2 (its own deprecation, harmless here).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_measured_facts_agree_with_the_questions() -> None:
    facts, _ = _load_split("test")
    stated = [f for f in facts if f.shape_from_questions]
    assert len(stated) > 700
    # The shape measured from the pixels matches every shape the questions state.
    assert all(f.measured_shape == f.shape for f in stated)
    assert all(f.mask.sum() == f.area and f.area > 0 for f in facts)


def test_measure_shape_on_a_drawn_rectangle() -> None:
    img = np.full((20, 30, 3), 240, np.uint8)
    img[4:9, 10:22] = (0, 0, 255)
    m = measure_shape(img)
    assert m["bbox"] == (10, 4, 12, 5) and m["area"] == 60 and m["fill"] == 1.0
    assert m["color"] == 0x0000FF and m["background"] == 0xF0F0F0


def test_demo_is_cached_and_refuses_foreign_folders(demo, tmp_path: Path) -> None:
    start = time.perf_counter()
    again = build_demo(demo.root)
    assert time.perf_counter() - start < 0.5 and again == demo
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a vlmoe demo folder"):
        build_demo(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


def test_demo_shards(demo, tokenizer) -> None:
    for spec, n in [
        (demo.pretrain_pairs, 4000),
        (demo.pretrain_images, 4000),
        (demo.pretrain_texts, 4000),
        (demo.val_pairs, 1000),
        (demo.val_images, 1000),
        (demo.val_texts, 1000),
    ]:
        shards = expand_shards(spec)
        assert count_samples(shards) == n
    assert len(expand_shards(demo.pretrain_pairs)) >= 4  # enough for 2 ranks x 2 workers
    pairs = list(stream_pipeline(demo.val_pairs, "pair", batch_size=None, shuffle=0))
    assert len(pairs) == 1000 and pairs[0]["image"].size == (64, 64)
    assert all(p["text"].endswith(".") for p in pairs)
    texts = list(stream_pipeline(demo.val_texts, "text", batch_size=None, shuffle=0))
    assert len(texts) == 1000 and "?" in texts[0]["text"]
    images = list(stream_pipeline(demo.val_images, "image", batch_size=None, shuffle=0))
    assert {i["label"] for i in images} == {0, 1, 2}


def test_demo_vqav2(demo) -> None:
    vocab = AnswerVocab.load(demo.vqa_answers)
    assert len(vocab) == 13 and "yes" in vocab and "circle" in vocab
    ds = VQAv2Dataset(demo.vqa_val_questions, demo.coco_images, demo.vqa_val_annotations, vocab)
    assert len(ds) == 9673
    s = ds[0]
    assert s["image"].size == (64, 64) and s["vqa_targets"].sum() == 1.0
    assert vocab.answers[int(s["vqa_targets"].argmax())] == s["answers"][0]
    anns = json.loads(demo.vqa_val_annotations.read_text())["annotations"]
    assert {a["answer_type"] for a in anns} == {"yes/no", "other"}
    assert all(len(a["answers"]) == 10 for a in anns)


def test_demo_coco_loads_with_pycocotools(demo) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(demo.coco_instances_val))
    assert len(gt.getImgIds()) == 1000 and sorted(c["name"] for c in gt.loadCats(gt.getCatIds())) == [
        "circle",
        "rectangle",
        "triangle",
    ]
    anns = gt.loadAnns(gt.getAnnIds())
    assert all(a["id"] >= 1 and a["area"] > 0 for a in anns)
    # The RLE masks are the shapes: mask area equals the annotated area; boxes bound the masks.
    for a in anns[:50]:
        m = gt.annToMask(a)
        ys, xs = np.nonzero(m)
        assert m.sum() == a["area"]
        assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == a["bbox"]
    # Ground truth scored against itself: AP = 1 for boxes and masks.
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in anns
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        for iou in ("bbox", "segm"):
            ev = COCOeval(gt, dt, iou)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert ev.stats[0] == pytest.approx(1.0)
    det = COCOInstances(demo.coco_instances_val, demo.coco_images / "val2014")
    img, t = det[0]
    assert img.shape == (3, 64, 64) and t["boxes"].shape == (1, 4) and t["masks"].shape == (1, 64, 64)


def test_demo_captions(demo) -> None:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        caps = COCO(str(demo.coco_captions_val))
        test_gt = COCO(str(demo.coco_karpathy_test_gt))
    assert len(caps.getAnnIds()) == 5000 and len(test_gt.getImgIds()) == 500
    assert len(KarpathyCaptions(demo.coco_karpathy, demo.coco_images, "train")) == 4000 * 5
    val = KarpathyCaptions(demo.coco_karpathy, demo.coco_images, "val")
    assert len(val) == 500 and len(val[0]["captions"]) == 5
    assert len(KarpathyCaptions(demo.coco_karpathy, demo.coco_images, "restval")) == 500  # per image
    assert COCOCaptions(demo.coco_captions_train, demo.coco_images / "train2014")[0]["image"].size == (64, 64)


def test_demo_nlvr2(demo) -> None:
    ds = NLVR2Dataset(demo.nlvr2_dev, demo.nlvr2_images)
    train = NLVR2Dataset(demo.nlvr2_train, demo.nlvr2_images)
    assert len(train) == 10000 and len(ds) == 1000
    labels = [r["label"] for r in train.records]
    assert 0.4 < labels.count("True") / len(labels) < 0.6
    groups = {consistency_group(r["identifier"]) for r in ds.records}
    assert len(groups) == 250  # 4 image pairs per statement
    s = train[0]
    assert s["image"].size == s["image2"].size == (64, 64) and s["label"] in (0, 1)


def test_demo_imagefolders(demo) -> None:
    shape = ImageFolderDataset(demo.imagefolder_shape / "train")
    assert shape.classes == ["circle", "rectangle", "triangle"] and len(shape) == 4000
    color = ImageFolderDataset(demo.imagefolder_color_shape / "val")
    assert len(color) == 1000 and len(color.classes) == 24 and "blue_circle" in color.classes


@pytest.mark.slow
def test_demo_is_deterministic(demo, tmp_path: Path) -> None:
    other = build_demo(tmp_path / "again")
    for rel in [
        "vqav2/v2_mscoco_train2014_annotations.json",
        "coco/dataset_coco.json",
        "coco/annotations/instances_val2014.json",
        "nlvr2/train.json",
        "pretrain/train/pairs/pairs-000003.tar",
        "pretrain/val/texts/texts-000001.tar",
    ]:
        assert (demo.root / rel).read_bytes() == (other.root / rel).read_bytes(), rel


def test_default_demo_dir_follows_vlmoe_data(monkeypatch, tmp_path: Path) -> None:
    from vlmoe.data import default_demo_dir

    monkeypatch.setenv("VLMOE_DATA", str(tmp_path))
    assert default_demo_dir() == tmp_path / "demo"
    monkeypatch.delenv("VLMOE_DATA")
    assert default_demo_dir() == Path.home() / ".cache" / "vlmoe" / "demo"
