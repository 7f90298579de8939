"""Semantic segmentation data: folders of images + label PNGs (ADE20K's layout and numbering), label maps
painted from COCO instances (the demo's shapes), and joint transforms that keep image and label aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmoe.data.segmentation import COCOSemantic, SegmentationFolder, SegmentationTransform, ade20k_folders
from vlmoe.protocols.segmentation import IGNORE_INDEX


def _ade20k(root, n=3):
    """A tiny ADE20K release: images/ and annotations/ per split, labels in 1..N with 0 = other."""
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            name = f"ADE_{split}_{i:08d}"
            Image.new("RGB", (12, 8), (40 * i, 0, 0)).save(root / "images" / split / f"{name}.jpg")
            label = np.zeros((8, 12), dtype=np.uint8)
            label[:, 6:] = i + 1  # the right half is class i (after the zero label is reduced)
            Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{name}.png")
    return root


def test_ade20k_folders_pair_images_and_reduce_the_zero_label(tmp_path) -> None:
    images, annotations = ade20k_folders(_ade20k(tmp_path / "ADEChallengeData2016"), "validation")
    data = SegmentationFolder(images, annotations, num_classes=150, reduce_zero=True)
    s = data[2]
    assert s["image"].shape == (3, 8, 12) and s["image"].dtype == torch.uint8
    assert s["image_id"] == "ADE_validation_00000002"
    assert (s["label"][:, :6] == IGNORE_INDEX).all() and (s["label"][:, 6:] == 2).all()  # 0 -> ignore, 3 -> 2
    with pytest.raises(FileNotFoundError, match=r"images/testing: no such folder \(ADE20K's release layout"):
        ade20k_folders(tmp_path / "ADEChallengeData2016", "testing")


def test_bad_label_files_are_named(tmp_path) -> None:
    root = _ade20k(tmp_path / "ade")
    images, annotations = ade20k_folders(root, "training")
    Image.new("L", (10, 8)).save(annotations / "ADE_training_00000001.png")  # another size than its image
    with pytest.raises(ValueError, match=r"ADE_training_00000001\.png: label map of 10x8 pixels, but its image is"):
        SegmentationFolder(images, annotations, 150, reduce_zero=True)[1]
    Image.new("RGB", (12, 8)).save(annotations / "ADE_training_00000001.png")
    with pytest.raises(ValueError, match=r"ADE_training_00000001\.png: a RGB image; a label map has one channel"):
        SegmentationFolder(images, annotations, 150, reduce_zero=True)[1]
    with pytest.raises(ValueError, match=r"ADE_training_00000002\.png: label value 3 is above the 2 classes"):
        SegmentationFolder(images, annotations, 2, reduce_zero=True)[2]
    (annotations / "ADE_training_00000000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"ADE_training_00000000\.png: no label map for the image .*\.jpg"):
        SegmentationFolder(images, annotations, 150, reduce_zero=True)


def test_coco_instances_paint_the_demo_shapes(demo) -> None:
    data = COCOSemantic(demo.coco_instances_val, demo.root / "coco" / "val2014")
    assert data.class_names == ["background", "circle", "rectangle", "triangle"] and len(data) == 1000
    from vlmoe.data.coco import COCOInstances

    inst = COCOInstances(demo.coco_instances_val, demo.root / "coco" / "val2014")
    for i in range(5):  # one shape per image: its mask painted with its class, the rest background
        s, (_, target) = data[i], inst[i]
        mask = target["masks"][0].bool()
        assert (s["label"][mask] == int(target["labels"][0])).all() and (s["label"][~mask] == 0).all()
        assert s["image"].shape[-2:] == s["label"].shape


def test_transforms_keep_image_and_label_aligned() -> None:
    torch.manual_seed(0)
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    label = torch.zeros(40, 60, dtype=torch.long)
    image[0, :, :30], label[:, :30] = 255, 1  # the left half: red, class 1
    train = SegmentationTransform(True, 32, short_side=40, ratio=(0.5, 2.0), photometric=False)
    for _ in range(20):
        img, lab = train(image, label)
        assert img.shape == (3, 32, 32) and lab.shape == (32, 32)
        pad = lab == IGNORE_INDEX  # padding where the resized image is smaller than the crop
        assert (img[:, pad] == 0).all()
        red = img[0] > 127
        assert ((lab == 1) == (red & ~pad)).float().mean() > 0.9  # resampling blurs only the edge
    img, lab = SegmentationTransform(False, 32)(image, label)
    assert img.shape == (3, 32, 32) and torch.equal(lab, label)  # evaluation keeps the label's resolution
