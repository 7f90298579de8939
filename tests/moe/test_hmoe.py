"""HMoE: heterogeneous experts, top-p routing, P-Penalty and entropy losses, size schedules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmoe.moe import (
    HeteroExperts,
    MoE,
    MoEConfig,
    hmoe_expert_sizes,
    load_balance_loss,
    p_penalty_loss,
    router_entropy_loss,
)
from vlmoe.moe.grouped import RaggedLayout, ragged_linear

from .reference import reference_forward


@pytest.mark.parametrize("expert_type", ["gelu", "swiglu"])
def test_hmoe_with_equal_sizes_equals_the_homogeneous_layer(expert_type):
    torch.manual_seed(0)
    E, d, f = 4, 12, 10
    homo = MoE(d, MoEConfig(num_experts=E, top_k=2, ffn_dim=f if expert_type == "gelu" else f,
                            expert_type=expert_type))
    het = MoE(d, MoEConfig(num_experts=E, top_k=2, expert_sizes=[f] * E, expert_type=expert_type))
    het.router.load_state_dict(homo.router.state_dict())
    he, ho = het.experts, homo.experts
    with torch.no_grad():
        for p in ho.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for e in range(E):
            w = he.expert_weights(e)
            if expert_type == "swiglu":  # homogeneous swiglu stores [gate | up] in w1
                w["w1"].copy_(ho.w1[e][:, :f])
                w["w3"].copy_(ho.w1[e][:, f:])
                w["b1"].copy_(ho.b1[e][:f])
                w["b3"].copy_(ho.b1[e][f:])
            else:
                w["w1"].copy_(ho.w1[e])
                w["b1"].copy_(ho.b1[e])
            w["w2"].copy_(ho.w2[e])
            w["b2"].copy_(ho.b2[e])
    x = torch.randn(3, 7, d)
    y1, a1 = homo(x)
    y2, a2 = het(x)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    assert torch.equal(a1.tokens_per_expert, a2.tokens_per_expert)


cases = st.fixed_dictionaries(
    {
        "sizes": st.lists(st.integers(1, 20), min_size=1, max_size=6),
        "top_p": st.sampled_from([None, 0.3, 0.6, 0.9, 1.0]),
        "expert_type": st.sampled_from(["gelu", "swiglu"]),
        "bias": st.booleans(),
        "capacity_factor": st.sampled_from([None, None, 0.75]),
        "pad": st.booleans(),
        "seed": st.integers(0, 10_000),
    }
)


@settings(max_examples=30, deadline=None)
@given(case=cases)
def test_heterogeneous_path_matches_per_token_reference_loop(case):
    torch.manual_seed(case["seed"])
    E = len(case["sizes"])
    cfg = MoEConfig(num_experts=E, top_k=min(2, E), expert_sizes=case["sizes"], top_p=case["top_p"],
                    expert_type=case["expert_type"], bias=case["bias"], capacity_factor=case["capacity_factor"])
    layer = MoE(8, cfg).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    pm = None
    if case["pad"]:
        pm = torch.zeros(2, 6, dtype=torch.bool)
        pm[1, 2:] = True
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = reference_forward(layer, x1, pm)
    g_ref = torch.autograd.grad((y_ref**2).sum(), [x1, layer.experts.w1, layer.experts.w2])
    y, aux = layer(x2, pm)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    g = torch.autograd.grad((y**2).sum(), [x2, layer.experts.w1, layer.experts.w2])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_ragged_linear_gradcheck():
    torch.manual_seed(1)
    counts, K, N = (2, 0, 3), (3, 3, 3), (4, 2, 5)
    lay = RaggedLayout(counts, K, N)
    x = torch.randn(lay.x_numel, dtype=torch.float64, requires_grad=True)
    w = torch.randn(lay.w_numel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(lay.b_numel, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ragged_linear(x, w, b, lay), (x, w, b))
    with pytest.raises(ValueError, match="layout wants"):
        ragged_linear(x[:-1], w, b, lay)


@pytest.mark.parametrize(
    "probs, p, expected",
    [
        ([0.5, 0.3, 0.2], 0.6, [0, 1]),  # 0.5 < 0.6: take the next one too
        ([0.7, 0.2, 0.1], 0.6, [0]),  # the top expert alone reaches p
        ([0.25, 0.25, 0.25, 0.25], 0.6, [0, 1, 2]),
        ([0.1, 0.2, 0.7], 1.0, [2, 1, 0]),
        ([0.6, 0.4], 0.6, [0]),  # reaching p exactly stops
    ],
)
def test_top_p_activates_the_smallest_set_reaching_p(probs, p, expected):
    E = len(probs)
    layer = MoE(4, MoEConfig(num_experts=E, top_k=1, top_p=p, ffn_dim=4))
    logits = torch.log(torch.tensor([probs]))
    layer.router.compute_logits = lambda x: (logits.expand(x.shape[0], -1).clone(), None)
    route = layer.router(torch.randn(1, 4))
    chosen = route.indices[0][route.valid[0]].tolist()
    assert chosen == expected
    sel = torch.tensor(probs)[expected]
    torch.testing.assert_close(route.weights[0][route.valid[0]], (sel / sel.sum()).float())


def test_top_p_max_experts_caps_the_set():
    layer = MoE(4, MoEConfig(num_experts=4, top_p=1.0, max_experts_per_token=2, ffn_dim=4))
    route = layer.router(torch.randn(5, 4))
    assert route.indices.shape[1] == 2 and route.valid.all()


def test_p_penalty_hand_computed_and_equal_sizes_reduce_to_load_balance():
    probs = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    idx = torch.tensor([[0], [1]])
    # sizes [1, 3] -> s/mean = [0.5, 1.5]; T_i = [0.5, 0.5]; P = [0.4, 0.6]
    assert p_penalty_loss(probs, idx, torch.tensor([1.0, 3.0])).item() == pytest.approx(
        2 * (0.5 * 0.5 * 0.4 + 0.5 * 1.5 * 0.6)
    )
    probs3 = torch.softmax(torch.randn(10, 3), -1)
    idx2 = probs3.topk(2, -1).indices
    assert p_penalty_loss(probs3, idx2, torch.ones(3)).item() == pytest.approx(
        2 * load_balance_loss(probs3, idx2, 3).item(), rel=1e-6
    )


def test_entropy_loss_is_minimised():
    assert router_entropy_loss(torch.tensor([[0.5, 0.5]])).item() == pytest.approx(0.6931, rel=1e-4)
    logits = torch.tensor([[1.0, 0.5, 0.0]], requires_grad=True)
    before = router_entropy_loss(logits.softmax(-1))
    before.backward()
    with torch.no_grad():
        after = router_entropy_loss((logits - 0.5 * logits.grad).softmax(-1))
    assert after < before


def test_layer_reports_hmoe_statistics():
    torch.manual_seed(2)
    sizes = [4, 4, 8, 16]
    layer = MoE(8, MoEConfig(num_experts=4, top_k=1, expert_sizes=sizes, expert_type="gelu", bias=False,
                             balance_loss="p_penalty", balance_coef=0.1, entropy_coef=0.03))
    x = torch.randn(20, 8)
    _, aux = layer(x)
    st_ = aux.stats[0]
    counts = st_.tokens_per_expert
    per_expert = torch.tensor([2 * 8 * s for s in sizes])
    assert st_.activated_params_per_token() == pytest.approx(float((counts * per_expert).sum() / 20))
    by_size = st_.load_by_size()
    assert by_size[4] == int(counts[0] + counts[1]) and sum(by_size.values()) == 20
    assert set(aux.losses) == {"balance", "entropy"}


def test_size_schedules_match_the_paper():
    assert hmoe_expert_sizes("arithmetic", 8, total=12288) == [96 * s for s in range(9, 24, 2)]
    assert hmoe_expert_sizes("arithmetic", 8, total=32768) == [2304, 2816, 3328, 3840, 4352, 4864, 5376, 5888]
    assert hmoe_expert_sizes("hybrid", 8) == [1, 1, 1, 1, 2, 2, 4, 4]
    assert hmoe_expert_sizes("geometric", 4) == [1, 2, 4, 8]
    assert sum(hmoe_expert_sizes("hybrid", 8, total=8 * 3072)) == 8 * 3072
    with pytest.raises(ValueError, match="unknown HMoE schedule"):
        hmoe_expert_sizes("zipf")


def test_hetero_experts_bad_config():
    with pytest.raises(ValueError, match="has 3 entries but num_experts=4"):
        MoEConfig(num_experts=4, expert_sizes=[1, 2, 3])
    with pytest.raises(ValueError, match="sub-LN"):
        MoEConfig(num_experts=2, expert_sizes=[4, 8], ffn_layernorm=True)
    assert isinstance(MoE(8, MoEConfig(num_experts=2, expert_sizes=[4, 8])).experts, HeteroExperts)
