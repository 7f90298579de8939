"""The fp32 CPU GEMM backend (vlmoe.moe.gemm): oneDNN computes what ATen's BLAS computes."""

from __future__ import annotations

import os
import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmoe.moe import gemm
from vlmoe.moe.gemm import (
    Linear,
    cpu_gemm,
    cpu_gemm_backend,
    linear,
    onednn_takes,
    rows_mm,
    rows_product,
    use_fast_linears,
)
from vlmoe.moe.grouped import expert_ffn

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="oneDNN's fp32 linear not available")


def _grads(fn, *ts):
    for t in ts:
        t.grad = None
    out = fn()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    return out.detach(), [t.grad.clone() for t in ts]


@needs_onednn
@pytest.mark.parametrize("shape", [(37, 48), (3, 11, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_values_and_grads(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(24, 48, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    ts = [x, w] + ([b] if bias else [])
    with cpu_gemm("onednn"):
        y, gs = _grads(lambda: linear(x, w, b), *ts)
    ref, gref = _grads(lambda: F.linear(x.double(), w.double(), None if b is None else b.double()).float(), *ts)
    assert y.shape == (*shape[:-1], 24)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    for g, r in zip(gs, gref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_linear_takes_strided_inputs():
    torch.manual_seed(0)
    x = torch.randn(48, 20).t()  # (20, 48), not contiguous
    w = torch.randn(48, 24).t()  # (24, 48), not contiguous
    with cpu_gemm("onednn"):
        torch.testing.assert_close(linear(x, w), x.double().mm(w.double().t()).float(), rtol=1e-5, atol=1e-4)


def test_blas_backend_is_exactly_f_linear():
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 7, 16), torch.randn(8, 16), torch.randn(8)
    with cpu_gemm("blas"):
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))
        assert not gemm.use_onednn(x)


@needs_onednn
def test_other_dtypes_autocast_and_blas_take_atens_path():
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    with cpu_gemm("onednn"):
        assert gemm.use_onednn(x)
        assert not gemm.use_onednn(x.double())
        assert torch.equal(linear(x.double(), w.double()), F.linear(x.double(), w.double()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not gemm.use_onednn(x)
            assert linear(x, w).dtype == torch.bfloat16  # autocast's cast, as F.linear does


def test_linear_names_the_mismatched_shapes():
    with cpu_gemm("auto"), pytest.raises((ValueError, RuntimeError), match="16|15"):
        linear(torch.randn(4, 15), torch.randn(8, 16))


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_rows_mm_both_backends(bias):
    torch.manual_seed(0)
    a, w = torch.randn(13, 32), torch.randn(40, 32)  # w: an (out, in) weight, as oneDNN reads it
    c = torch.randn(40) if bias else None
    ref = a.double() @ w.double().t() + (0 if c is None else c.double())
    for b in (w.t(), w.t().contiguous()):  # oneDNN's layout, and a row-major (in, out) b (always the BLAS)
        dnn = b.t().is_contiguous()
        assert onednn_takes(b, True) == dnn and not onednn_takes(b, False)
        for onednn in (True, False):
            out = torch.full((13, 40), float("nan"))
            assert rows_mm(a, b, out, onednn, c) is out
            torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-4)
        for onednn in (True, False):  # rows_product: oneDNN's own result, or the BLAS's into the scratch
            scratch = torch.full((13, 40), float("nan"))
            y = rows_product(a, b, scratch, onednn, c)
            assert (y is scratch) != (onednn and dnn) and torch.isnan(scratch).all() == (onednn and dnn)
            torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-4)
        y = rows_product(a, b, None, False, c)  # no scratch: the BLAS's result in a fresh tensor
        torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-4)
        out = torch.empty(13, 40)
        rows_mm(a, b, out, False, c)  # the BLAS path is the code it replaced: mm, then add_
        assert torch.equal(out, torch.mm(a, b) if c is None else torch.mm(a, b).add_(c))


def test_backend_selection_and_bad_values(monkeypatch):
    monkeypatch.setenv("VLMOE_CPU_GEMM", "blas")
    assert cpu_gemm_backend() == "blas"
    monkeypatch.setenv("VLMOE_CPU_GEMM", "auto")
    assert cpu_gemm_backend() == gemm.auto_backend()
    with cpu_gemm("blas") as mode:
        assert mode == cpu_gemm_backend() == "blas"
    monkeypatch.setenv("VLMOE_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="VLMOE_CPU_GEMM='mkl'.*auto, onednn, blas"):
        cpu_gemm_backend()
    with pytest.raises(ValueError, match="cpu_gemm='fast'"), cpu_gemm("fast"):
        pass


def test_auto_backend_follows_the_cpu_vendor(monkeypatch):
    """MKL where it runs its fastest code (Intel CPUs), oneDNN elsewhere on x86-64 (AMD: 2x at expert rows)."""
    if platform.machine() in ("x86_64", "AMD64") and os.path.exists("/proc/cpuinfo"):
        assert gemm.cpu_vendor() in ("GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: "GenuineIntel")
    assert gemm.auto_backend() == "blas"
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: "AuthenticAMD")
    assert gemm.auto_backend() == ("onednn" if gemm.onednn_available() else "blas")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)  # e.g. an OpenBLAS build
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: "GenuineIntel")
    assert gemm.auto_backend() == ("onednn" if gemm.onednn_available() else "blas")
    with cpu_gemm("auto") as mode:
        assert mode == gemm.auto_backend()


@needs_onednn
@pytest.mark.parametrize("sub_ln", [True, False])
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("w1_layout", ["out_in", "in_out"])
def test_expert_ffn_same_on_both_backends(sub_ln, recompute, w1_layout):
    """The kernel gives the same values and gradients on oneDNN and the BLAS, with fc1's weights stored as
    each expert's contiguous (out, in) matrix or row-major (E, in, out) (the experts module's default)."""
    torch.manual_seed(0)
    E, d, f, counts = 3, 16, 40, (5, 0, 9)
    x = torch.randn(sum(counts), d, requires_grad=True)
    w1 = torch.randn(E, f, d).transpose(1, 2) if w1_layout == "out_in" else torch.randn(E, d, f)
    w1, b1 = (w1 * 0.2).requires_grad_(), torch.randn(E, f, requires_grad=True)
    w2, b2 = (torch.randn(E, f, d) * 0.2).requires_grad_(), torch.randn(E, d, requires_grad=True)
    lw = (1 + 0.1 * torch.randn(E, f)).requires_grad_() if sub_ln else None
    lb = (0.1 * torch.randn(E, f)).requires_grad_() if sub_ln else None
    ts = [t for t in (x, w1, b1, w2, b2, lw, lb) if t is not None]
    runs = {}
    for mode in ("onednn", "blas"):
        with cpu_gemm(mode):  # forward and backward inside: the backward keeps the forward's backend anyway
            runs[mode] = _grads(lambda: expert_ffn(x, w1, b1, w2, b2, counts, lw, lb, recompute=recompute), *ts)
    (y1, g1), (y2, g2) = runs["onednn"], runs["blas"]
    assert w1.is_contiguous() == (w1_layout == "in_out")
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_use_fast_linears_keeps_parameters_and_state_dict():
    torch.manual_seed(0)

    class Custom(nn.Linear):
        pass

    m = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Sequential(nn.Linear(6, 3)), Custom(3, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = [id(p) for p in m.parameters()]
    x = torch.randn(5, 4)
    ref = m(x)
    use_fast_linears(m)
    assert type(m[0]) is Linear and type(m[2][0]) is Linear
    assert type(m[3]) is Custom  # subclasses keep their own forward
    assert [id(p) for p in m.parameters()] == params
    assert m.state_dict().keys() == before.keys()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_backbone_linears_use_the_backend():
    from vlmoe.models import VLMoE, VLMoEConfig

    model = VLMoE(VLMoEConfig.from_name("tiny"))
    names = [n for n, m in model.named_modules() if type(m) is Linear]
    assert any(n.endswith("qkv.vision") or ".qkv" in n for n in names)
    assert any(n.endswith("fc1") or ".fc1" in n for n in names)
    assert any(".proj" in n for n in names)
