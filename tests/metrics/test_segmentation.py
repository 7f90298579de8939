"""Semantic segmentation scores: mIoU / aAcc / mAcc over the whole set, as the ADE20K devkit computes
them, checked against a pixel-by-pixel count written independently; exact under a 2-process gloo group;
bad label / prediction files named in one line."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch.multiprocessing as mp
from PIL import Image

from tests.distributed import run_on_gloo
from vlmoe.metrics.segmentation import SegmentationEvaluator, intersect_and_union, score_folders
from vlmoe.protocols.segmentation import read_label_map, reduce_zero_label

C = 4  # classes 0..3; class 3 is never labelled, class 2 never predicted


def _images() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(id, prediction, label) triples with known areas: ignore pixels, a class absent from the labels, one
    absent from the predictions, an image predicted all wrong, an "other" prediction (255) on a label."""
    rng = np.random.default_rng(0)
    out = []
    a_label = rng.integers(0, 3, size=(6, 7))
    a_label[0, :3] = 255
    a_pred = np.where(rng.random((6, 7)) < 0.7, a_label, rng.choice([0, 1, 3], size=(6, 7)))
    a_pred[a_pred == 2] = 1
    a_pred[5, 6] = 255
    out.append(("a", a_pred, a_label))
    b_label = np.full((4, 5), 1)
    b_label[:, 0] = 255
    out.append(("b", np.full((4, 5), 0), b_label))  # all wrong
    c_label = rng.integers(0, 2, size=(5, 5))
    out.append(("c", c_label.copy(), c_label))  # all right
    return out


def _by_hand(images) -> dict[str, float]:
    """The protocol pixel by pixel, with Python ints (independent of the implementation under test)."""
    inter, pred, label = [0] * C, [0] * C, [0] * C
    for _, p, y in images:
        for pv, yv in zip(p.ravel().tolist(), y.ravel().tolist()):
            if yv == 255:
                continue
            label[yv] += 1
            if 0 <= pv < C:
                pred[pv] += 1
                if pv == yv:
                    inter[yv] += 1
    ious = [inter[c] / (pred[c] + label[c] - inter[c]) for c in range(C) if pred[c] + label[c] - inter[c] > 0]
    accs = [inter[c] / label[c] for c in range(C) if label[c] > 0]
    return {"mIoU": sum(ious) / len(ious), "aAcc": sum(inter) / sum(label), "mAcc": sum(accs) / len(accs),
            "num_classes_seen": len(ious)}


def test_scores_equal_a_pixel_by_pixel_count() -> None:
    images = _images()
    ev = SegmentationEvaluator(C, class_names=["bg", "red", "blue", "never"])
    ev.update([ev.record(i, p, y) for i, p, y in images])
    ev.update([ev.record("b", images[1][1], images[1][2])])  # a padding duplicate counts once
    got, want = ev.compute(), _by_hand(images)
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=0, abs_tol=1e-12), (k, got[k], v)
    assert got["num_images"] == 3 and ev.duplicates == 1
    assert "IoU/never" in got and "IoU/blue" in got  # predicted-only and labelled-only classes have a union
    assert 0 < got["mIoU"] < got["aAcc"] < 1


def test_areas_ignore_labels_and_count_other_predictions_in_the_label_only() -> None:
    label = np.array([[0, 1, 255], [1, 1, 0]])
    pred = np.array([[0, 255, 1], [1, 0, 0]])
    i, p, lab = intersect_and_union(pred, label, 2)
    assert i.tolist() == [2, 1] and p.tolist() == [3, 1] and lab.tolist() == [2, 3]
    assert reduce_zero_label(np.array([0, 1, 150, 255])).tolist() == [255, 0, 149, 255]


def _rank(rank: int, world: int, out: str) -> None:
    images = _images()
    ev = SegmentationEvaluator(C)
    mine = images[rank::world] + [images[0]]  # rank 1 also holds a padding copy of image "a"
    ev.update([ev.record(i, p, y) for i, p, y in mine])
    ev.gather()
    if rank == 0:
        np.save(out, np.array([ev.compute()[k] for k in ("mIoU", "aAcc", "mAcc", "num_images")]))


def test_two_processes_score_as_one() -> None:
    images = _images()
    one = SegmentationEvaluator(C)
    one.update([one.record(i, p, y) for i, p, y in images])
    want = one.compute()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.npy")
        mp.spawn(run_on_gloo, args=(_rank, 2, os.path.join(d, "init"), out), nprocs=2, join=True)
        got = np.load(out)
    assert got.tolist() == [want["mIoU"], want["aAcc"], want["mAcc"], 3.0]


def _png(path, array, mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


def test_folders_in_ade20k_numbering_and_bad_files(tmp_path, capsys) -> None:
    from vlmoe.commands.evaluate import main

    ann, pred = tmp_path / "ann", tmp_path / "pred"
    images = _images()
    for name, p, y in images:  # the release's numbering: class k is k + 1, 0 = other
        _png(ann / f"{name}.png", np.where(y == 255, 0, y + 1))
        _png(pred / f"{name}.png", np.where((p == 255) | (p >= C), 0, p + 1))
    got = score_folders(ann, pred, C, reduce_zero=True)
    want = _by_hand([(n, np.where(p >= C, 255, p), y) for n, p, y in images])
    assert all(math.isclose(got[k], v, abs_tol=1e-12) for k, v in want.items()), (got, want)
    out = main(["segmentation", "--annotations", str(ann), "--predictions", str(pred),
                "--num-classes", str(C), "--reduce-zero-label"])
    assert out["mIoU"] == got["mIoU"] and "mIoU" in capsys.readouterr().out

    def fails(match: str) -> None:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            score_folders(ann, pred, C, reduce_zero=True)

    _png(pred / "b.png", np.zeros((4, 6)))  # another size than its label map
    fails(r"pred/b\.png: prediction map of 6x4 pixels, but its image is 5x4")
    _png(pred / "b.png", np.full((4, 5), 9))  # a class the task does not have
    fails(r"pred/b\.png: prediction value 9 is above the 4 classes")
    (pred / "b.png").unlink()
    fails(r"pred/b\.png: no prediction for the label map .*ann/b\.png")
    _png(pred / "b.png", np.zeros((4, 5)))
    Image.new("RGB", (5, 4)).save(ann / "c.png")
    fails(r"ann/c\.png: a RGB image; a label map has one channel of class indices")
    with pytest.raises(ValueError, match=r"x\.png: label value 7 is above the 4 classes"):
        _png(tmp_path / "x.png", np.full((2, 2), 7))
        read_label_map(tmp_path / "x.png", C)
