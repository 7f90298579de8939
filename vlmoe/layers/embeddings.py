"""Token embeddings of the multiway backbone: image patches and text, each with its own positions.

BEiT-3 (torchscale ``component/embedding.py``) embeds each modality separately and counts positions
from 2 in every modality (a fairseq convention: rows 0 and 1 of each position table are never
used). The tables here keep that layout so that checkpoint shapes are unchanged: the vision table
has ``2 + 1 + num_patches`` rows (199 at 224 px / patch 16), the text table ``max_text_positions``
rows (1024, so at most 1022 text tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from torch import Tensor, nn

POSITION_OFFSET = 2
"""Row of position 0 in every BEiT-3 position table."""


class PositionEmbedding(nn.Module):
    """A learned absolute position table whose row ``offset + i`` embeds position ``i``.

    Args:
        num_rows: rows of the table, including the ``offset`` unused leading rows.
        dim: embedding width.
        offset: row of position 0 (2 in BEiT-3).
        name: what the table belongs to, for error messages.
    """

    def __init__(self, num_rows: int, dim: int, offset: int = POSITION_OFFSET, name: str = "") -> None:
        super().__init__()
        if num_rows <= offset:
            raise ValueError(f"PositionEmbedding {name}: num_rows={num_rows} must exceed offset={offset}")
        self.offset = offset
        self.name = name
        self.weight = nn.Parameter(torch.zeros(num_rows, dim))

    @property
    def max_length(self) -> int:
        """Longest sequence the table can embed."""
        return self.weight.shape[0] - self.offset

    def extra_repr(self) -> str:
        return f"rows={self.weight.shape[0]}, dim={self.weight.shape[1]}, offset={self.offset}"

    def forward(self, length: int, positions: Tensor | None = None) -> Tensor:
        """Positions ``0..length-1`` as ``(length, dim)``, or explicit ``positions`` (B, L) as (B, L, dim)."""
        if positions is not None:
            return F.embedding(positions + self.offset, self.weight)
        if length > self.max_length:
            raise ValueError(
                f"sequence of {length} tokens is longer than the position table {self.name} "
                f"({self.weight.shape[0]} rows from row {self.offset}, so at most {self.max_length} tokens)"
            )
        return self.weight[self.offset : self.offset + length]  # a view: no gather


def resample_vision_positions(
    weight: Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix: int = POSITION_OFFSET + 1,
) -> Tensor:
    """Resize a vision position table ``(num_prefix + H*W, D)`` to a new patch grid, bicubic.

    The ``num_prefix`` leading rows (BEiT-3: 2 unused rows and the CLS position) are kept; the grid
    rows are interpolated as BEiT-3 does when finetuning at another resolution (bicubic,
    ``align_corners=False``, no antialiasing).

    Args:
        weight: the table, ``(num_prefix + H*W, D)``.
        new_grid: target ``(H', W')`` patch grid.
        old_grid: source grid; ``None`` infers a square one.
        num_prefix: rows that are not part of the grid.
    """
    n = weight.shape[0] - num_prefix
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"vision position table has {weight.shape[0]} rows = {num_prefix} prefix + {n} patches, "
                "which is not a square grid; pass old_grid"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"vision position table has {n} patch rows, not a {old_grid[0]}x{old_grid[1]} grid")
    if tuple(new_grid) == tuple(old_grid):
        return weight
    out = resample_abs_pos_embed(
        weight.unsqueeze(0),
        list(new_grid),
        list(old_grid),
        num_prefix_tokens=num_prefix,
        interpolation="bicubic",
        antialias=False,
    )
    return out.squeeze(0)


class VisionEmbedding(nn.Module):
    """Patch embedding with a CLS token, a MIM mask token and BEiT-3 positions.

    ``image (B, C, H, W) -> (B, 1 + N, D)``: patches from a strided conv (timm ``PatchEmbed``),
    masked patches replaced by ``mask_token``, ``cls_token`` prepended, positions added.

    Args:
        img_size: input size (square int or (H, W)); inputs must match it exactly (as BEiT-3);
            :meth:`set_image_size` changes it and resizes the position table.
        patch_size: patch side.
        in_chans: image channels.
        dim: embedding width.
    """

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = PositionEmbedding(
            POSITION_OFFSET + 1 + self.num_patches, dim, name="vision_embed.pos_embed.weight"
        )

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def num_tokens(self) -> int:
        """Tokens per image: CLS + patches."""
        return 1 + self.num_patches

    def init_weights(self, std: float = 0.02) -> None:
        for p in (self.cls_token, self.mask_token, self.pos_embed.weight):
            trunc_normal_(p, std=std)

    @torch.no_grad()
    def set_image_size(self, img_size: int | tuple[int, int]) -> None:
        """Change the input resolution; the position table is resized (bicubic) to the new grid."""
        old_grid = self.grid_size
        self.patch_embed.set_input_size(img_size=to_2tuple(img_size))
        new = resample_vision_positions(self.pos_embed.weight.data, self.grid_size, old_grid)
        self.pos_embed.weight = nn.Parameter(new.contiguous(), requires_grad=self.pos_embed.weight.requires_grad)

    def forward(self, image: Tensor, mask: Tensor | None = None) -> Tensor:
        """Embed images.

        Args:
            image: ``(B, C, H, W)``, ``(H, W)`` equal to :attr:`img_size`.
            mask: optional MIM mask ``(B, N)`` over patches (no CLS), True = replace by the mask token.
        """
        if image.ndim != 4:
            raise ValueError(f"image must be (B, C, H, W); got shape {tuple(image.shape)}")
        c = self.patch_embed.proj.in_channels
        if image.shape[1] != c or tuple(image.shape[-2:]) != self.img_size:
            raise ValueError(
                f"image of shape {tuple(image.shape)} does not fit vision_embed, which expects (B, {c}, "
                f"{self.img_size[0]}, {self.img_size[1]}); resize the image or call "
                "model.set_image_size(...) (positions are interpolated bicubically)"
            )
        x = self.patch_embed(image)  # (B, N, D)
        B, N, D = x.shape
        if mask is not None:
            if mask.shape != (B, N):
                raise ValueError(f"image_mask has shape {tuple(mask.shape)}; expected (batch, patches) = ({B}, {N})")
            # torch.where, not the x*(1-w) + m*w blend: identical for a 0/1 mask and one op cheaper
            x = torch.where(mask.bool().unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + N, D)
        return x + self.pos_embed(1 + N)


class TextEmbedding(nn.Module):
    """Token embedding plus BEiT-3 text positions: ``ids (B, L) -> (B, L, D)``.

    Args:
        vocab_size: rows of the token table (64010 for the BEiT-3 sentencepiece vocabulary).
        dim: embedding width.
        max_positions: rows of the position table (positions start at row 2).
    """

    def __init__(self, vocab_size: int, dim: int, max_positions: int = 1024) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = PositionEmbedding(max_positions, dim, name="text_embed.pos_embed.weight")

    @property
    def max_length(self) -> int:
        return self.pos_embed.max_length

    def init_weights(self, std: float = 0.02) -> None:
        trunc_normal_(self.token_embed.weight, std=std)
        trunc_normal_(self.pos_embed.weight, std=std)

    def forward(self, ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """Embed token ids ``(B, L)``; ``positions`` (B, L) overrides ``0..L-1`` (incremental decoding)."""
        if ids.ndim != 2:
            raise ValueError(f"text_ids must be (B, L); got shape {tuple(ids.shape)}")
        if positions is None and ids.shape[1] > self.max_length:
            raise ValueError(
                f"text_ids has {ids.shape[1]} tokens but text_embed.pos_embed.weight has "
                f"{self.pos_embed.weight.shape[0]} rows starting at row {self.pos_embed.offset}, "
                f"i.e. at most "
                f"{self.max_length} tokens (VLMoEConfig.max_text_positions)"
            )
        return self.token_embed(ids) + self.pos_embed(ids.shape[1], positions)
