"""Stratified MoE: strata, dynamic passes, per-pass residuals."""

from __future__ import annotations

import pytest
import torch

from vlmoe.moe import MoE, MoEConfig

from .reference import reference_stratified


def _perturb(layer, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def test_one_stratum_equals_the_plain_layer():
    torch.manual_seed(0)
    plain = MoE(12, MoEConfig(num_experts=4, top_k=2, ffn_dim=16))
    strat = MoE(12, MoEConfig(num_experts=4, top_k=2, ffn_dim=16, strata=[4]))
    _perturb(plain)
    sd = plain.state_dict()
    sd = {k.replace("router.", "strata_routers.0."): v for k, v in sd.items()}
    strat.load_state_dict(sd)
    x = torch.randn(2, 5, 12)
    y1, a1 = plain(x)
    y2, a2 = strat(x)
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(a2.loss, a1.loss)
    assert a2.stats[0].passes_per_token.tolist() == [10]


@pytest.mark.parametrize("strata,top_k,use_residual,ln", [
    ([2, 2, 4], 1, False, True),
    ([2, 2, 4], 2, True, True),
    ([3, 1], 2, True, False),
    ([1, 1, 1, 1], 1, False, True),
])
def test_batched_passes_match_the_per_token_reference(strata, top_k, use_residual, ln):
    torch.manual_seed(1)
    E = sum(strata)
    # router_fp32=False: the reference routes one token at a time, and a float32 router would differ from
    # the batched one in the last bits
    cfg = MoEConfig(num_experts=E, top_k=top_k, ffn_dim=10, strata=strata, strata_layernorm=ln, router_fp32=False)
    layer = MoE(8, cfg).double()
    _perturb(layer, seed=3, scale=0.6)
    x = torch.randn(17, 8, dtype=torch.float64)
    r = torch.randn(17, 8, dtype=torch.float64) if use_residual else None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = reference_stratified(layer, x1, r)
    g_ref = torch.autograd.grad((y_ref**2).sum(), [x1, layer.experts.w1])
    y, aux = layer(x2, residual=r)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    g = torch.autograd.grad((y**2).sum(), [x2, layer.experts.w1])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    passes = aux.stats[0].passes_per_token
    assert int(passes.sum()) == 17 and passes.numel() == len(strata)
    # only active tokens are computed: assignments = sum over tokens of passes x k (k shrinks at the top)
    assert int(aux.tokens_per_expert.sum()) <= top_k * int((passes * torch.arange(1, len(strata) + 1)).sum())


def test_tokens_choosing_the_last_stratum_leave_after_one_pass():
    layer = MoE(6, MoEConfig(num_experts=4, top_k=1, ffn_dim=6, strata=[2, 2]))
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])  # stratum 0's router prefers expert 2 (stratum 1)
    layer.strata_routers[0].compute_logits = lambda x: (x.new_zeros(x.shape[0], 4) + bias, None)
    _, aux = layer(torch.randn(9, 6))
    assert aux.stats[0].passes_per_token.tolist() == [9, 0]
    assert aux.stats[0].mean_passes() == 1.0
    # the other way round: choosing stratum 0 -> a second pass at stratum 1
    layer.strata_routers[0].compute_logits = lambda x: (x.new_zeros(x.shape[0], 4) + bias.flip(0), None)
    _, aux = layer(torch.randn(9, 6))
    assert aux.stats[0].passes_per_token.tolist() == [0, 9]


def test_stratified_losses_are_averaged_over_passes_and_eligible_experts():
    layer = MoE(6, MoEConfig(num_experts=4, top_k=1, ffn_dim=6, strata=[2, 2], balance_coef=1.0))
    pref0 = torch.tensor([2.0, 0.0, 0.0, 0.0])  # pass 0: every token picks expert 0 (stratum 0)
    layer.strata_routers[0].compute_logits = lambda x: (x.new_zeros(x.shape[0], 4) + pref0, None)
    layer.strata_routers[1].compute_logits = lambda x: (x.new_zeros(x.shape[0], 2), None)  # uniform
    _, aux = layer(torch.randn(10, 6))
    p0 = torch.softmax(pref0, 0)[0].item()
    pass0 = 4 * (1.0 * p0)  # E=4 eligible, f=(1,0,0,0)
    pass1 = 2 * (1.0 * 0.5)  # E=2 eligible (stratum 1 only), f=(1,0), P=(.5,.5)
    assert aux.losses["balance"].item() == pytest.approx((pass0 + pass1) / 2, rel=1e-6)
    assert aux.stats[0].passes_per_token.tolist() == [0, 10]


def test_stratified_config_validation():
    with pytest.raises(ValueError, match="summing to num_experts=8"):
        MoEConfig(num_experts=8, strata=[4, 2])
    with pytest.raises(ValueError, match="dropless"):
        MoEConfig(num_experts=4, strata=[2, 2], capacity_factor=1.0)
