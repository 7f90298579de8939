"""Oracle tests of the MoE layer: dense equivalence, reference-loop equivalence, padding, capacity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vlmoe.moe import MoE, MoEConfig

from .reference import reference_forward


class DenseFFN(nn.Module):
    def __init__(self, dim, ffn, sub_ln=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.ln = nn.LayerNorm(ffn) if sub_ln else None

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        if self.ln is not None:
            h = self.ln(h)
        return self.fc2(h)


def _randomize(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("sub_ln", [False, True])
def test_one_expert_top1_equals_dense_ffn_forward_and_grads(sub_ln):
    torch.manual_seed(0)
    dim, ffn = 16, 40
    dense = DenseFFN(dim, ffn, sub_ln)
    _randomize(dense)
    layer = MoE(dim, MoEConfig(num_experts=1, top_k=1, ffn_dim=ffn, ffn_layernorm=sub_ln))
    layer.experts.load_dense(dense.fc1, dense.fc2, dense.ln)
    x = torch.randn(3, 7, dim)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = dense(x1)
    y, aux = layer(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.experts.w1.grad[0], dense.fc1.weight.grad.t(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.experts.w2.grad[0], dense.fc2.weight.grad.t(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.experts.b1.grad[0], dense.fc1.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.experts.b2.grad[0], dense.fc2.bias.grad, rtol=1e-4, atol=1e-5)
    if sub_ln:
        torch.testing.assert_close(layer.experts.ln_weight.grad[0], dense.ln.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.experts.ln_bias.grad[0], dense.ln.bias.grad, rtol=1e-4, atol=1e-5)
    assert aux.tokens_per_expert.tolist() == [21]


@pytest.mark.parametrize("expert_type", ["gelu", "swiglu"])
def test_all_experts_with_uniform_router_is_mean_of_experts(expert_type):
    torch.manual_seed(1)
    E, dim = 5, 12
    layer = MoE(dim, MoEConfig(num_experts=E, top_k=E, ffn_dim=20, expert_type=expert_type))
    _randomize(layer.experts, seed=3)
    nn.init.zeros_(layer.router.gate.weight)  # uniform routing distribution
    x = torch.randn(9, dim)
    y, _ = layer(x)
    mean = torch.stack([layer.experts.expert_forward(e, x) for e in range(E)]).mean(0)
    torch.testing.assert_close(y, mean, rtol=1e-5, atol=1e-6)


def test_mhmoe_h1_with_identity_projections_equals_plain_layer():
    torch.manual_seed(2)
    dim = 16
    plain = MoE(dim, MoEConfig(num_experts=4, top_k=2, ffn_dim=24))
    mh = MoE(dim, MoEConfig(num_experts=4, top_k=2, ffn_dim=24, heads=1, head_projections=True))
    mh.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for proj in (mh.head_proj, mh.merge_proj):
            proj.weight.copy_(torch.eye(dim))
            proj.bias.zero_()
    x = torch.randn(2, 6, dim)
    y1, a1 = plain(x)
    y2, a2 = mh(x)
    torch.testing.assert_close(y2, y1)
    assert torch.equal(a1.tokens_per_expert, a2.tokens_per_expert)
    torch.testing.assert_close(a1.loss, a2.loss)


def test_mhmoe_splits_tokens_into_contiguous_subtokens():
    torch.manual_seed(3)
    dim, h = 16, 4
    layer = MoE(dim, MoEConfig(num_experts=3, top_k=1, ffn_dim=8, heads=h, head_projections=False))
    x = torch.randn(5, dim)
    y, aux = layer(x)
    # each sub-token is routed on its own: the output of slice i only depends on slice i
    route = layer.router(x.reshape(5 * h, dim // h))
    for t in range(5):
        for i in range(h):
            s = x[t, i * 4 : (i + 1) * 4]
            e = int(route.indices[t * h + i, 0])
            expect = route.weights[t * h + i, 0] * layer.experts.expert_forward(e, s[None])[0]
            torch.testing.assert_close(y[t, i * 4 : (i + 1) * 4], expect, rtol=1e-5, atol=1e-6)
    assert aux.stats[0].routed_tokens == 5 * h
    assert int(aux.tokens_per_expert.sum()) == 5 * h


configs = st.fixed_dictionaries(
    {
        "num_experts": st.integers(1, 6),
        "k_frac": st.floats(0, 1),
        "heads": st.sampled_from([1, 2, 4]),
        "expert_type": st.sampled_from(["gelu", "swiglu"]),
        "sub_ln": st.booleans(),
        "bias": st.booleans(),
        "router": st.sampled_from(["softmax", "sigmoid", "xmoe", "xmoe_sigmoid"]),
        "capacity_factor": st.sampled_from([None, None, 0.5, 1.0, 1.5]),
        "projections": st.booleans(),
        "pad": st.booleans(),
        "recompute": st.booleans(),
        "seed": st.integers(0, 10_000),
    }
)


@settings(max_examples=40, deadline=None)
@given(cfg=configs)
def test_grouped_path_matches_per_token_reference_loop(cfg):
    torch.manual_seed(cfg["seed"])
    E = cfg["num_experts"]
    k = 1 + int(cfg["k_frac"] * (E - 1))
    sub_ln = cfg["sub_ln"] and cfg["expert_type"] == "gelu"
    dim = 8 * cfg["heads"]
    config = MoEConfig(
        num_experts=E,
        top_k=k,
        ffn_dim=12,
        heads=cfg["heads"],
        head_projections=cfg["projections"] or None,
        expert_type=cfg["expert_type"],
        ffn_layernorm=sub_ln,
        bias=cfg["bias"],
        router=cfg["router"],
        capacity_factor=cfg["capacity_factor"],
        recompute_experts=cfg["recompute"],
    )
    layer = MoE(dim, config).double()
    _randomize(layer, seed=cfg["seed"])
    x = torch.randn(3, 5, dim, dtype=torch.float64)
    pm = None
    if cfg["pad"]:
        pm = torch.zeros(3, 5, dtype=torch.bool)
        pm[0, 3:] = True
        pm[2, 1:] = True
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ex = layer.experts
    params = [ex.w1, ex.w2] + ([ex.ln_weight, ex.ln_bias] if sub_ln else [])  # the sub-LN's per-expert affine too
    y_ref = reference_forward(layer, x1, pm)
    ref_grads = torch.autograd.grad(y_ref.sum() * 1.0 + (y_ref**2).sum(), [x1, *params])
    y, aux = layer(x2, pm)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    grads = torch.autograd.grad(y.sum() * 1.0 + (y**2).sum(), [x2, *params])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    n_valid = 15 if pm is None else int((~pm).sum())
    assert int(aux.tokens_per_expert.sum()) == n_valid * cfg["heads"] * k


def test_padding_tokens_change_nothing():
    torch.manual_seed(4)
    dim = 16
    layer = MoE(dim, MoEConfig(num_experts=4, top_k=2, ffn_dim=24, capacity_factor=1.0))
    x_valid = torch.randn(1, 6, dim)
    garbage = torch.randn(1, 4, dim) * 100
    x = torch.cat([x_valid, garbage], 1)
    pm = torch.tensor([[False] * 6 + [True] * 4])
    y_pad, aux_pad = layer(x, pm)
    y, aux = layer(x_valid)
    torch.testing.assert_close(y_pad[:, :6], y)
    assert torch.count_nonzero(y_pad[:, 6:]) == 0
    assert torch.equal(aux_pad.tokens_per_expert, aux.tokens_per_expert)
    assert int(aux_pad.dropped_tokens) == int(aux.dropped_tokens)
    torch.testing.assert_close(aux_pad.loss, aux.loss)
    assert aux_pad.stats[0].routed_tokens == 6


def test_all_padding_gives_zeros_and_zero_loss():
    layer = MoE(8, MoEConfig(num_experts=3, top_k=2, ffn_dim=8))
    x = torch.randn(2, 3, 8, requires_grad=True)
    y, aux = layer(x, torch.ones(2, 3, dtype=torch.bool))
    assert torch.count_nonzero(y) == 0
    assert aux.loss.item() == 0.0
    assert int(aux.tokens_per_expert.sum()) == 0
    (y.sum() + aux.loss).backward()
    assert torch.count_nonzero(x.grad) == 0


def _forced_router(layer: MoE, preference: list[float]) -> None:
    """Make every token prefer experts in the given order: logits = preference (constant)."""
    with torch.no_grad():
        layer.router.gate.weight.zero_()
    bias = torch.tensor(preference)
    orig = layer.router.compute_logits

    def compute_logits(x):
        logits, bal = orig(x)
        return logits + bias, bal

    layer.router.compute_logits = compute_logits


def test_capacity_drops_exactly_the_expected_assignments_top1():
    torch.manual_seed(5)
    dim, T = 8, 6
    layer = MoE(dim, MoEConfig(num_experts=2, top_k=1, ffn_dim=8, capacity_factor=2 / 3))
    _forced_router(layer, [5.0, 0.0])  # everyone wants expert 0
    x = torch.randn(T, dim)
    y, aux = layer(x)
    # capacity = ceil(2/3 * 1 * 6 / 2) = 2: tokens 0 and 1 kept (token order), 2..5 dropped
    assert int(aux.dropped_tokens) == 4
    assert aux.tokens_per_expert.tolist() == [6, 0]
    assert torch.count_nonzero(y[2:]) == 0
    w0 = torch.softmax(torch.tensor([5.0, 0.0]), 0)[0]
    torch.testing.assert_close(y[:2], w0 * layer.experts.expert_forward(0, x[:2]))


def test_capacity_prioritises_first_choices_over_second_choices():
    torch.manual_seed(6)
    dim, T = 8, 4
    # 3 experts, top-2; capacity = ceil(0.75 * 2 * 4 / 3) = 2
    layer = MoE(dim, MoEConfig(num_experts=3, top_k=2, ffn_dim=8, capacity_factor=0.75))
    # tokens 0,1 prefer (0, 1); tokens 2,3 prefer (1, 0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
    pref = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [2.0, 3.0, 0.0], [2.0, 3.0, 0.0]])
    layer.router.compute_logits = lambda x: (pref.clone(), None)
    x = torch.randn(T, dim)
    y, aux = layer(x)
    # expert 0: first choices of tokens 0,1 fill it -> second choices of tokens 2,3 dropped
    # expert 1: first choices of tokens 2,3 fill it -> second choices of tokens 0,1 dropped
    assert int(aux.dropped_tokens) == 4
    # gates are renormalised over the top-2 *before* dropping: first choice keeps e^3 / (e^3 + e^2)
    g1 = math.exp(3) / (math.exp(3) + math.exp(2))
    torch.testing.assert_close(y[0], g1 * layer.experts.expert_forward(0, x[:1])[0])
    torch.testing.assert_close(y[2], g1 * layer.experts.expert_forward(1, x[2:3])[0])


def test_eval_mode_uses_eval_capacity():
    layer = MoE(8, MoEConfig(num_experts=2, top_k=1, ffn_dim=8, capacity_factor=0.5, eval_capacity_factor=None))
    _forced_router(layer, [5.0, 0.0])
    x = torch.randn(8, 8)
    _, aux_train = layer(x)
    layer.eval()
    _, aux_eval = layer(x)
    assert int(aux_train.dropped_tokens) == 8 - math.ceil(0.5 * 8 / 2)
    assert int(aux_eval.dropped_tokens) == 0


def test_autocast_bf16_cpu_runs_and_backprops():
    torch.manual_seed(7)
    layer = MoE(16, MoEConfig(num_experts=4, top_k=2, ffn_dim=32, ffn_layernorm=True, heads=2))
    x = torch.randn(4, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    assert y.dtype == torch.bfloat16
    (y.float().sum() + aux.loss).backward()
    assert torch.isfinite(x.grad).all() and layer.experts.w1.grad is not None
    assert aux.loss.dtype == torch.float32


def test_aux_sums_over_layers():
    a = MoE(8, MoEConfig(num_experts=2, top_k=1, ffn_dim=8))
    b = MoE(8, MoEConfig(num_experts=3, top_k=2, ffn_dim=8, z_loss_coef=1e-3))
    a.stats_name, b.stats_name = "a", "b"
    x = torch.randn(5, 8)
    _, aa = a(x)
    _, ab = b(x)
    s = aa + ab
    torch.testing.assert_close(s.loss, aa.loss + ab.loss)
    assert set(s.losses) == {"balance", "z"}
    assert [st.name for st in s.stats] == ["a", "b"]
    with pytest.raises(ValueError, match="sums 2 layer calls"):
        _ = s.tokens_per_expert
    assert sum([aa, ab]).loss.item() == pytest.approx(s.loss.item())


def _small_expert_inputs(rows: int, bias: bool, sub_ln: bool, w1_out_in: bool = False):
    """fp64 leaves for the expert FFN kernel: x (rows, 4), 3 experts of 4 -> 5 -> 4, biases and sub-LN optional;
    ``w1_out_in``: fc1's (3, 4, 5) weights stored as each expert's contiguous (out, in) matrix (the
    experts module's default is row-major)."""
    torch.manual_seed(0)
    dt = torch.float64
    x = torch.randn(rows, 4, dtype=dt, requires_grad=True)
    w1 = torch.randn(3, 5, 4, dtype=dt).transpose(1, 2) if w1_out_in else torch.randn(3, 4, 5, dtype=dt)
    w1, w2 = w1.requires_grad_(), torch.randn(3, 5, 4, dtype=dt, requires_grad=True)
    b1 = torch.randn(3, 5, dtype=dt, requires_grad=True) if bias else None
    b2 = torch.randn(3, 4, dtype=dt, requires_grad=True) if bias else None
    lw = torch.randn(3, 5, dtype=dt, requires_grad=True) if sub_ln else None
    lb = torch.randn(3, 5, dtype=dt, requires_grad=True) if sub_ln else None
    return x, w1, b1, w2, b2, lw, lb


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("sub_ln", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("w1_out_in", [False, True])
def test_expert_ffn_kernel_gradients_and_idle_experts(recompute, sub_ln, bias, w1_out_in):
    """The expert FFN kernel (GELU + each expert's LayerNorm + fc2 by expert block; fc1 kept or
    recomputed in backward): exact values against plain ops, exact gradients for every input
    (gradcheck), zero gradients for an idle expert, a count that does not match the rows refused; with
    fc1's weights row-major or stored as each expert's (out, in) matrix."""
    from vlmoe.moe.grouped import expert_ffn

    x, w1, b1, w2, b2, lw, lb = _small_expert_inputs(7, bias, sub_ln, w1_out_in)
    counts = (3, 0, 4)
    names = ["x", "w1", "b1", "w2", "b2", "lw", "lb"]
    given = {n: t for n, t in zip(names, (x, w1, b1, w2, b2, lw, lb)) if t is not None}

    def fn(*ts):
        a = dict(zip(given, ts))
        return expert_ffn(a["x"], a["w1"], a.get("b1"), a["w2"], a.get("b2"), counts, a.get("lw"), a.get("lb"),
                          1e-5, recompute=recompute)

    assert torch.autograd.gradcheck(fn, tuple(given.values()))

    def plain(rows, e):
        h = F.gelu(rows @ w1[e] + (b1[e] if bias else 0))
        h = F.layer_norm(h, (5,), lw[e], lb[e], 1e-5) if sub_ln else h
        return h @ w2[e] + (b2[e] if bias else 0)

    y = fn(*given.values())
    torch.testing.assert_close(y, torch.cat([plain(x[:3], 0), plain(x[3:], 2)]), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(y.square().sum(), list(given.values())[1:])
    assert all(gr[1].abs().sum() == 0 for gr in grads)  # expert 1 received no rows
    with pytest.raises(ValueError, match="counts sum to 6"):
        expert_ffn(x, w1, b1, w2, b2, (3, 0, 3), lw, lb)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_expert_ffn_folded_sub_ln_exact(recompute, bias):
    """Blocks with >= 2 x fc2's outputs in rows fold the sub-LN into fc2 (forward: rstd (a @ gamma w2) -
    (mu rstd) colsum + beta w2 + b2; backward: LayerNorm's gradients from that product, no normalised rows):
    the same values as plain ops and exact gradients for every input (gradcheck, fp64)."""
    from vlmoe.moe.grouped import expert_ffn

    x, w1, b1, w2, b2, lw, lb = _small_expert_inputs(19, bias, True)
    counts = (9, 0, 10)
    given = [t for t in (x, w1, b1, w2, b2, lw, lb) if t is not None]

    def fn(*ts):
        it = iter(ts)
        a = [next(it) if t is not None else None for t in (x, w1, b1, w2, b2, lw, lb)]
        return expert_ffn(*a[:5], counts, a[5], a[6], 1e-5, recompute=recompute)

    y = fn(*given)
    assert y.grad_fn.folded == (True, False, True)  # both busy blocks took the folded path

    def plain(rows, e):
        h = F.layer_norm(F.gelu(rows @ w1[e] + (b1[e] if bias else 0)), (5,), lw[e], lb[e], 1e-5)
        return h @ w2[e] + (b2[e] if bias else 0)

    torch.testing.assert_close(y, torch.cat([plain(x[:9], 0), plain(x[9:], 2)]), rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(fn, tuple(given))


def _kernel_errors(shift: float) -> tuple[dict[str, float], dict[str, float]]:
    """Relative fp32 errors against fp64 of the output and every gradient: the expert kernel's and plain
    autograd's. ``shift`` is added to fc1's bias (the sub-LN's rows then have a mean of ~``shift`` +- 0.4).

    Both on ATen's BLAS, which plain autograd's products use: these tests measure the kernel's algebra, not
    the GEMM library (oneDNN's fp32 products round differently: ~3x the BLAS's error on an AMD EPYC VM, where the
    kernel takes it by default; ``tests/moe/test_gemm.py`` checks oneDNN's products against fp64)."""
    from vlmoe.moe.gemm import cpu_gemm
    from vlmoe.moe.grouped import expert_ffn

    g64 = torch.Generator().manual_seed(0)
    E, d, Fh, counts = 2, 16, 256, (300, 212)
    base = [torch.randn(512, d, generator=g64, dtype=torch.float64),
            0.1 * torch.randn(E, d, Fh, generator=g64, dtype=torch.float64),
            0.1 * torch.randn(E, Fh, generator=g64, dtype=torch.float64) + shift,
            0.1 * torch.randn(E, Fh, d, generator=g64, dtype=torch.float64),
            torch.randn(E, d, generator=g64, dtype=torch.float64),
            1 + 0.1 * torch.randn(E, Fh, generator=g64, dtype=torch.float64),
            0.1 * torch.randn(E, Fh, generator=g64, dtype=torch.float64)]
    g = torch.randn(512, d, generator=g64, dtype=torch.float64)
    names = ["out", "x", "w1", "b1", "w2", "b2", "ln_w", "ln_b"]

    def run(dt, kernel):
        ts = [t.to(dt, copy=True).requires_grad_() for t in base]
        if kernel:
            with cpu_gemm("blas"):
                y = expert_ffn(*ts[:5], counts, ts[5], ts[6], 1e-5, recompute=True)
        else:
            ys, s = [], 0
            for e, n in enumerate(counts):
                h = F.layer_norm(F.gelu(ts[0][s : s + n] @ ts[1][e] + ts[2][e]), (Fh,), ts[5][e], ts[6][e], 1e-5)
                ys.append(h @ ts[3][e] + ts[4][e])
                s += n
            y = torch.cat(ys)
        y.backward(g.to(dt))
        return [y.detach().double()] + [t.grad.double() for t in ts]

    ref = run(torch.float64, True)
    errs = []
    for kernel in (True, False):
        got = run(torch.float32, kernel)
        errs.append({n: ((a - r).abs().max() / r.abs().max()).item() for n, a, r in zip(names, got, ref)})
    return errs[0], errs[1]


@pytest.mark.parametrize("shift", [0.0, 1.0, 3.0])
def test_expert_ffn_keeps_fp32_accuracy(shift):
    """The folded sub-LN (forward and backward) in fp32: the output and every gradient within 3x plain fp32
    autograd's rounding, also where the LN input's mean approaches (1.0) or exceeds (3.0: the LN then runs
    as a LayerNorm) its spread. The LN weight's gradient within 5x: it sums ``n^T g = a^T (rstd g) - (mu
    rstd)^T g`` over fc2's outputs, where the mean's cancellation is not diluted by beta's term (4.2x at 1.0,
    the worst case below the guard; 1.4x at 0.0, where GELU outputs are)."""
    kernel, plain = _kernel_errors(shift)
    for name in kernel:
        bound = 5 if name == "ln_w" else 3
        assert kernel[name] <= bound * max(plain[name], 1e-7), (name, kernel[name], plain[name])


def _fc2_weight_grad_errors(shift: float) -> tuple[float, float]:
    """Relative error of fc2's weight gradient in fp32 against fp64: the expert kernel's, plain autograd's."""
    kernel, plain = _kernel_errors(shift)
    return kernel["w2"], plain["w2"]


@pytest.mark.parametrize("shift", [0.0, 1.0, 3.0])
def test_expert_ffn_fc2_weight_gradient_keeps_fp32_accuracy(shift):
    """fc2's weight gradient under a sub-LN is computed from GELU's output without recomputing the LN
    (y^T g = gamma * (a^T (rstd g) - (mu rstd)^T g) + beta 1^T g): within 3x plain fp32 autograd's
    rounding, also where the LN input's mean approaches (1.0) or exceeds (3.0: the LN is recomputed) its
    spread."""
    kernel, plain = _fc2_weight_grad_errors(shift)
    assert kernel <= 3 * max(plain, 1e-7), (kernel, plain)


def test_expert_ffn_fc2_weight_gradient_guard(monkeypatch):
    """Without the guard on |mean| / std the shortcut loses fp32 accuracy on rows whose mean dwarfs their
    spread (that cancellation is why the guard exists), and with it the kernel matches plain autograd."""
    import vlmoe.moe.grouped as grouped

    guarded, plain = _fc2_weight_grad_errors(30.0)
    assert guarded <= 1.5 * plain
    monkeypatch.setattr(grouped, "_LN_ALGEBRA_MAX_OFFSET", float("inf"))
    unguarded, _ = _fc2_weight_grad_errors(30.0)
    assert unguarded > 4 * plain


def _saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("case", ["gelu_sub_ln", "gelu", "swiglu", "hmoe"])
def test_recompute_experts_keeps_values_and_gradients_and_saves_the_hidden_layer(case):
    """recompute_experts=True: the same outputs and gradients (fp32, to rounding) as without, and the
    experts' (k x tokens, ffn) hidden values are no longer saved for backward."""
    torch.manual_seed(0)
    kw = dict(num_experts=4, top_k=2, ffn_dim=256, check_finite=False)
    kw.update({"gelu_sub_ln": dict(ffn_layernorm=True, heads=2), "gelu": {}, "swiglu": dict(expert_type="swiglu"),
               "hmoe": dict(expert_sizes=[64, 128, 256, 512])}[case])
    plain = MoE(32, MoEConfig(**kw))
    rec = MoE(32, MoEConfig(**kw, recompute_experts=True))
    rec.load_state_dict(plain.state_dict())
    x = torch.randn(96, 32)
    outs, saved = [], []
    for layer in (plain, rec):
        xi = x.clone().requires_grad_()
        (y, aux), nbytes = _saved_bytes(lambda layer=layer, xi=xi: layer(xi))
        (y.square().sum() + aux.loss).backward()
        outs.append((y.detach(), xi.grad, [p.grad for p in layer.parameters()]))
        saved.append(nbytes)
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    rows = 96 * 2 * (2 if case == "gelu_sub_ln" else 1)  # (sub-)token assignments
    hidden_bytes = rows * (256 if case != "hmoe" else 64) * 4  # at least the narrowest expert's hidden values
    assert saved[0] - saved[1] >= 0.95 * hidden_bytes, saved  # (less the sub-LN statistics, M x 2 values)


def test_experts_with_fc1_stored_out_in_and_any_state_dict_layout(tmp_path):
    """A layer whose ``w1`` (E, dim, ffn) is stored as each expert's contiguous (out, in) matrix: the kernel
    writes its gradient in the same strides (so that autograd does not copy it into them); a row-major
    state dict loads into it and gives the same outputs; a saved and reloaded layer is identical."""
    torch.manual_seed(0)
    layer = MoE(16, MoEConfig(num_experts=3, top_k=2, ffn_dim=24))
    w1 = layer.experts.w1
    w1.data = w1.data.transpose(1, 2).contiguous().transpose(1, 2)
    assert w1.shape == (3, 16, 24) and w1.stride() == (24 * 16, 1, 16) and w1[0].t().is_contiguous()
    x = torch.randn(20, 16)
    y, aux = layer(x)
    (gw1,) = torch.autograd.grad(y.square().sum() + aux.loss, [w1])  # the kernel's own buffer
    assert gw1.stride() == w1.stride()
    old = {k: v.contiguous() for k, v in layer.state_dict().items()}  # a row-major layer's state dict
    fresh = MoE(16, MoEConfig(num_experts=3, top_k=2, ffn_dim=24))
    fresh.experts.w1.data = fresh.experts.w1.data.transpose(1, 2).contiguous().transpose(1, 2)
    fresh.load_state_dict(old)
    assert fresh.experts.w1.stride() == w1.stride()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], layer(x)[0], rtol=0, atol=0)
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    again = MoE(16, MoEConfig(num_experts=3, top_k=2, ffn_dim=24))
    again.load_state_dict(torch.load(tmp_path / "layer.pt", weights_only=True))
    assert torch.equal(again.experts.w1, w1)
