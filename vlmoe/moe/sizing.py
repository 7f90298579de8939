"""Sizing helpers: parameter / FLOP counts and MH-MoE configurations matched to a plain MoE.

Counts use the leading (matrix) terms only, as the papers do; biases and norms are ignored.

- :func:`mhmoe_param_parity` - MH-MoE v1 (arXiv 2404.15045, appendix D): keep E and k, widen each
  expert so that total parameters match: 2d^2 (head + merge) + E * 2 (d/h) F' = E * 2 d F, i.e.
  F' = h * (F - d/E)  (= h * beta * F with beta = 1 - d/(E F)). FLOPs are then ~h times higher.
- :func:`mhmoe_flop_parity` - the follow-up (arXiv 2411.16205, eqs. 8-9): keep k, set the expert
  width to d_mh = F - d/k so that FLOPs per token match (4 d^2 + 4 k d d_mh = 4 k d F), and choose
  the expert count from the parameter equation 2 d F E = 2 d^2 + 2 (d/h) d_mh E'.
"""

from __future__ import annotations

from .config import MoEConfig


def _ffn_mats(config: MoEConfig) -> int:
    return 3 if config.expert_type == "swiglu" else 2


def moe_params(dim: int, config: MoEConfig) -> int:
    """Matrix parameters of a layer: experts + MH-MoE projections (router excluded)."""
    sub = dim // config.heads
    proj = 2 * dim * dim if config.use_head_projections else 0
    return proj + config.num_experts * _ffn_mats(config) * sub * config.ffn_dim


def moe_flops_per_token(dim: int, config: MoEConfig) -> int:
    """Forward multiply-adds x 2 per token: projections + h sub-tokens x k experts."""
    sub = dim // config.heads
    proj = 2 * 2 * dim * dim if config.use_head_projections else 0
    return proj + config.heads * config.top_k * 2 * _ffn_mats(config) * sub * config.ffn_dim


def mhmoe_param_parity(dim: int, config: MoEConfig, heads: int = 4) -> MoEConfig:
    """MH-MoE v1: same experts and k, expert width widened to match the plain layer's parameters."""
    if dim % heads:
        raise ValueError(f"dim={dim} is not divisible by heads={heads}")
    f = round(heads * (config.ffn_dim - dim / config.num_experts))
    if f < 1:
        raise ValueError(f"no parameter-parity width for dim={dim}, ffn_dim={config.ffn_dim}, E={config.num_experts}")
    return config.replace(heads=heads, ffn_dim=f, head_projections=True)


def mhmoe_flop_parity(dim: int, config: MoEConfig, heads: int = 4) -> MoEConfig:
    """MH-MoE v2 (FLOP parity): d_mh = F - d/k, experts from 2 d F E = 2 d^2 + 2 (d/h) d_mh E'."""
    if dim % heads:
        raise ValueError(f"dim={dim} is not divisible by heads={heads}")
    k = config.top_k
    d_mh = round(config.ffn_dim - dim / k)
    if d_mh < 1:
        raise ValueError(f"no FLOP-parity width: ffn_dim={config.ffn_dim} <= dim/k={dim / k}")
    experts = round(heads * (config.ffn_dim * config.num_experts - dim) / d_mh)
    experts = max(experts, k)
    return config.replace(heads=heads, ffn_dim=d_mh, num_experts=experts, head_projections=True)
