"""The workspace cache: buffers are reused only when nobody holds them, and results never change."""

from __future__ import annotations

import pytest
import torch

from vlmoe.moe import MoE, MoEConfig, workspace


@pytest.fixture
def pool(monkeypatch):
    """Pool every buffer (the default skips those under 1 MiB) with a fresh, empty cache."""
    monkeypatch.setattr(workspace, "_MIN_BYTES", 0)
    monkeypatch.setattr(workspace, "_storages", [])
    monkeypatch.setattr(workspace, "_limit", 1 << 30)
    yield workspace
    workspace.release()


def _ptr(t):
    return t.untyped_storage().data_ptr()


def test_freed_buffer_is_reused(pool):
    a = pool.empty((64, 32), dtype=torch.float32, device=torch.device("cpu"))
    p = _ptr(a)
    del a
    b = pool.empty((64, 32), dtype=torch.float32, device=torch.device("cpu"))
    assert _ptr(b) == p
    assert pool.stats()["buffers"] == 1


def test_empty_like_keeps_a_dense_layout(pool):
    cpu = torch.device("cpu")
    t = torch.empty(3, 24, 16).transpose(1, 2)  # each (16, 24) slice column-major
    assert pool.empty_like(t).stride() == t.stride()
    assert pool.empty_like(torch.empty(4, 5)).stride() == (5, 1)
    sliced = torch.empty(4, 10)[:, ::2]  # not dense: a row-major buffer of its shape
    assert pool.empty_like(sliced).stride() == (5, 1)
    assert pool.empty((2, 3), dtype=torch.float32, device=cpu).is_contiguous()


def test_held_buffers_and_views_are_never_handed_out(pool):
    cpu = torch.device("cpu")
    a = pool.empty((64, 32), dtype=torch.float32, device=cpu)
    view = a[3:10]
    del a  # the view still holds the storage
    b = pool.empty((64, 32), dtype=torch.float32, device=cpu)
    assert _ptr(b) != _ptr(view)
    b.fill_(1.0)
    view.fill_(2.0)
    assert torch.all(b == 1.0)
    assert pool.stats() == {"held": pool.stats()["held"], "in_use": pool.stats()["held"], "buffers": 2}


def test_size_mismatch_allocates_and_small_request_does_not_waste_large_buffer(pool):
    cpu = torch.device("cpu")
    big = pool.empty((1 << 16,), dtype=torch.float32, device=cpu)
    pbig = _ptr(big)
    del big
    small = pool.empty((1 << 10,), dtype=torch.float32, device=cpu)  # 64x smaller: gets its own storage
    assert _ptr(small) != pbig
    again = pool.empty((1 << 16,), dtype=torch.float32, device=cpu)
    assert _ptr(again) == pbig


def test_limit_evicts_free_buffers_and_falls_back_when_full(pool):
    cpu = torch.device("cpu")
    pool.set_limit(3 << 20)
    a = pool.empty((1 << 18,), dtype=torch.float32, device=cpu)  # 1 MiB
    b = pool.empty((1 << 18,), dtype=torch.float32, device=cpu)
    del a
    c = pool.empty((1 << 19,), dtype=torch.float32, device=cpu)  # 2 MiB: evicts the free one
    assert pool.stats()["held"] == 3 << 20
    d = pool.empty((1 << 19,), dtype=torch.float32, device=cpu)  # no room, nothing free: plain tensor
    assert pool.stats()["held"] == 3 << 20 and d.shape == (1 << 19,)
    del b, c, d
    assert pool.release() == 3 << 20
    pool.set_limit(0)
    e = pool.empty((1 << 18,), dtype=torch.float32, device=cpu)
    assert pool.stats()["buffers"] == 0 and e.numel() == 1 << 18
    with pytest.raises(ValueError, match="workspace limit"):
        pool.set_limit(-1)


def _step_results(layer, xs, accumulate):
    """Forward two batches (both graphs alive), then backward both; returns outputs and grads."""
    layer.zero_grad(set_to_none=True)
    outs, grads = [], []
    ys = [layer(x)[0] for x in xs]
    for x, y in zip(xs, ys):
        y.pow(2).sum().backward()
        outs.append(y.detach().clone())
        grads.append(x.grad.clone())
        if not accumulate:
            grads += [p.grad.clone() for p in layer.parameters() if p.grad is not None]
            layer.zero_grad(set_to_none=True)
    if accumulate:
        grads += [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    return outs, grads


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("heads", [1, 2])
def test_layer_results_identical_with_and_without_the_pool(monkeypatch, accumulate, heads):
    torch.manual_seed(0)
    layer = MoE(32, MoEConfig(num_experts=4, top_k=2, ffn_dim=48, heads=heads)).double()
    xs = [torch.randn(40, 32, dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def run():
        for x in xs:
            x.grad = None
        results = []
        for _ in range(3):  # later steps run on reused buffers
            results.append(_step_results(layer, xs, accumulate))
        return results

    monkeypatch.setattr(workspace, "_limit", 0)
    plain = run()
    monkeypatch.setattr(workspace, "_MIN_BYTES", 0)
    monkeypatch.setattr(workspace, "_storages", [])
    monkeypatch.setattr(workspace, "_limit", 1 << 30)
    pooled = run()
    assert workspace.stats()["buffers"] > 0
    for (o1, g1), (o2, g2) in zip(plain, pooled):
        for a, b in zip(o1 + g1, o2 + g2):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    workspace.release()


def test_param_grad_held_across_steps_is_not_overwritten(pool):
    """Gradient accumulation: p.grad (a pooled buffer) must survive the next backward untouched."""
    torch.manual_seed(0)
    layer = MoE(16, MoEConfig(num_experts=2, top_k=1, ffn_dim=24)).double()
    x = torch.randn(30, 16, dtype=torch.float64)
    layer(x)[0].sum().backward()
    g1 = layer.experts.w1.grad.clone()
    layer(x)[0].sum().backward()
    torch.testing.assert_close(layer.experts.w1.grad, 2 * g1)


def test_inference_mode_and_no_grad(pool):
    layer = MoE(16, MoEConfig(num_experts=2, top_k=2, ffn_dim=24))
    x = torch.randn(10, 16)
    ref = layer(x)[0].detach()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x)[0], ref)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], ref)
