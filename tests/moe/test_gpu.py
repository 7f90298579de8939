"""CUDA paths: the single-kernel grouped GEMM (``torch._grouped_mm``) against the per-expert loop."""

from __future__ import annotations

import pytest
import torch

from vlmoe.moe import MoE, MoEConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("E,k,sub_ln,heads", [(8, 2, False, 1), (32, 2, True, 1), (35, 2, False, 4)])
def test_grouped_mm_backend_matches_loop_backend_bf16(E, k, sub_ln, heads):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, top_k=k, ffn_dim=256, ffn_layernorm=sub_ln, heads=heads)
    a = MoE(256, cfg).cuda().to(torch.bfloat16)
    b = MoE(256, cfg).cuda().to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    a.experts.backend, b.experts.backend = "grouped_mm", "loop"
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, _ = a(xa)
    yb, _ = b(xb)
    torch.testing.assert_close(ya, yb, rtol=2e-2, atol=2e-3)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(a.experts.w1.grad, b.experts.w1.grad, rtol=2e-2, atol=5e-3)
    torch.testing.assert_close(a.experts.w2.grad, b.experts.w2.grad, rtol=2e-2, atol=5e-3)


def test_cuda_fp32_matches_cpu():
    torch.manual_seed(1)
    cfg = MoEConfig(num_experts=6, top_k=2, ffn_dim=64, heads=2, router="xmoe")
    cpu = MoE(64, cfg)
    gpu = MoE(64, cfg).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(300, 64)
    y_cpu, a_cpu = cpu(x)
    y_gpu, a_gpu = gpu(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    assert torch.equal(a_gpu.tokens_per_expert.cpu(), a_cpu.tokens_per_expert)
