"""The study's variants: Dense and the MoE layers at FFN FLOP parity (see :mod:`vlmoe.study`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_VARIANTS", "VARIANTS", "flop_table", "variant_config"]

# name -> (label, preset, model overrides)
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "dense": ("Dense (FFN 256)", "tiny", {"mlp_dim": 256}),
    "xmoe": ("X-MoE", "tiny_moe", {"moe": {"router": "xmoe"}}),
    "mhmoe": ("MH-MoE", "tiny_mhmoe", {}),
    "hmoe": ("HMoE", "tiny_moe", {"moe": {"expert_sizes": [96, 117, 139, 160], "balance_loss": "p_penalty",
                                          "balance_coef": 0.01, "entropy_coef": 0.0,
                                          "ffn_layernorm": False}}),
    "stratified": ("Stratified MoE", "tiny_moe", {"moe": {"top_k": 1, "strata": [2, 2], "ffn_dim": 171}}),
    "dense_narrow": ("Dense (FFN 128)", "tiny", {}),
}
DEFAULT_VARIANTS = ("dense", "xmoe", "mhmoe")


def variant_config(name: str) -> Any:
    """The backbone config of a study variant."""
    from vlmoe.models import VLMoEConfig

    if name not in VARIANTS:
        raise ValueError(f"unknown study variant {name!r}; choose from {', '.join(VARIANTS)}")
    _, preset, overrides = VARIANTS[name]
    return VLMoEConfig.from_name(preset, **overrides)


def flop_table(variants: Sequence[str]) -> dict[str, dict[str, float]]:
    """FFN FLOPs and activated FFN parameters per token of each variant, from its config."""
    from vlmoe.models.flops import ffn_flops_per_token

    out = {}
    for v in variants:
        cfg = variant_config(v)
        f = ffn_flops_per_token(cfg)
        out[v] = {"ffn_flops_per_token": f["mean"], "activated_ffn_params_per_token": f["mean"] / 2}
    return out
