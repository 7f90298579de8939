"""Expert parallelism on CPU (gloo, 2 processes): outputs and gradients equal the single-process layer."""

from __future__ import annotations

import itertools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed import run_on_gloo
from vlmoe.moe import MoE, MoEConfig
from vlmoe.moe.parallel import clip_grad_norm_, expert_ranges, shard_experts

pytestmark = pytest.mark.distributed

VARIANTS = {
    "topk": MoEConfig(num_experts=4, top_k=2, ffn_dim=12),
    "mhmoe": MoEConfig(num_experts=4, top_k=2, ffn_dim=12, heads=2, router="xmoe"),
    "hmoe_top_p": MoEConfig(
        num_experts=4,
        expert_sizes=[6, 6, 12, 24],
        top_p=0.6,
        expert_type="swiglu",
        balance_loss="p_penalty",
        balance_coef=0.1,
    ),
    "stratified": MoEConfig(num_experts=4, top_k=1, ffn_dim=12, strata=[2, 2]),
    "sub_ln_uneven": MoEConfig(num_experts=5, top_k=2, ffn_dim=8, ffn_layernorm=True),
}
SPLIT = (7, 13)  # uneven token counts per rank


def _reference(cfg: MoEConfig, seed: int):
    torch.manual_seed(seed)
    layer = MoE(16, cfg).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        if cfg.strata is None and cfg.router == "softmax":
            layer.router.gate.weight[-1] = -10.0  # the last expert receives no tokens (x > 0 below)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(sum(SPLIT), 16, generator=g, dtype=torch.float64).abs()
    go = torch.randn(sum(SPLIT), 16, generator=g, dtype=torch.float64)
    return layer, x, go


def _worker(rank: int, world: int) -> None:
    lo = sum(SPLIT[:rank])
    for i, (name, cfg) in enumerate(VARIANTS.items()):
        ref, x, go = _reference(cfg, seed=10 + i)
        y_ref, _ = ref(x)
        (y_ref * go).sum().backward()
        layer, _, _ = _reference(cfg, seed=10 + i)
        shard_experts(layer, grad_scale=1.0)
        xs = x[lo : lo + SPLIT[rank]].clone().requires_grad_()
        y, aux = layer(xs)
        torch.testing.assert_close(y, y_ref[lo : lo + SPLIT[rank]], rtol=1e-5, atol=1e-5, msg=name)
        (y * go[lo : lo + SPLIT[rank]]).sum().backward()
        # expert weights: each rank's local experts see every rank's tokens -> full gradient
        local = layer.expert_parallel.local
        assert local == expert_ranges(cfg.num_experts, world, cfg.expert_sizes)[rank]
        ref_e, got_e = ref.experts, layer.experts
        if hasattr(ref_e, "expert_weights"):  # heterogeneous: compare each expert's flat blocks
            for j, e in enumerate(local):
                for wname in ("w1", "w2", "w3"):
                    torch.testing.assert_close(
                        _hetero_grad(got_e, j, wname),
                        _hetero_grad(ref_e, e, wname),
                        rtol=1e-5,
                        atol=1e-5,
                        msg=f"{name}: {wname}[{e}]",
                    )
        else:
            for wname in ("w1", "w2", "b1", "b2"):
                torch.testing.assert_close(
                    getattr(got_e, wname).grad,
                    getattr(ref_e, wname).grad[local.start : local.stop],
                    rtol=1e-5,
                    atol=1e-5,
                    msg=f"{name}: {wname}",
                )
        # replicated (router / projection) parameters: the sum over ranks is the full gradient
        ref_dense = {n: p for n, p in ref.named_parameters() if not n.startswith("experts.")}
        for n, p in layer.named_parameters():
            if n.startswith("experts."):
                continue
            gsum = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(gsum)
            expect = ref_dense[n].grad if ref_dense[n].grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(gsum, expect, rtol=1e-5, atol=1e-5, msg=f"{name}: {n}")
        if name == "topk":
            counts = aux.tokens_per_expert.clone()
            dist.all_reduce(counts)
            assert counts[-1] == 0, "the last expert must receive no tokens"
        if name == "stratified":
            passes = aux.stats[0].passes_per_token
            assert int(passes.sum()) == SPLIT[rank]


def _hetero_grad(experts, e: int, name: str) -> torch.Tensor:
    d, sizes = experts.dim, experts.sizes
    o, f = sum(sizes[:e]), sizes[e]
    return getattr(experts, name).grad[d * o : d * (o + f)]


def test_expert_parallel_matches_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run_on_gloo, args=(_worker, 2, os.path.join(tmp, "init")), nprocs=2, join=True)


