"""`vlmoe predict` and `vlmoe.load` on input that is hostile or wrong: an image over PIL's
decompression-bomb limit, a folder that cannot be searched in full, file names that are not UTF-8,
option values below one, a question that is not a str, a NaN image tensor, an `--out` that is a
directory, and a large image (peak memory of the whole command, measured in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlmoe
from tests.utils import export_tiny_model
from vlmoe.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: export_tiny_model(root, kind) for kind in ("vqa", "classify", "detect")}


def _fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def main_summary(argv: list[str]) -> dict[str, int]:
    """The summary `vlmoe predict` returns (the CLI entry point prints it and returns nothing)."""
    from vlmoe.commands import predict

    return predict.main(argv[1:])


def test_an_image_over_the_decompression_bomb_limit_is_skipped_and_counted(models, tmp_path, capsys,
                                                                            monkeypatch) -> None:
    Image.new("RGB", (60, 60), (0, 0, 255)).save(tmp_path / "bomb.png")  # 3600 pixels > 2 x the limit below
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "good.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    summary = main_summary(["predict", "classify", "--model", str(models["classify"]),
                            str(tmp_path / "bomb.png"), str(tmp_path / "good.png")])
    out, err = capsys.readouterr()
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(tmp_path / "good.png")]
    assert "skipped" in err and "bomb.png" in err and "decompression bomb" in err
    assert "1 of 2 images, 1 skipped" in err and summary["skipped"] == 1


def test_what_a_folder_search_cannot_enter_is_reported_and_counted(models, tmp_path, capsys, monkeypatch) -> None:
    folder = tmp_path / "photos"
    (folder / "private").mkdir(parents=True)
    Image.new("RGB", (20, 20), (0, 255, 0)).save(folder / "green.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(folder / "private" / "hidden.png")
    (folder / "loop").symlink_to("loop")  # a link to itself: ELOOP
    (folder / "up").symlink_to(".")  # a link back to a folder being searched
    (folder / "gone.jpg").symlink_to("nowhere.jpg")  # a broken link named like an image
    # tests may run as root, who reads any folder: the unreadable one is made so for os.scandir
    scandir = os.scandir

    def refusing(path="."):
        if Path(path) == folder / "private":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    summary = main_summary(["predict", "classify", "--model", str(models["classify"]), str(folder)])
    out, err = capsys.readouterr()
    assert [Path(json.loads(line)["image"]).name for line in out.splitlines()] == ["green.png"]
    left_out = [line for line in err.splitlines() if line.startswith("vlmoe predict: left out")]
    assert len(left_out) == 4 and summary["left_out"] == 4, err
    for name, why in [("private", "cannot list this folder (Permission denied)"),
                      ("loop", "Too many levels of symbolic links"), ("up", "a link back to a folder being searched"),
                      ("gone.jpg", "a broken symbolic link")]:
        assert any(f"{folder / name}: {why}" in line for line in left_out), (name, err)
    assert "1 of 1 images, 4 folder entries left out" in err


def test_file_names_that_are_not_utf8_are_written_as_valid_utf8(models, tmp_path, capsys) -> None:
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name: a lone surrogate in Python's str
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / name)
    out_file = tmp_path / "preds.jsonl"
    main(["predict", "classify", "--model", str(models["classify"]), str(tmp_path), "--out", str(out_file)])
    row = json.loads(out_file.read_bytes().decode("utf-8"))
    assert row["image"].encode("utf-8") and row["image"].endswith("caf\\xe9.png")


@pytest.mark.parametrize("option, value", [("--topk", "-1"), ("--topk", "0"), ("--batch-size", "0"), ("--beam", "0")])
def test_option_values_below_one_are_one_line_errors(option, value, models, tmp_path, capsys) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    method = "caption" if option == "--beam" else "classify"  # each method has its own options
    err = _fails(capsys, ["predict", method, "--model", str(models["classify"]), str(tmp_path / "a.png"),
                          option, value])
    assert err == f"vlmoe predict: {option} must be >= 1, got {value}"


def test_out_onto_a_directory_is_refused_and_left_alone(models, tmp_path, capsys) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        err = _fails(capsys, ["predict", "classify", "--model", str(models["classify"]), str(tmp_path / "a.png"),
                              "--out", str(tmp_path / "results"), *extra])
        assert "is a directory" in err and "exists; choose another file" not in err
    assert (tmp_path / "results" / "keep.txt").read_text() == "mine"
    from vlmoe.io import atomic_write_text

    with pytest.raises(IsADirectoryError, match="results is a directory"):
        atomic_write_text(tmp_path / "results", "x", overwrite=True)


def test_python_api_refuses_bad_arguments_by_name(models) -> None:
    vqa = vlmoe.load(models["vqa"])
    img = Image.new("RGB", (20, 20), (255, 0, 0))
    with pytest.raises(TypeError, match="questions must be a str or a list of str, got NoneType"):
        vqa.answer(img, None)
    with pytest.raises(TypeError, match="questions must be a str or a list of str, got int"):
        vqa.answer([img, img], ["what colour?", 3])
    with pytest.raises(ValueError, match="topk must be an integer >= 1, got 0"):
        vqa.answer(img, "what colour?", topk=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        vlmoe.load(models["vqa"], batch_size=0)
    with pytest.raises(ValueError, match=r"images\[1\]: the image tensor of shape \(3, 24, 24\) holds NaN"):
        vqa.answer([torch.rand(3, 24, 24), torch.full((3, 24, 24), float("nan"))], "what colour?")


def test_detect_answers_a_large_image_in_its_own_pixels(models) -> None:
    det = vlmoe.load(models["detect"])  # a 32-pixel detector: the image is scaled down 30x on the way
    img = Image.new("RGB", (1000, 800), (200, 30, 30))
    rows = det.detect(img, score_threshold=0.0)[0]
    assert rows and all(0 <= r["box"][0] <= r["box"][2] <= 1000 and 0 <= r["box"][1] <= r["box"][3] <= 800
                        for r in rows)
    assert max(r["box"][2] for r in rows) > 100  # scaled back from the detector's 32 pixels
    assert all(r["mask"].shape == (800, 1000) and r["mask"].dtype == torch.bool for r in rows)
    assert "mask" not in det.detect(img, score_threshold=0.0, masks=False)[0][0]


# the peak RSS of this process image: /proc's VmHWM (getrusage's ru_maxrss keeps the forking parent's
# peak across exec, so under pytest it would report the test runner's own memory)
PEAK = """
import sys
from vlmoe.cli import main
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) // 1024
base = hwm()
main(sys.argv[1:])
print("peak_rss_mb", hwm(), "base", base)
"""


def test_predict_detect_on_a_large_image_stays_within_its_memory_bound(models, tmp_path) -> None:
    # 36 M pixels (a 10000 x 10000 image, 100 M pixels, peaks at about 1.1 GB); a detector that pasted its
    # up to 100 masks at the full size would need 14 GB here
    Image.new("RGB", (6000, 6000), (200, 30, 30)).save(tmp_path / "large.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", f"import resource; resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))\n{PEAK}",
         "predict", "detect", "--model", str(models["detect"]), str(tmp_path / "large.png"), "--score-threshold", "0"],
        capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.splitlines()[0])["predictions"]
    peak, base = (int(v) for v in run.stdout.split("peak_rss_mb")[1].split()[::2])
    assert peak < 2048, f"peak RSS {peak} MB (after the imports: {base} MB)"
