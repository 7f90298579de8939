"""The dense feed-forward network of a multiway block (BEiT-3 / Magneto FFN).

``fc1 -> GELU (computed in float32) -> [sub-LN over the hidden layer] -> fc2``: timm's ``Mlp`` with
a hidden-layer ``norm``; the attribute names (``fc1, act, norm, fc2``) are timm's, so timm BEiT-3
checkpoints map one to one and :meth:`vlmoe.moe.GroupedExperts.load_dense` takes the parts as is.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from ..moe.gemm import use_fast_linears


class GELUFp32(nn.Module):
    """Exact GELU evaluated in float32 and cast back (BEiT-3 does this for fp16/bf16 stability)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x.float()).to(x.dtype)


def FeedForward(
    dim: int,
    hidden_dim: int,
    *,
    sub_ln: bool = True,
    eps: float = 1e-5,
    drop: float = 0.0,
    act_drop: float = 0.0,
) -> Mlp:
    """A dense FFN ``dim -> hidden_dim -> dim``.

    Args:
        dim: token width.
        hidden_dim: hidden width (3072 in BEiT-3 base).
        sub_ln: Magneto sub-LN: LayerNorm over the hidden layer before ``fc2`` (BEiT-3 ``ffn_layernorm``).
        eps: LayerNorm epsilon.
        drop: dropout on the output.
        act_drop: dropout after the activation.
    """
    norm = partial(nn.LayerNorm, eps=eps) if sub_ln else None
    # fc1 / fc2 through vlmoe's fp32 CPU GEMM backend (same modules and state dict, see vlmoe.moe.gemm)
    return use_fast_linears(Mlp(dim, hidden_dim, act_layer=GELUFp32, norm_layer=norm, drop=(act_drop, drop)))
