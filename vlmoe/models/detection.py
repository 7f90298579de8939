"""Detection / instance segmentation on the vision branch: ViTDet's recipe on torchvision's Mask R-CNN.

- :class:`ViTDetBackbone`: the vision branch of any vlmoe backbone (dense or MoE FFNs) as a plain
  single-scale backbone. The CLS token is dropped; the patch positions are interpolated (bicubic) to
  the input's patch grid on the fly; blocks run **window attention** (``window_size`` x
  ``window_size`` windows, the grid zero-padded to a multiple of the window after ``norm1``, as
  detectron2's ViT does) except the ``global_blocks`` (default: the last block of each quarter, i.e.
  2, 5, 8, 11 for 12 blocks), and FFN / MoE layers see every real token (never the padding). Then the
  **simple feature pyramid** of ViTDet from the stride-``p`` map (``p`` = patch size): strides ``p/4,
  p/2, p, 2p`` (deconvolutions, identity, max-pool), each ``1x1 conv -> LN -> 3x3 conv -> LN`` to
  ``out_channels``, plus a max-pooled ``pool`` level (stride ``4p``); returned as the ``OrderedDict``
  torchvision's detectors take, with ``out_channels`` set.
- :func:`build_mask_rcnn`: ``torchvision.models.detection.MaskRCNN`` on that backbone with five
  anchor levels (one size per level, 8 x its stride, three aspect ratios), ``MultiScaleRoIAlign``
  over the four pyramid levels, ViTDet's head choices torchvision offers (a 2-conv RPN head, a
  4-conv + 1-fc box head and a 4-conv mask head, all with LayerNorm), and the backbone's
  normalisation.
- :class:`VLMoEForDetection`: the task model (``backbone`` = the :class:`~vlmoe.models.VLMoE`,
  ``detector`` = the Mask R-CNN); the backbone is registered once, under ``backbone.`` (layer decay,
  checkpoints and the MoE machinery find it there), and the MoE auxiliary terms of the last forward are
  in :attr:`ViTDetBackbone.aux`.

Not built (yet): decomposed relative position biases in the windowed blocks (BEiT-3 has none).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from vlmoe.moe import MoEAux

from .backbone import VLMoE
from .task_models import TaskModel, register_task_model

__all__ = ["VLMoEForDetection", "ViTDetBackbone", "build_mask_rcnn", "window_partition", "window_unpartition"]


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """``(B, H, W, C)`` -> ``(B * nH * nW, window, window, C)`` windows, the map zero-padded on the
    bottom / right to multiples of ``window``; also returns the padded ``(Hp, Wp)``."""
    B, H, W, C = x.shape
    ph, pw = (-H) % window, (-W) % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    x = x.view(B, Hp // window, window, Wp // window, window, C)  # (B, Hp, Wp, C) -> (B, nH, window, nW, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C), (Hp, Wp)  # -> (B*nH*nW, window, window, C)


def window_unpartition(windows: Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: windows -> ``(B, H, W, C)`` with the padding removed."""
    Hp, Wp = padded
    H, W = size
    B = windows.shape[0] // ((Hp // window) * (Wp // window))
    # (B*nH*nW, window, window, C) -> (B, nH, nW, window, window, C)
    x = windows.view(B, Hp // window, Wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)  # -> (B, nH, window, nW, window, C) -> (B, Hp, Wp, C)
    return x[:, :H, :W].contiguous()


def default_global_blocks(depth: int) -> list[int]:
    """ViTDet's global blocks: the last of each quarter (2, 5, 8, 11 for 12; 5, 11, 17, 23 for 24)."""
    if depth < 4:
        return [depth - 1]
    q = depth // 4
    return [q * i - 1 for i in range(1, 5)]


class ViTDetBackbone(nn.Module):
    """ViTDet's plain backbone + simple feature pyramid on a vlmoe backbone (see the module docstring).

    Args:
        vit: the backbone (its vision branch is used; it is *not* registered as a submodule here: the
            task model owns it).
        window_size: window side in patches (0: global attention everywhere).
        global_blocks: blocks with global attention (default :func:`default_global_blocks`).
        out_channels: pyramid channels (256 in ViTDet).
        scales: pyramid scales relative to the patch stride (ViTDet: 4, 2, 1, 0.5).
    """

    def __init__(
        self,
        vit: VLMoE,
        window_size: int = 14,
        global_blocks: Sequence[int] | None = None,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
    ) -> None:
        super().__init__()
        if vit.vision_embed is None:
            raise ValueError("detection needs a backbone with a vision branch")
        object.__setattr__(self, "_vit", vit)  # owned (and registered) by the task model
        depth = len(vit.blocks)
        self.window_size = window_size
        self.global_blocks = sorted(default_global_blocks(depth) if global_blocks is None else global_blocks)
        bad = [b for b in self.global_blocks if not 0 <= b < depth]
        if bad:
            raise ValueError(f"global_blocks {bad} out of range for a backbone of {depth} blocks")
        D, p = vit.config.dim, vit.config.patch_size
        self.strides = [int(p / s) for s in scales]
        self.out_channels = out_channels
        self.stages = nn.ModuleList()
        for s in scales:
            layers: list[nn.Module]
            if s == 4.0:
                layers = [nn.ConvTranspose2d(D, D // 2, 2, 2), LayerNorm2d(D // 2), nn.GELU(),
                          nn.ConvTranspose2d(D // 2, D // 4, 2, 2)]
                dim = D // 4
            elif s == 2.0:
                layers, dim = [nn.ConvTranspose2d(D, D // 2, 2, 2)], D // 2
            elif s == 1.0:
                layers, dim = [], D
            elif s == 0.5:
                layers, dim = [nn.MaxPool2d(2, 2)], D
            else:
                raise ValueError(f"pyramid scale {s} not supported (4, 2, 1, 0.5)")
            layers += [nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.stages.append(nn.Sequential(*layers))
        self.aux: MoEAux | None = None

    @property
    def vit(self) -> VLMoE:
        return self._vit

    def _positions(self, grid: tuple[int, int]) -> Tensor:
        ve = self.vit.vision_embed
        table = ve.pos_embed.weight[ve.pos_embed.offset + 1 :]  # the patch rows (no CLS)
        gh, gw = ve.grid_size
        if (gh, gw) == tuple(grid):
            return table
        t = table.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # (gh*gw, D) -> (1, gh, gw, D) -> (1, D, gh, gw)
        t = F.interpolate(t.float(), size=grid, mode="bicubic", align_corners=False).to(table.dtype)
        return t.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)  # (1, D, *grid) -> (grid[0]*grid[1], D)

    def _block(self, blk: nn.Module, x: Tensor, window: int) -> tuple[Tensor, MoEAux | None]:
        B, H, W, D = x.shape
        flat = x.reshape(B, H * W, D)  # (B, H, W, D) -> (B, H*W, D)
        h, _ = blk.norm1(flat, None)
        if window > 0:
            h, padded = window_partition(h.view(B, H, W, D), window)  # (B, H*W, D) -> (B, H, W, D)
            h = h.view(-1, window * window, D)  # (B*nH*nW, window, window, D) -> (B*nH*nW, window*window, D)
            h, _ = blk.attn(h, None)
            # (B*nH*nW, window*window, D) -> (B*nH*nW, window, window, D) -> (B, H, W, D) -> (B, H*W, D)
            h = window_unpartition(h.view(-1, window, window, D), window, padded, (H, W)).view(B, H * W, D)
        else:
            h, _ = blk.attn(h, None)
        h, _ = blk.drop_path1(h, None)
        flat = flat + h
        h, _, aux = blk.mlp(*blk.norm2(flat, None), text_padding_mask=None, residual=(flat, None))
        h, _ = blk.drop_path2(h, None)
        return (flat + h).view(B, H, W, D), aux  # (B, H*W, D) -> (B, H, W, D)

    def forward_features(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` (sides multiples of the patch size) -> the ``(B, D, H/p, W/p)`` map."""
        vit, ve = self.vit, self.vit.vision_embed
        x = ve.patch_embed.proj(images)  # (B, D, gh, gw)
        B, D, gh, gw = x.shape
        # (B, D, gh, gw) -> (B, gh*gw, D)
        x = x.flatten(2).transpose(1, 2) + self._positions((gh, gw)).to(x.dtype)
        x = x.view(B, gh, gw, D)  # (B, gh*gw, D) -> (B, gh, gw, D)
        aux = MoEAux.zero(x.device)
        for i, blk in enumerate(vit.blocks):
            window = 0 if (i in self.global_blocks or self.window_size <= 0) else self.window_size
            if vit.grad_checkpointing and torch.is_grad_enabled():
                x, a = torch.utils.checkpoint.checkpoint(self._block, blk, x, window, use_reentrant=False)
            else:
                x, a = self._block(blk, x, window)
            if a is not None:
                aux = aux + a
        self.aux = aux
        return x.permute(0, 3, 1, 2)  # (B, gh, gw, D) -> (B, D, gh, gw)

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """The pyramid: ``{"0": stride p/4, "1": p/2, "2": p, "3": 2p, "pool": 4p}``, ``out_channels`` each."""
        p = self.vit.config.patch_size
        if images.shape[-1] % p or images.shape[-2] % p:  # torchvision pads batches to size_divisible
            images = F.pad(images, (0, (-images.shape[-1]) % p, 0, (-images.shape[-2]) % p))
        feat = self.forward_features(images)
        out = OrderedDict((str(i), stage(feat)) for i, stage in enumerate(self.stages))
        out["pool"] = F.max_pool2d(out[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return out


def build_mask_rcnn(
    backbone: ViTDetBackbone,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    masks: bool = True,
    head_channels: int = 256,
    fc_dim: int = 1024,
    **kwargs: Any,
) -> nn.Module:
    """torchvision ``MaskRCNN`` (``FasterRCNN`` for ``masks=False``) on ``backbone``, ViTDet's heads.

    Args:
        backbone: the pyramid backbone.
        num_classes: object classes (background excluded).
        image_size: images are resized so the longer side is this (torchvision keeps the aspect and pads
            batches; the backbone pads to whole windows).
        mean / std: the backbone's normalisation (0-1 scale).
        masks: build the mask branch.
        head_channels / fc_dim: conv width of the heads and the box head's fc width.
        **kwargs: further ``MaskRCNN`` arguments (``box_batch_size_per_image``, ``rpn_*``, ...).
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    C = backbone.out_channels
    strides = [*backbone.strides, backbone.strides[-1] * 2]
    anchors = AnchorGenerator(sizes=tuple((8 * s,) for s in strides), aspect_ratios=((0.5, 1.0, 2.0),) * len(strides))
    levels = [str(i) for i in range(len(backbone.strides))]
    common = dict(
        num_classes=None,
        min_size=image_size,
        max_size=image_size,
        image_mean=list(mean),
        image_std=list(std),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(C, 3, conv_depth=2),
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=FastRCNNConvFCHead((C, 7, 7), [head_channels] * 4, [fc_dim], norm_layer=LayerNorm2d),
        box_predictor=FastRCNNPredictor(fc_dim, num_classes + 1),
        **kwargs,
    )
    if not masks:
        return FasterRCNN(backbone, **common)
    return MaskRCNN(
        backbone,
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
        mask_head=MaskRCNNHeads(C, [head_channels] * 4, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(head_channels, head_channels, num_classes + 1),
        **common,
    )


@register_task_model
class VLMoEForDetection(TaskModel):
    """Mask R-CNN on the vision branch (see the module docstring).

    Args:
        backbone: a vlmoe backbone (ideally ``modalities=["vision"]``, ``final_norm=False``).
        class_names: object class names (background excluded), in label order 1..K.
        image_size: the detector's input size (longer side).
        mean / std: normalisation of the backbone (0-1 scale).
        window_size / global_blocks / out_channels: :class:`ViTDetBackbone` options.
        masks: instance masks (Mask R-CNN) or boxes only (Faster R-CNN).
        detector_options: further ``MaskRCNN`` arguments.
    """

    task = "detection"

    def __init__(
        self,
        backbone: VLMoE,
        class_names: list[str],
        image_size: int = 1024,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        window_size: int = 14,
        global_blocks: list[int] | None = None,
        out_channels: int = 256,
        masks: bool = True,
        detector_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(backbone)
        if not class_names:
            raise ValueError("VLMoEForDetection needs the object class names")
        self.class_names, self.image_size = list(class_names), image_size
        self.mean, self.std = list(mean), list(std)
        self.window_size, self.out_channels, self.masks = window_size, out_channels, masks
        self.detector_options = dict(detector_options or {})
        pyramid = ViTDetBackbone(backbone, window_size, global_blocks, out_channels)
        self.global_blocks = pyramid.global_blocks
        self.detector = build_mask_rcnn(pyramid, len(self.class_names), image_size, mean, std, masks,
                                        **self.detector_options)

    @property
    def pyramid(self) -> ViTDetBackbone:
        """The backbone + pyramid the detector runs (``detector.backbone``)."""
        return self.detector.backbone

    def head_config(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "image_size": self.image_size, "mean": self.mean, "std": self.std,
                "window_size": self.window_size, "global_blocks": self.global_blocks,
                "out_channels": self.out_channels, "masks": self.masks, "detector_options": self.detector_options}

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """torchvision's contract: training -> the loss dict, eval -> detections per image (boxes xyxy in
        the input image's pixels, labels 1..K, scores, masks ``(N, 1, H, W)`` probabilities)."""
        return self.detector(images, targets)

    @property
    def aux(self) -> MoEAux | None:
        """The MoE auxiliary terms of the last forward."""
        return self.pyramid.aux
