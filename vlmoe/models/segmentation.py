"""Semantic segmentation on the vision branch: BEiT's UperNet recipe (mmsegmentation ``configs/beit``).

:class:`VLMoEForSegmentation`: the vision branch of any vlmoe backbone (dense or MoE FFNs; the MoE
auxiliary terms come back with the logits, as in every task) -> the patch tokens of four blocks
(``out_indices``; base: blocks 4, 6, 8, 12, large: 8, 12, 16, 24) as ``(B, D, gh, gw)`` maps -> BEiT's
multi-scale neck (x4: two 2x2 stride-2 transposed convolutions with BatchNorm + GELU between; x2: one;
x1: identity; x0.5: 2x2 max-pool) -> a UperNet decode head (pyramid pooling over the coarsest level at
scales 1, 2, 3, 6, lateral + top-down FPN, fuse, dropout, 1x1 classifier) and the auxiliary FCN head on
the third level (3x3 conv, BatchNorm, ReLU, dropout, 1x1 classifier; loss weight 0.4 in the task).
Logits are upsampled (bilinear) to the input size.

The UperNet head is segmentation-models-pytorch's ``UPerNetDecoder`` (PSP + FPN + fusion, as mmsegmentation's
``UPerHead``; it also normalises each input level with a LayerNorm2d) rather than a copy of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from vlmoe.moe import MoEAux

from .backbone import VLMoE
from .task_models import TaskModel, class_count, register_task_model

__all__ = ["SegmentationNeck", "VLMoEForSegmentation", "default_out_indices"]


def default_out_indices(depth: int) -> tuple[int, ...]:
    """The four blocks whose outputs feed the neck (0-based): BEiT's 3, 5, 7, 11 for 12 blocks and 7, 11,
    15, 23 for 24; otherwise the last block of each quarter (a block may repeat for a shallow model)."""
    if depth == 12:
        return (3, 5, 7, 11)
    if depth == 24:
        return (7, 11, 15, 23)
    return tuple(max(0, round(depth * k / 4) - 1) for k in range(1, 5))


class SegmentationNeck(nn.Module):
    """Four ``(B, D, gh, gw)`` maps -> strides ``p/4, p/2, p, 2p`` (``p`` = patch size), BEiT's neck."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        return [f(x) for f, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]


@register_task_model
class VLMoEForSegmentation(TaskModel):
    """Semantic segmentation (see the module docstring).

    Args:
        backbone: a backbone (ideally built with ``modalities=["vision"]``).
        num_classes: classes (taken from ``class_names`` when those are given).
        class_names: readable class names (stored in exports; predictions carry them).
        out_indices: the four blocks feeding the neck (default :func:`default_out_indices`).
        decoder_channels: UperNet's width (BEiT base: 768; default: the backbone's width).
        aux_channels: the auxiliary FCN head's width (256).
        dropout: before both classifiers (0.1).
    """

    task = "semantic_segmentation"

    def __init__(self, backbone: VLMoE, num_classes: int | None = None, class_names: list[str] | None = None,
                 out_indices: Sequence[int] | None = None, decoder_channels: int | None = None,
                 aux_channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__(backbone)
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        num_classes = class_count(num_classes, class_names, type(self).__name__)
        c = backbone.config
        if not c.has_vision:
            raise ValueError(f"VLMoEForSegmentation needs a vision branch (modalities {list(c.modalities)})")
        self.out_indices = tuple(out_indices) if out_indices is not None else default_out_indices(c.depth)
        if len(self.out_indices) != 4 or not all(0 <= i < c.depth for i in self.out_indices):
            raise ValueError(f"out_indices must be 4 block indices in [0, {c.depth}), got {list(self.out_indices)}")
        self.num_classes, self.class_names = num_classes, class_names
        self.decoder_channels = decoder_channels or c.dim
        self.aux_channels, self.dropout = aux_channels, dropout
        self.neck = SegmentationNeck(c.dim)
        # smp's decoder reads levels [1, 1/2, 1/4, 1/8, 1/16, 1/32] and skips the first two
        self.decode_head = UPerNetDecoder([0, 0] + [c.dim] * 4, encoder_depth=5,
                                          decoder_channels=self.decoder_channels)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(self.decoder_channels, num_classes, 1))
        self.aux_head = nn.Sequential(
            nn.Conv2d(c.dim, aux_channels, 3, padding=1, bias=False), nn.BatchNorm2d(aux_channels), nn.ReLU(),
            nn.Dropout2d(dropout), nn.Conv2d(aux_channels, num_classes, 1),
        )

    def head_config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": self.class_names, "out_indices": list(self.out_indices),
                "decoder_channels": self.decoder_channels, "aux_channels": self.aux_channels, "dropout": self.dropout}

    def features(self, image: Tensor) -> tuple[list[Tensor], MoEAux]:
        """The neck's four levels (strides p/4 .. 2p) of ``(B, 3, S, S)`` images, and the MoE aux terms."""
        out = self.backbone(image=image, return_layers=True)
        gh, gw = self.backbone.vision_embed.grid_size
        B = image.shape[0]
        # each block's patch tokens (CLS dropped): (B, N, D) -> (B, D, gh, gw)
        maps = [out.layer_states[i][:, 1 : 1 + gh * gw].transpose(1, 2).reshape(B, -1, gh, gw)
                for i in self.out_indices]
        return self.neck(maps), out.aux

    def forward(self, image: Tensor, return_aux: bool = False, return_aux_logits: bool = False) -> Any:
        """``(B, num_classes, S, S)`` logits at the input size; with ``return_aux_logits`` also the
        auxiliary head's (same size); with ``return_aux`` also the MoE aux terms."""
        levels, aux = self.features(image)
        size = image.shape[-2:]
        logits = self.classifier(self.decode_head([None, None, *levels]))  # stride p/4
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        outputs: tuple[Any, ...] = (logits,)
        if return_aux_logits:
            outputs += (F.interpolate(self.aux_head(levels[2]), size=size, mode="bilinear", align_corners=False),)
        if return_aux:
            outputs += (aux,)
        return outputs[0] if len(outputs) == 1 else outputs
