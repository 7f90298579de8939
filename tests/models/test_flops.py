"""FLOPs per token from a config (the FLOP ideal of `vlmoe bench model` and the study's parity rule)
equal what torch's FLOP counter measures over a real forward pass, and give the ratios of the presets."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vlmoe.models import VLMoE, VLMoEConfig
from vlmoe.models.flops import ffn_flops_per_token, flops_per_token


@pytest.mark.parametrize("name", ["tiny", "tiny_moe", "tiny_mhmoe"])
def test_formula_is_what_the_backbone_computes(name: str) -> None:
    torch.manual_seed(0)
    cfg = VLMoEConfig.from_name(name)
    model = VLMoE(cfg).eval()
    B, Lt = 3, 12
    image, ids = torch.randn(B, 3, 32, 32), torch.randint(0, cfg.vocab_size, (B, Lt))
    # the math attention kernel: its two batched products are what the counter sees (the fused CPU kernel
    # is not in its table); the counter's module tracker needs autograd on
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(image=image, text_ids=ids)
    counts = counter.get_flop_counts()["Global"]
    measured = sum(v for op, v in counts.items() if "convolution" not in str(op))  # the patch embedding is not counted
    L = 1 + cfg.num_patches + Lt
    assert measured / (B * L) == pytest.approx(flops_per_token(cfg, L)["total"], rel=1e-9)


def test_preset_ratios() -> None:
    dense = flops_per_token(VLMoEConfig.from_name("base"), 261)["total"]
    for name in ("base_moe8", "base_mhmoe8"):  # MoE in 6 of 12 blocks, top-2: 32 d^2 instead of 16 d^2
        ratio = flops_per_token(VLMoEConfig.from_name(name), 261)["total"] / dense
        assert ratio == pytest.approx(1.315, abs=0.003), name
    ffn = ffn_flops_per_token(VLMoEConfig.from_name("base_mhmoe8"))
    assert ffn["per_block"][0] == 16 * 768**2 and ffn["per_block"][1] == pytest.approx(32 * 768**2, rel=0.005)
