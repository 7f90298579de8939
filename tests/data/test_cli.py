"""``vlmoe data shards`` / ``vlmoe data demo`` through the real entry point."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.utils import easy_vqa_pngs, to_jpeg
from vlmoe.cli import main as vlmoe
from vlmoe.data.make_shards import read_captions
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


def _fails(capsys, argv: list[str]) -> str:
    """Run ``vlmoe ARGV``, expect the one-line user error (exit 2), return it."""
    with pytest.raises(SystemExit) as e:
        vlmoe(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vlmoe {argv[0]}: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_shards_errors_are_clear(tmp_path: Path, image_dir: Path, capsys) -> None:
    err = _fails(capsys, ["data", "shards", "--out", str(tmp_path / "x"), "--images", str(tmp_path / "nope")])
    assert "--images" in err and "nope: no such folder" in err
    (tmp_path / "c.jsonl").write_text('{"image": "0.jpg", "caption": "ok"}\n{"picture": "1.jpg", "caption": "x"}\n')
    with pytest.raises(Exception, match=r"c\.jsonl: line 2: no image field"):
        read_captions(tmp_path / "c.jsonl")
    (tmp_path / "c.json").write_text('[{"image": "0.jpg", "caption": "ok"},]')
    argv = ["data", "shards", "--out", str(tmp_path / "x"), "--images", str(image_dir), "--captions"]
    assert "c.json: malformed JSON at line 1" in _fails(capsys, [*argv, str(tmp_path / "c.json")])
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        vlmoe(["data", "shards", "--out", str(tmp_path / "x"), "--images", str(tmp_path / "nope"), "--debug"])


def test_shards_never_overwrite_or_half_write(tmp_path: Path, image_dir: Path, capsys) -> None:
    """A re-run into a folder with shards is refused; --overwrite replaces the whole old set (no stale
    shard stays); a run that fails half-way leaves the earlier shards exactly as they were."""
    out = tmp_path / "out"
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(f"text number {i}" for i in range(7)) + "\n")
    vlmoe(["data", "shards", "--out", str(out), "--texts", str(texts), "--maxcount", "2"])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["sizes.json", *(f"texts-{i:06d}.tar" for i in range(4))]
    err = _fails(capsys, ["data", "shards", "--out", str(out), "--texts", str(texts), "--maxcount", "2"])
    assert "is not empty" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # a failing run (captions that do not parse) with --overwrite: the old set is intact
    (tmp_path / "bad.json").write_text("[{")
    argv = ["data", "shards", "--out", str(out), "--images", str(image_dir), "--captions", str(tmp_path / "bad.json")]
    _fails(capsys, [*argv, "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.staging")]
    # --overwrite with fewer shards: the old set is gone, sizes.json tells the truth
    vlmoe(["data", "shards", "--out", str(out), "--texts", str(texts), "--maxcount", "4", "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["sizes.json", "texts-000000.tar", "texts-000001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"texts-000000.tar": 4, "texts-000001.tar": 3}
    assert count_samples(expand_shards(out)) == 7


def test_bad_encodings_are_skipped_counted_and_named(tmp_path: Path, image_dir: Path, capsys) -> None:
    texts = tmp_path / "mixed.txt"
    texts.write_bytes(b"first text\n" + "caf\xe9 latin-1\n".encode("latin-1") + b"third text\n")
    report = tmp_path / "report.json"
    vlmoe(["data", "shards", "--out", str(tmp_path / "t"), "--texts", str(texts), "--report", str(report)])
    out = capsys.readouterr().out
    assert "wrote 2 texts samples" in out and "bad_encoding=1" in out and f"bad_encoding: {texts}:2" in out
    data = json.loads(report.read_text())
    assert data["skipped"] == {"bad_encoding": 1}
    assert data["skipped_items"] == [{"reason": "bad_encoding", "source": str(texts), "line": 2}]
    # a latin-1 CSV: its bad line is skipped and named, the good rows are written
    cap = tmp_path / "captions.csv"
    cap.write_bytes(b"image,caption\n0.jpg,a plain caption\n" + "1.jpg,un caf\xe9\n".encode("latin-1"))
    vlmoe(["data", "shards", "--out", str(tmp_path / "p"), "--images", str(image_dir), "--captions", str(cap),
           "--report", str(report)])
    assert "wrote 1 pairs samples" in capsys.readouterr().out
    items = json.loads(report.read_text())["skipped_items"]
    assert {"reason": "bad_encoding", "source": str(cap), "line": 3} in items
    # a latin-1 JSON file is refused as a whole, naming the line
    (tmp_path / "c.json").write_bytes('[{"image": "0.jpg",\n "caption": "caf\xe9"}]'.encode("latin-1"))
    argv = ["data", "shards", "--out", str(tmp_path / "j"), "--images", str(image_dir), "--captions"]
    assert "c.json: not UTF-8 text (line 2" in _fails(capsys, [*argv, str(tmp_path / "c.json")])


def test_demo_refuses_a_user_folder(tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    err = _fails(capsys, ["data", "demo", "--out", str(mine)])
    assert "is not a vlmoe demo folder" in err and (mine / "notes.txt").read_text() == "keep me"


def test_light_commands_answer_help_without_torch() -> None:
    import subprocess
    import sys
    import time

    for cmd in (["data", "--help"], ["export", "--help"], ["data", "shards", "--help"]):
        code = f"import sys; from vlmoe.cli import main; main({cmd!r})"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        assert proc.returncode == 0 and "usage: vlmoe" in proc.stdout, proc.stderr[-500:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert "torch" not in imported and "lightning" not in imported, sorted(imported)[:20]
        assert elapsed < 2.0, elapsed  # well under a second unloaded; the suite shares two cores


def test_demo_command_is_cached(demo, capsys) -> None:
    vlmoe(["data", "demo", "--out", str(demo.root)])
    out = capsys.readouterr().out
    assert "pretrain_pairs" in out and str(demo.root) in out


def test_top_level_help_lists_data(capsys) -> None:
    vlmoe([])
    assert "data" in capsys.readouterr().out
