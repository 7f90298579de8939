"""ViTDet on the vlmoe backbone: window partitioning, windowed == global attention when one window covers
the map, the all-global backbone == the plain vision forward, pyramid strides and channels, torchvision
Mask R-CNN on top (training losses + MoE aux, eval outputs), COCO results that round-trip through
``COCO.loadRes``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.utils import VARIANTS
from vlmoe.models import VLMoEConfig, create_model
from vlmoe.models.detection import (
    ViTDetBackbone,
    VLMoEForDetection,
    default_global_blocks,
    window_partition,
    window_unpartition,
)


@pytest.mark.parametrize(("H", "W", "w"), [(8, 8, 4), (7, 9, 4), (5, 5, 8), (14, 14, 14)])
def test_window_partition_round_trips_with_padding(H: int, W: int, w: int) -> None:
    x = torch.randn(2, H, W, 3)
    windows, padded = window_partition(x, w)
    assert padded == (-(-H // w) * w, -(-W // w) * w)
    assert windows.shape == (2 * (padded[0] // w) * (padded[1] // w), w, w, 3)
    assert torch.equal(window_unpartition(windows, w, padded, (H, W)), x)
    # the first window is the top-left w x w block; padding is zeros on the bottom / right
    assert torch.equal(windows[0, : min(w, H), : min(w, W)], x[0, :w, :w])
    if padded != (H, W):
        assert windows.abs().sum() == x.abs().sum()


def test_default_global_blocks_are_vitdets() -> None:
    assert default_global_blocks(12) == [2, 5, 8, 11] and default_global_blocks(24) == [5, 11, 17, 23]
    assert default_global_blocks(2) == [1]


def _vit(variant: str = "dense", img: int = 32) -> torch.nn.Module:
    name, overrides = VARIANTS[variant]
    torch.manual_seed(0)
    cfg = VLMoEConfig.from_name(name, **overrides).replace(modalities=["vision"], final_norm=False, img_size=img)
    return create_model(cfg).double().eval()


@pytest.mark.parametrize("variant", ["dense", "mhmoe"])
def test_one_window_over_the_whole_map_equals_global_attention(variant: str) -> None:
    vit = _vit(variant)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)  # patch 8: a 4 x 4 grid
    windowed = ViTDetBackbone(vit, window_size=4, global_blocks=[]).double().forward_features(x)
    glob = ViTDetBackbone(vit, window_size=0).double().forward_features(x)
    assert torch.allclose(windowed, glob, atol=1e-12)
    smaller = ViTDetBackbone(vit, window_size=2, global_blocks=[]).double().forward_features(x)
    assert not torch.allclose(smaller, glob, atol=1e-6)  # 2 x 2 windows do change the result


@pytest.mark.parametrize("variant", ["dense", "xmoe"])
def test_all_global_backbone_equals_the_plain_vision_forward(variant: str) -> None:
    """The plain forward with the CLS token kept out of the patches' attention gives the same patch tokens."""
    vit = _vit(variant)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    feat = ViTDetBackbone(vit, window_size=0).double().forward_features(x)  # (B, D, 4, 4)
    n = vit.vision_embed.num_tokens
    blocked = torch.zeros(n, n, dtype=torch.bool)
    blocked[1:, 0] = True  # patches do not see the CLS token
    ref = vit(image=x, attn_mask=blocked).vision_patches  # (B, 16, D)
    assert torch.allclose(feat.flatten(2).transpose(1, 2), ref, atol=1e-12)


def test_positions_are_interpolated_to_other_grids_and_padding_is_handled() -> None:
    vit = _vit()
    bb = ViTDetBackbone(vit, window_size=3).double()
    out = bb(torch.randn(1, 3, 44, 52, dtype=torch.float64))  # 44 x 52: padded to 48 x 56, a 6 x 7 grid
    assert out["2"].shape[-2:] == (6, 7)


def test_pyramid_strides_and_channels() -> None:
    vit = _vit(img=64)
    bb = ViTDetBackbone(vit, window_size=4, out_channels=32).double()
    out = bb(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert list(out) == ["0", "1", "2", "3", "pool"] and bb.out_channels == 32
    assert bb.strides == [2, 4, 8, 16]  # patch 8 / (4, 2, 1, 0.5)
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(v.shape[:2] == (2, 32) for v in out.values())


def _detector(variant: str = "dense") -> VLMoEForDetection:
    name, overrides = VARIANTS[variant]
    torch.manual_seed(0)
    cfg = VLMoEConfig.from_name(name, **overrides).replace(modalities=["vision"], final_norm=False, img_size=64)
    return VLMoEForDetection(create_model(cfg), ["circle", "square"], image_size=64, window_size=4, out_channels=32,
                             detector_options={"head_channels": 32, "fc_dim": 64})


def _targets(n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        m = torch.zeros(1, 64, 64, dtype=torch.uint8)
        m[0, 10:40, 12 + i:44] = 1
        out.append({"boxes": torch.tensor([[12.0 + i, 10.0, 44.0, 40.0]]), "labels": torch.tensor([1 + i % 2]),
                    "masks": m})
    return out


@pytest.mark.parametrize("variant", ["dense", "mhmoe"])
def test_mask_rcnn_trains_and_predicts_with_moe_aux(variant: str) -> None:
    model = _detector(variant).train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    losses = model(images, _targets(2))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values()) + model.aux.loss
    total.backward()
    assert model.backbone.vision_embed.patch_embed.proj.weight.grad is not None
    if variant != "dense":
        assert model.aux.loss.item() > 0
    # the backbone is registered once, under backbone.
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("detector.backbone.vit") for n in names)
    assert len(model.state_dict()) == len({id(t) for t in model.state_dict().values()})
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 50, 60)])
    assert out[0]["masks"].shape[-2:] == (50, 60)  # back in the input image's pixels


def test_layer_decay_sees_the_backbone_through_the_detector() -> None:
    model = _detector()
    assert model.layer_id("backbone.blocks.1.attn.qkv.vision.weight") == 2
    assert model.layer_id("detector.roi_heads.box_head.0.0.weight") == model.num_layers + 1


def test_results_round_trip_through_loadres(tmp_path) -> None:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from vlmoe.tasks.finetune.detection import to_coco_results

    masks = torch.zeros(2, 1, 30, 40)
    masks[0, 0, 5:15, 10:30] = 0.9
    masks[1, 0, 20:28, 2:8] = 0.7
    output = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 15.0], [2.0, 20.0, 8.0, 28.0]]),
              "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.4]), "masks": masks}
    res = to_coco_results(output, 7, {1: 18, 2: 44})
    assert [r["category_id"] for r in res] == [18, 44] and res[0]["bbox"] == [10.0, 5.0, 20.0, 10.0]
    gt = COCO()
    gt.dataset = {"images": [{"id": 7, "height": 30, "width": 40}],
                  "categories": [{"id": 18, "name": "dog"}, {"id": 44, "name": "bottle"}], "annotations": []}
    gt.createIndex()
    dt = gt.loadRes(res)
    back = mask_utils.decode(dt.anns[1]["segmentation"])
    assert np.array_equal(back, (masks[0, 0] > 0.5).numpy().astype(np.uint8))
    assert dt.anns[2]["bbox"] == [2.0, 20.0, 6.0, 8.0] and dt.anns[1]["score"] == pytest.approx(0.9)
