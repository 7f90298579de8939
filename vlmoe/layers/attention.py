"""Multiway self-attention over the concatenated vision + text sequence.

BEiT-3 as released (torchscale ``MultiheadAttention`` with ``multiway=True, subln=True``) gives every
projection a vision and a text copy: ``q/k/v_proj``, the sub-LN ``inner_attn_ln`` applied to the
attention output before ``out_proj``, and ``out_proj`` itself. Only the softmax over the
concatenated sequence mixes the modalities. Here the three input projections are fused into one
``qkv`` linear per modality (one GEMM instead of three; a checkpoint's q/k/v are concatenated on
load), the core is :func:`torch.nn.functional.scaled_dot_product_attention`, and the paper variant
(one attention shared by both modalities, as in VLMo) is the ``multiway=False`` option.

Masks follow BEiT-3's convention: ``attn_mask`` True / non-zero = *blocked* (e.g. the captioning
mask), ``key_padding_mask`` True = padding. :func:`build_attention_mask` turns them into the boolean
"may attend" mask that SDPA takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from torch import Tensor, nn

from ..moe.gemm import Linear
from .kv_cache import LayerKV
from .multiway import MODALITIES, Multiway, Shared, Stream


def build_attention_mask(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    length: int,
    batch: int,
    query_length: int | None = None,
) -> Tensor | None:
    """Combine a key padding mask and an attention mask into an SDPA boolean mask (True = attend).

    Args:
        key_padding_mask: ``(B, L)``, True = padding key.
        attn_mask: ``(Lq, L)`` or ``(B, Lq, L)`` (query, key), True / non-zero = blocked.
        length: number of keys L (the whole sequence; with a KV cache, cached + new tokens).
        batch: batch size B.
        query_length: number of queries Lq (default L; with a KV cache, the new tokens).

    Returns:
        ``None`` when there is nothing to mask, else a bool tensor broadcastable to ``(B, H, Lq, L)``.
    """
    lq = length if query_length is None else query_length
    allowed = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, length):
            raise ValueError(
                f"key padding mask has shape {tuple(key_padding_mask.shape)}; expected ({batch}, {length})"
            )
        allowed = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
    if attn_mask is not None:
        if attn_mask.shape not in ((lq, length), (batch, lq, length)):
            raise ValueError(
                f"attn_mask has shape {tuple(attn_mask.shape)}; expected ({lq}, {length}) or ({batch}, {lq}, "
                f"{length}): (queries, keys) over the tokens (vision first, then text)"
                + ("" if lq == length else "; keys = cached + new tokens")
            )
        am = attn_mask if attn_mask.dtype == torch.bool else attn_mask != 0
        am = ~am if am.ndim == 2 else ~am[:, None]  # (L, L) or (B, 1, L, L)
        allowed = am if allowed is None else allowed & am
    return allowed


class MultiwayAttention(nn.Module):
    """Self-attention whose projections are per modality (decoupled) or shared.

    Args:
        dim: token width.
        num_heads: attention heads.
        qkv_bias: biases on the q/k/v projections.
        sub_ln: Magneto sub-LN on the attention output before ``proj`` (BEiT-3 ``inner_attn_ln``).
        eps: LayerNorm epsilon.
        attn_drop: dropout on the attention probabilities.
        proj_drop: dropout on the output.
        multiway: per-modality projections (BEiT-3 as released); False shares them (paper / VLMo).
        modalities: the branches to build with ``multiway`` (a vision-only model has no text copies).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        sub_ln: bool = True,
        eps: float = 1e-5,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        multiway: bool = True,
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MultiwayAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = use_fused_attn()

        def ways(factory):
            return Multiway.copies(factory, modalities=modalities) if multiway else Shared(factory())

        self.qkv = ways(lambda: Linear(dim, 3 * dim, bias=qkv_bias))
        self.norm = ways(lambda: nn.LayerNorm(dim, eps=eps)) if sub_ln else Shared(nn.Identity())
        self.proj = ways(lambda: Linear(dim, dim))
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, xv: Stream, xt: Stream, attn_mask: Tensor | None = None, cache: LayerKV | None = None
    ) -> tuple[Stream, Stream]:
        """Attend over the concatenation ``[vision; text]``.

        Args:
            xv: vision tokens ``(B, Lv, D)`` or None.
            xt: text tokens ``(B, Lt, D)`` or None.
            attn_mask: SDPA boolean mask (True = attend) broadcastable to ``(B, H, L, L)``, see
                :func:`build_attention_mask`; with a cache ``(B, H, L_new, L_cached + L_new)``.
            cache: incremental decoding: the new tokens' keys / values are appended to it and the
                queries attend over everything it holds.
        """
        qv, qt = self.qkv(xv, xt)
        qkv = qv if qt is None else qt if qv is None else torch.cat([qv, qt], dim=1)  # (B, L, 3D)
        B, L, _ = qkv.shape
        num_vision = 0 if xv is None else xv.shape[1]
        # (B, L, 3D) -> (B, L, 3, H, hd) -> (3, B, H, L, hd): q, k, v each (B, H, L, hd)
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, L_cached + L, hd)
        drop = self.attn_drop if self.training else 0.0
        if self.fused_attn:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)  # (B, H, L, hd)
        else:  # readable reference path (timm's TIMM_FUSED_ATTN=0 switch)
            scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, L, L)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            probs = F.dropout(scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype), drop, self.training)
            o = probs @ v
        o = o.transpose(1, 2).reshape(B, L, self.dim)  # (B, H, L, hd) -> (B, L, D)
        ov = o[:, :num_vision] if xv is not None else None
        ot = o[:, num_vision:] if xt is not None else None
        ov, ot = self.proj(*self.norm(ov, ot))
        return _apply_drop(self.proj_drop, ov), _apply_drop(self.proj_drop, ot)


def _apply_drop(drop: nn.Module, x: Stream) -> Stream:
    return None if x is None else drop(x)
