"""``vlmoe data shards`` / ``vlmoe data demo`` through the real entry point."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.data.conftest import easy_vqa_pngs, to_jpeg
from vlmoe.cli import main as vlmoe
from vlmoe.data.cli import read_captions
from vlmoe.data.shards import count_samples, expand_shards, stream_pipeline


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i, png in enumerate(easy_vqa_pngs(5)):
        (d / f"{i}.jpg").write_bytes(to_jpeg(png))
    (d / "sub" / "p.png").write_bytes(easy_vqa_pngs(1)[0])
    (d / "broken.jpg").write_bytes(to_jpeg(easy_vqa_pngs(1)[0])[:300])  # truncated
    return d


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "json-dict"])
def test_shards_from_image_folder_and_captions(tmp_path: Path, image_dir: Path, fmt: str, capsys) -> None:
    rows = [
        ("0.jpg", "a first caption"),
        ("1.jpg", "a second caption"),
        ("sub/p.png", "a png image"),
        ("2.jpg", "   "),
        ("missing.jpg", "no such file"),
        ("broken.jpg", "a truncated file"),
    ]
    cap = tmp_path / f"captions.{fmt.split('-')[0]}"
    if fmt in ("csv", "tsv"):
        with open(cap, "w", newline="") as f:
            w = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
            w.writerow(["image", "caption"])
            w.writerows(rows)
    elif fmt == "jsonl":
        cap.write_text("\n".join(json.dumps({"file_name": r[0], "text": r[1]}) for r in rows))
    elif fmt == "json":
        cap.write_text(json.dumps([{"image": r[0], "captions": [r[1]]} for r in rows]))
    else:
        cap.write_text(json.dumps(dict(rows)))
    out = tmp_path / "out"
    vlmoe(
        [
            "data",
            "shards",
            "--out",
            str(out),
            "--images",
            str(image_dir),
            "--captions",
            str(cap),
            "--maxcount",
            "2",
        ]
    )
    printed = capsys.readouterr().out
    assert "wrote 3 pairs samples into 2 shard(s)" in printed
    assert "corrupt_image=1" in printed and "empty_caption=1" in printed and "missing_image=1" in printed
    samples = list(stream_pipeline(str(out), "pair", batch_size=None, shuffle=0))
    assert [s["text"] for s in samples] == ["a first caption", "a second caption", "a png image"]
    assert count_samples(expand_shards(out)) == 3


def test_shards_from_coco_captions_images_and_texts(tmp_path: Path, image_dir: Path) -> None:
    coco = {
        "images": [{"id": 1, "file_name": "0.jpg"}, {"id": 2, "file_name": "1.jpg"}],
        "annotations": [
            {"image_id": 1, "id": 1, "caption": "one"},
            {"image_id": 1, "id": 2, "caption": "uno"},
            {"image_id": 2, "id": 3, "caption": "two"},
        ],
    }
    (tmp_path / "caps.json").write_text(json.dumps(coco))
    report = vlmoe(
        [
            "data",
            "shards",
            "--out",
            str(tmp_path / "c"),
            "--images",
            str(image_dir),
            "--coco-captions",
            str(tmp_path / "caps.json"),
        ]
    )
    assert report is None  # the top-level CLI returns nothing; check the files instead
    got = [s["text"] for s in stream_pipeline(str(tmp_path / "c"), "pair", batch_size=None, shuffle=0)]
    assert got == ["one", "uno", "two"]

    # An image folder alone: image shards; class subfolders give cls labels.
    cls_dir = tmp_path / "cls"
    for name, png in zip(["cat", "dog", "dog"], easy_vqa_pngs(3)):
        (cls_dir / name).mkdir(parents=True, exist_ok=True)
        (cls_dir / name / f"{len(list((cls_dir / name).iterdir()))}.png").write_bytes(png)
    vlmoe(["data", "shards", "--out", str(tmp_path / "i"), "--images", str(cls_dir)])
    labels = [s["label"] for s in stream_pipeline(str(tmp_path / "i"), "image", batch_size=None, shuffle=0)]
    assert labels == [0, 1, 1]

    (tmp_path / "a.txt").write_text("first text\n\nsecond text\n")
    (tmp_path / "b.txt").write_text("third text\n")
    vlmoe(
        [
            "data",
            "shards",
            "--out",
            str(tmp_path / "t"),
            "--texts",
            str(tmp_path / "a.txt"),
            str(tmp_path / "b.txt"),
        ]
    )
    texts = [s["text"] for s in stream_pipeline(str(tmp_path / "t"), "text", batch_size=None, shuffle=0)]
    assert texts == ["first text", "second text", "third text"]


def test_shards_errors_are_clear(tmp_path: Path, image_dir: Path) -> None:
    with pytest.raises(SystemExit, match="image folder not found"):
        vlmoe(["data", "shards", "--out", str(tmp_path / "x"), "--images", str(tmp_path / "nope")])
    (tmp_path / "c.jsonl").write_text('{"image": "0.jpg", "caption": "ok"}\n{"picture": "1.jpg", "caption": "x"}\n')
    with pytest.raises(Exception, match=r"c\.jsonl: record 2: no image field"):
        read_captions(tmp_path / "c.jsonl")
    (tmp_path / "c.json").write_text('[{"image": "0.jpg", "caption": "ok"},]')
    with pytest.raises(SystemExit, match=r"c\.json: malformed JSON at line 1"):
        vlmoe(
            [
                "data",
                "shards",
                "--out",
                str(tmp_path / "x"),
                "--images",
                str(image_dir),
                "--captions",
                str(tmp_path / "c.json"),
            ]
        )


def test_demo_command_is_cached(demo, capsys) -> None:
    vlmoe(["data", "demo", "--out", str(demo.root)])
    out = capsys.readouterr().out
    assert "pretrain_pairs" in out and str(demo.root) in out


def test_top_level_help_lists_data(capsys) -> None:
    vlmoe([])
    assert "data" in capsys.readouterr().out