class _Net(torch.nn.Module):
    """A dense layer feeding an MoE layer: dense params are DDP-averaged, expert params are not."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(16, 16)
        self.moe = MoE(16, MoEConfig(num_experts=4, top_k=2, ffn_dim=12))

    def forward(self, x):
        y, aux = self.moe(torch.tanh(self.inp(x)))
        return y, aux


def _ddp_worker(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vlmoe.moe.parallel import ddp_ignore_expert_params, expert_param_names

    torch.manual_seed(0)
    ref = _Net().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SPLIT), 16, generator=g, dtype=torch.float64)
    go = torch.randn(sum(SPLIT), 16, generator=g, dtype=torch.float64)
    # DDP averages the ranks' gradients: the reference loss is the mean of the per-rank losses
    y_ref, _ = ref(x)
    lo = sum(SPLIT[:rank])
    parts = [(y_ref[a : a + n] * go[a : a + n]).sum() for a, n in zip((0, SPLIT[0]), SPLIT)]
    (sum(parts) / world).backward()

    torch.manual_seed(0)
    net = _Net().double()
    shard_experts(net)  # default grad_scale = 1/world, the DDP average
    ddp_ignore_expert_params(net)
    assert expert_param_names(net) and all(n.startswith("moe.experts.") for n in expert_param_names(net))
    model = DDP(net)
    y, _ = model(x[lo : lo + SPLIT[rank]])
    (y * go[lo : lo + SPLIT[rank]]).sum().backward()
    local = expert_ranges(4, world)[rank]
    torch.testing.assert_close(net.moe.experts.w1.grad, ref.moe.experts.w1.grad[local.start : local.stop])
    torch.testing.assert_close(net.inp.weight.grad, ref.inp.weight.grad)  # averaged by DDP
    torch.testing.assert_close(net.moe.router.gate.weight.grad, ref.moe.router.gate.weight.grad)

    # gradient clipping: the norm of the whole (unsharded) model, the same coefficient on every rank
    saved = {n: p.grad.clone() for n, p in net.named_parameters()}
    ref_saved = {n: p.grad.clone() for n, p in ref.named_parameters()}
    for norm_type in (2.0, float("inf")):
        for n, p in net.named_parameters():
            p.grad.copy_(saved[n])
        for n, p in ref.named_parameters():
            p.grad.copy_(ref_saved[n])
        local_norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()], norm_type)
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5, norm_type)
        assert want > 0.5  # the clip is active
        got = clip_grad_norm_(net.parameters(), 0.5, norm_type)
        torch.testing.assert_close(got, want)
        if norm_type == 2.0:
            assert local_norm < want  # a rank's own gradients miss the other rank's experts
        torch.testing.assert_close(net.moe.experts.w2.grad, ref.moe.experts.w2.grad[local.start : local.stop])
        torch.testing.assert_close(net.inp.weight.grad, ref.inp.weight.grad)


def test_expert_parallel_composes_with_ddp():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run_on_gloo, args=(_ddp_worker, 2, os.path.join(tmp, "init")), nprocs=2, join=True)


def test_shard_experts_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        shard_experts(MoE(8, MoEConfig(num_experts=2, top_k=1, ffn_dim=8)))


def test_expert_ranges_are_contiguous_and_balanced():
    assert expert_ranges(5, 2) == [range(0, 3), range(3, 5)]
    assert expert_ranges(4, 2, [8, 8, 8, 8]) == [range(0, 2), range(2, 4)]
    # heterogeneous widths: balance the total width per rank, not the count
    assert expert_ranges(8, 2, [1, 1, 1, 1, 2, 2, 4, 4]) == [range(0, 6), range(6, 8)]
    assert expert_ranges(4, 2, [6, 6, 12, 24]) == [range(0, 3), range(3, 4)]
    hmoe = [96 * i for i in range(9, 24, 2)]  # the paper's arithmetic schedule, 8 experts
    for world in (2, 4):
        ranges = expert_ranges(8, world, hmoe)
        assert [e for r in ranges for e in r] == list(range(8)) and all(len(r) >= 1 for r in ranges)
        worst = max(sum(hmoe[e] for e in r) for r in ranges)
        by_count = max(sum(hmoe[e] for e in r) for r in expert_ranges(8, world))
        assert worst < by_count
        # brute force over all contiguous splits: nothing has a smaller largest share
        best = min(
            max(sum(hmoe[a:b]) for a, b in zip((0, *cuts), (*cuts, 8)))
            for cuts in itertools.combinations(range(1, 8), world - 1)
        )
        assert worst == best
    with pytest.raises(ValueError, match="3 sizes"):
        expert_ranges(4, 2, [1, 2, 3])
    with pytest.raises(ValueError, match="num_experts"):
        expert_ranges(1, 2)
