"""Readers on tiny files written in the official schemas; clear errors on broken input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.utils import easy_vqa_pngs, to_jpeg
from vlmoe.data._io import DataFormatError, load_json, load_jsonl
from vlmoe.data.coco import COCOCaptions, COCOInstances, KarpathyCaptions, karpathy_to_coco, load_coco
from vlmoe.data.imagenet import ImageFolderDataset, class_names
from vlmoe.data.nlvr2 import NLVR2Dataset, consistency_group, image_prefix
from vlmoe.data.transforms import build_transform
from vlmoe.data.vqav2 import AnswerVocab, VQAv2Dataset, coco_image_path

# pycocotools 2.0.11 passes copy=False to numpy 2 (its own deprecation, harmless here).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _coco_images(root: Path, subtype: str, ids: list[int]) -> None:
    for iid, png in zip(ids, easy_vqa_pngs(len(ids))):
        p = coco_image_path(root, subtype, iid)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(to_jpeg(png))


def _answers(*pairs: tuple[str, int]) -> list[dict]:
    out = []
    for a, n in pairs:
        out += [{"answer": a, "answer_confidence": "yes", "answer_id": len(out) + k + 1} for k in range(n)]
    return out


@pytest.fixture
def vqa_files(tmp_path: Path) -> dict[str, Path]:
    _coco_images(tmp_path / "coco", "val2014", [42, 7])
    qs = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "license": {},
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 42, "question": "How many dogs?", "question_id": 420},
            {"image_id": 42, "question": "What color?", "question_id": 421},
            {"image_id": 7, "question": "Is it sunny?", "question_id": 70},
        ],
    }
    anns = {
        "info": {},
        "license": {},
        "data_subtype": "val2014",
        "annotations": [
            {
                "question_id": 420,
                "image_id": 42,
                "question_type": "how many",
                "answer_type": "number",
                "multiple_choice_answer": "2",
                "answers": _answers(("2", 3), ("two", 2), ("3", 4), ("many", 1)),
            },
            {
                "question_id": 421,
                "image_id": 42,
                "question_type": "what color",
                "answer_type": "other",
                "multiple_choice_answer": "Red",
                "answers": _answers(("red", 1), ("purple", 9)),
            },
            {
                "question_id": 70,
                "image_id": 7,
                "question_type": "is it",
                "answer_type": "yes/no",
                "multiple_choice_answer": "yes",
                "answers": _answers(("yes", 10)),
            },
        ],
    }
    f = {
        "q": tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
        "a": tmp_path / "v2_mscoco_val2014_annotations.json",
        "root": tmp_path / "coco",
    }
    f["q"].write_text(json.dumps(qs))
    f["a"].write_text(json.dumps(anns))
    return f


def test_vqa_vocab_min_count_and_soft_targets(vqa_files, tmp_path: Path) -> None:
    vocab = AnswerVocab.build([vqa_files["a"]], min_count=1)
    assert vocab.answers == ["2", "red", "yes"]  # normalised multiple-choice answers
    assert AnswerVocab.build([vqa_files["a"], vqa_files["a"]], min_count=2).answers == ["2", "red", "yes"]
    with pytest.raises(ValueError, match="3\\+ times"):
        AnswerVocab.build([vqa_files["a"]], min_count=3)
    vocab.save(tmp_path / "answer2label.txt")
    assert load_jsonl(tmp_path / "answer2label.txt")[1] == {"answer": "red", "label": 1}
    ds = VQAv2Dataset(
        vqa_files["q"],
        vqa_files["root"],
        vqa_files["a"],
        vocab=tmp_path / "answer2label.txt",
        transform=build_transform("eval", 32),
    )
    assert len(ds) == 3
    s = ds[0]
    assert s["image"].shape == (3, 32, 32) and s["text"] == "How many dogs?" and s["question_id"] == 420
    # "2" x3 and "two" x2 normalise to "2": 5 votes -> 1.0; "3" is out of the vocabulary.
    assert s["vqa_targets"].tolist() == [1.0, 0.0, 0.0]
    assert ds[1]["vqa_targets"].tolist() == pytest.approx([0.0, 0.3, 0.0])
    assert ds[2]["vqa_targets"].tolist() == [0.0, 0.0, 1.0]
    # Training drops questions without an in-vocabulary answer.
    small = AnswerVocab(["yes"])
    assert len(VQAv2Dataset(vqa_files["q"], vqa_files["root"], vqa_files["a"], small, drop_unanswerable=True)) == 1


def test_vqa_test_split_without_annotations(vqa_files) -> None:
    ds = VQAv2Dataset(vqa_files["q"], vqa_files["root"])
    assert "vqa_targets" not in ds[0] and ds[0]["image_id"] == 42


def test_vqa_errors_name_file_record_position(vqa_files, tmp_path: Path) -> None:
    coco_image_path(vqa_files["root"], "val2014", 7).unlink()
    ds = VQAv2Dataset(vqa_files["q"], vqa_files["root"])
    with pytest.raises(FileNotFoundError, match=r"COCO_val2014_000000000007\.jpg.*question_id 70"):
        ds[2]
    bad = tmp_path / "bad.json"
    bad.write_text('{"questions": [\n  {"image_id": 1,, "question": "x"}\n]}')
    with pytest.raises(DataFormatError, match=r"bad\.json: malformed JSON at line 2, column 18"):
        VQAv2Dataset(bad, vqa_files["root"])
    bad.write_text('{"questions": [{"image_id": 1, "question": "x"}]}')
    with pytest.raises(DataFormatError, match=r"questions\[0\]: missing field\(s\) \['question_id'\]"):
        VQAv2Dataset(bad, vqa_files["root"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_json(tmp_path / "absent.json")


def test_nlvr2_jsonl_pairs(tmp_path: Path) -> None:
    pngs = easy_vqa_pngs(4)
    rows = [
        {
            "identifier": "dev-850-0-1",
            "sentence": "Both images show a circle.",
            "label": "True",
            "left_url": "http://x/a.png",
            "right_url": "http://x/b.png",
            "writer": "1",
        },
        {
            "identifier": "train-12-3-0",
            "directory": "12",
            "sentence": "One is red.",
            "label": "False",
            "left_url": "",
            "right_url": "",
        },
    ]
    (tmp_path / "images/dev").mkdir(parents=True)
    (tmp_path / "images/train/12").mkdir(parents=True)
    for i, (folder, prefix) in enumerate([("dev", "dev-850-0"), ("train/12", "train-12-3")]):
        (tmp_path / "images" / folder / f"{prefix}-img0.png").write_bytes(pngs[2 * i])
        (tmp_path / "images" / folder / f"{prefix}-img1.png").write_bytes(pngs[2 * i + 1])
    path = tmp_path / "mixed.json"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = NLVR2Dataset(path, tmp_path / "images", transform=build_transform("eval", 16))
    s0, s1 = ds[0], ds[1]
    assert s0["label"] == 1 and s1["label"] == 0 and s0["text"] == "Both images show a circle."
    assert s0["image"].shape == s0["image2"].shape == (3, 16, 16)
    assert not torch.equal(s0["image"], s0["image2"])
    assert image_prefix("dev-850-0-1") == "dev-850-0" and consistency_group("dev-850-0-1") == "dev-850--1"
    path.write_text(json.dumps(rows[0]) + "\n" + '{"identifier": "dev-1-0-0", "sentence": "x", "label": "maybe"}\n')
    with pytest.raises(DataFormatError, match=r"line 2: label must be"):
        NLVR2Dataset(path, tmp_path / "images")
    path.write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(DataFormatError, match=r"mixed\.json: malformed JSON on line 2"):
        NLVR2Dataset(path, tmp_path / "images")


def _karpathy(tmp_path: Path) -> Path:
    _coco_images(tmp_path / "coco", "train2014", [1, 2])
    _coco_images(tmp_path / "coco", "val2014", [3, 4])
    images = []
    for iid, sub, split in [
        (1, "train2014", "train"),
        (2, "train2014", "restval"),
        (3, "val2014", "val"),
        (4, "val2014", "test"),
    ]:
        sents = [
            {
                "tokens": ["a", "shape", str(iid), str(k)],
                "raw": f"A shape {iid} {k}. ",
                "imgid": iid,
                "sentid": 10 * iid + k,
            }
            for k in range(2)
        ]
        images.append(
            {
                "filepath": sub,
                "filename": f"COCO_{sub}_{iid:012d}.jpg",
                "imgid": iid - 1,
                "split": split,
                "sentences": sents,
                "cocoid": iid,
                "sentids": [s["sentid"] for s in sents],
            }
        )
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_splits_and_coco_gt(tmp_path: Path) -> None:
    path = _karpathy(tmp_path)
    train = KarpathyCaptions(path, tmp_path / "coco", "train")
    assert len(train) == 4  # train + restval images, one sample per caption
    assert [train[i]["text"] for i in range(2)] == ["A shape 1 0.", "A shape 1 1."]
    test = KarpathyCaptions(path, tmp_path / "coco", "test")
    assert len(test) == 1 and test[0]["captions"] == ["A shape 4 0.", "A shape 4 1."] and test[0]["image_id"] == 4
    gt = karpathy_to_coco(path, "val", tmp_path / "val_gt.json")
    coco = load_coco(gt)
    assert coco.getImgIds() == [3] and [a["caption"] for a in coco.loadAnns(coco.getAnnIds([3]))] == [
        "A shape 3 0.",
        "A shape 3 1.",
    ]
    caps = COCOCaptions(gt, tmp_path / "coco")
    assert caps[0]["captions"] == ["A shape 3 0.", "A shape 3 1."]
    assert len(COCOCaptions(gt, tmp_path / "coco", per_caption=True)) == 2
    with pytest.raises(ValueError, match="unknown Karpathy split"):
        KarpathyCaptions(path, tmp_path / "coco", "dev")


def test_coco_instances_as_detection_targets(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    png = easy_vqa_pngs(1)[0]
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/a.jpg").write_bytes(to_jpeg(png))
    m = np.zeros((64, 64), np.uint8)
    m[10:20, 5:25] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    data = {
        "images": [{"id": 5, "file_name": "a.jpg", "width": 64, "height": 64}],
        "categories": [{"id": 3, "name": "triangle"}, {"id": 1, "name": "circle"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 3,
                "bbox": [5, 10, 20, 10],
                "area": 200.0,
                "iscrowd": 0,
                "segmentation": rle,
            },
            {
                "id": 2,
                "image_id": 5,
                "category_id": 1,
                "bbox": [30, 30, 4, 6],
                "area": 24.0,
                "iscrowd": 0,
                "segmentation": [[30, 30, 34, 30, 34, 36, 30, 36]],
            },
            {
                "id": 3,
                "image_id": 5,
                "category_id": 1,
                "bbox": [0, 0, 64, 64],
                "area": 4096.0,
                "iscrowd": 1,
                "segmentation": rle,
            },
            {
                "id": 4,
                "image_id": 5,
                "category_id": 1,
                "bbox": [60, 60, 0, 5],
                "area": 0.0,
                "iscrowd": 0,
                "segmentation": [[60, 60, 60, 65, 60, 65]],
            },
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    ds = COCOInstances(tmp_path / "instances.json", tmp_path / "imgs")
    img, t = ds[0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and img.min() >= 0 and img.max() <= 1
    assert t["boxes"].tolist() == [
        [5.0, 10.0, 25.0, 20.0],
        [30.0, 30.0, 34.0, 36.0],
    ]  # xyxy; crowd, empty dropped
    assert t["labels"].tolist() == [2, 1] and t["category_ids"].tolist() == [3, 1]
    assert ds.class_names == ["__background__", "circle", "triangle"]
    assert t["masks"].shape == (2, 64, 64) and torch.equal(t["masks"][0], torch.from_numpy(m))
    assert t["masks"][1].sum() > 0 and t["image_id"] == 5
    assert len(COCOInstances(tmp_path / "instances.json", tmp_path / "imgs", include_crowd=True)[0][1]["boxes"]) == 3


def test_imagefolder_with_timm_class_names(tmp_path: Path) -> None:
    pngs = easy_vqa_pngs(3)
    for syn, png in zip(["n01443537", "n01440764"], pngs):
        (tmp_path / syn).mkdir()
        (tmp_path / syn / "x.png").write_bytes(png)
    (tmp_path / "n01440764" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, transform=build_transform("imagenet_eval", 32, mean_std="imagenet"))
    assert ds.classes == ["n01440764", "n01443537"] and ds.class_names == ["tench", "goldfish"]
    assert len(ds) == 2 and ds[0]["label"] == 0 and ds[0]["image"].shape == (3, 32, 32)
    assert class_names(["circle", "square"]) == ["circle", "square"]
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderDataset(tmp_path / "n01440764")
