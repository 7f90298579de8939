"""One pre-LN multiway transformer block (BEiT-3 ``EncoderLayer`` with ``multiway=True``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from vlmoe.layers import MODALITIES, LayerKV, Multiway, MultiwayAttention, MultiwayDropPath, MultiwayFFN, Shared, Stream
from vlmoe.moe import MoEAux


def _add(x: Stream, y: Stream) -> Stream:
    return None if x is None else x + y


class MultiwayBlock(nn.Module):
    """``x = x + drop_path(attn(norm1(x)));  x = x + drop_path(mlp(norm2(x)))`` on (vision, text) streams.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp: the FFN slot (dense or MoE per modality, or a shared pool), built by the caller.
        qkv_bias: biases on q/k/v.
        sub_ln: Magneto sub-LN inside attention.
        eps: LayerNorm epsilon.
        drop_path: stochastic depth rate of this block.
        attn_drop: attention-probability dropout.
        proj_drop: dropout on the attention output.
        share_attention: one attention and ``norm1`` for both modalities (paper variant).
        vl_norm: a third ``norm2`` for image+text inputs, paired with a VL-FFN in ``mlp``.
        modalities: the branches to build (``("vision",)``: a vision-only block, no text copies).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp: MultiwayFFN,
        *,
        qkv_bias: bool = True,
        sub_ln: bool = True,
        eps: float = 1e-5,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        share_attention: bool = False,
        vl_norm: bool = False,
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        super().__init__()

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(dim, eps=eps)

        self.norm1 = Shared(norm()) if share_attention else Multiway.copies(norm, modalities=modalities)
        self.attn = MultiwayAttention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            sub_ln=sub_ln,
            eps=eps,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            multiway=not share_attention,
            modalities=modalities,
        )
        self.drop_path1 = MultiwayDropPath(drop_path)
        self.norm2 = Multiway.copies(norm, vl=vl_norm, modalities=modalities)
        self.mlp = mlp
        self.drop_path2 = MultiwayDropPath(drop_path)

    def forward(
        self,
        xv: Stream,
        xt: Stream,
        attn_mask: Tensor | None = None,
        text_padding_mask: Tensor | None = None,
        cache: LayerKV | None = None,
    ) -> tuple[Stream, Stream, MoEAux | None]:
        """Args:
        xv: vision tokens ``(B, Lv, D)`` or None.
        xt: text tokens ``(B, Lt, D)`` or None.
        attn_mask: SDPA boolean mask over the concatenated sequence (True = attend).
        text_padding_mask: ``(B, Lt)`` True = padding (kept out of MoE routing).
        cache: this block's key / value cache (incremental decoding: only new tokens come in).
        """
        hv, ht = self.drop_path1(*self.attn(*self.norm1(xv, xt), attn_mask=attn_mask, cache=cache))
        xv, xt = _add(xv, hv), _add(xt, ht)
        hv, ht, aux = self.mlp(*self.norm2(xv, xt), text_padding_mask=text_padding_mask, residual=(xv, xt))
        hv, ht = self.drop_path2(hv, ht)
        return _add(xv, hv), _add(xt, ht), aux
