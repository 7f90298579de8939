"""FLOPs per token of a backbone, from its config alone (forward; multiply-adds x 2; matrix terms only,
as the papers count them: norms, biases, softmax and activations are left out).

Per block and token (d = width, L = tokens in the sequence, F = the FFN's hidden width):

- attention: q, k, v and output projections ``8 d^2`` + scores and their weighted sum ``4 L d``;
- FFN: ``4 d F`` (GELU; SwiGLU ``6 d F``) for a dense FFN, or for an MoE layer
  :func:`vlmoe.moe.expected_moe_flops_per_token` (router + k experts per (sub-)token + MH-MoE's
  projections; HMoE at the mean expert width and Stratified MoE at the expected passes, both under
  uniform routing).

A multiway block computes one FFN (or MoE layer) per token - the one of its modality - so the FLOPs
per token do not depend on the modality mix (the modalities' FFNs have the same shape). A backward
pass costs about twice the forward: a training step ~ 3x these figures.
"""

from __future__ import annotations

from typing import Any

from vlmoe.moe.sizing import expected_moe_flops_per_token

from .config import VLMoEConfig

__all__ = ["ffn_flops_per_token", "flops_per_token"]


def _dense_ffn(config: VLMoEConfig) -> float:
    return 2 * 2 * config.dim * config.mlp_dim


def ffn_flops_per_token(config: VLMoEConfig, router: bool = True) -> dict[str, Any]:
    """FFN FLOPs per token: ``{"per_block": [...], "total": sum, "mean": per block}`` (MoE blocks counted
    with :func:`~vlmoe.moe.expected_moe_flops_per_token`)."""
    moe = set(config.moe_layer_indices)
    per_block = [expected_moe_flops_per_token(config.dim, config.moe, router) if i in moe else _dense_ffn(config)
                 for i in range(config.depth)]
    return {"per_block": per_block, "total": float(sum(per_block)), "mean": float(sum(per_block) / config.depth)}


def flops_per_token(config: VLMoEConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of the whole backbone for sequences of ``seq_len`` tokens:
    ``{"attention", "ffn", "total"}`` (embeddings and heads excluded)."""
    d = config.dim
    attention = config.depth * (8 * d * d + 4 * seq_len * d)
    ffn = ffn_flops_per_token(config)["total"]
    return {"attention": float(attention), "ffn": ffn, "total": float(attention + ffn)}
