"""Sort-based dispatch and combine.

Assignments are the (token, choice) pairs of a top-k routing. They are identified token-major,
``a = t * k + j``. Dispatch sorts them by expert (stable, over the *choice-major* order so that all
first choices of an expert come before its second choices, as in GShard / torchscale capacity
handling), gathers the token rows into one expert-contiguous buffer, and combine scatters the expert
outputs back. Cost is linear in the number of tokens: no (tokens x experts x capacity) one-hot tensor
is ever built.

Both data movements are written as autograd functions whose backward is again a gather (never an
``index_add_``): dispatch's backward gathers each token's k rows through the inverse permutation and
sums them; combine's backward gathers through the forward permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    """Where every kept assignment goes, computed once per layer call."""

    perm: Tensor
    """(M,) token-major assignment ids in expert-sorted order (kept assignments only)."""
    src_token: Tensor
    """(M,) token row of each sorted assignment (= perm // k)."""
    inv: Tensor
    """(T*k,) sorted position of each assignment; M (a zero row) for dropped ones."""
    counts: Tensor
    """(E,) kept assignments per expert."""
    routed: Tensor
    """(E,) assignments per expert before capacity dropping."""
    num_tokens: int
    top_k: int
    num_dropped: int

    @property
    def num_kept(self) -> int:
        return self.perm.numel()


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """GShard capacity: ceil(cf * k * tokens / E) slots per expert."""
    return max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


def make_plan(indices: Tensor, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """Sort the (T, k) expert choices by expert; drop assignments beyond ``capacity`` if given.

    Within an expert, priority is choice rank first (all first choices before any second choice),
    then token order; dropped assignments are the lowest-priority ones.
    """
    T, k = indices.shape
    device = indices.device
    flat_cm = indices.t().reshape(-1)  # (k*T,) choice-major: c = j*T + t
    routed = torch.bincount(flat_cm, minlength=num_experts)  # (E,)
    order = torch.sort(flat_cm, stable=True).indices  # choice-major ids, expert-sorted
    j, t = order // max(T, 1), order % max(T, 1)
    assign = t * k + j  # token-major ids, expert-sorted
    if capacity is None:
        perm, counts, num_dropped = assign, routed, 0
    else:
        starts = torch.cumsum(routed, 0) - routed  # first sorted position of each expert
        pos = torch.arange(T * k, device=device) - starts[flat_cm[order]]  # rank within its expert
        keep = pos < capacity
        perm = assign[keep]
        counts = routed.clamp(max=capacity)
        num_dropped = T * k - perm.numel()
    M = perm.numel()
    inv = torch.full((T * k,), M, dtype=torch.long, device=device)
    inv[perm] = torch.arange(M, device=device)
    return DispatchPlan(
        perm=perm,
        src_token=perm // k,
        inv=inv,
        counts=counts,
        routed=routed,
        num_tokens=T,
        top_k=k,
        num_dropped=int(num_dropped),
    )


class _Dispatch(torch.autograd.Function):
    """rows[i] = x[src_token[i]]; backward sums each token's k rows (no atomics, no index_add)."""

    @staticmethod
    def forward(ctx, x: Tensor, src_token: Tensor, inv: Tensor, top_k: int, num_kept: int) -> Tensor:
        ctx.save_for_backward(inv)
        ctx.top_k, ctx.num_kept = top_k, num_kept
        return x.index_select(0, src_token)  # (M, d)

    @staticmethod
    def backward(ctx, g: Tensor):
        (inv,) = ctx.saved_tensors
        g = g.contiguous()
        if inv.numel() and ctx.num_kept < inv.numel():  # dropped assignments read a zero row
            g = torch.cat([g, g.new_zeros(1, g.shape[1])])
        T = inv.numel() // ctx.top_k
        gx = g.index_select(0, inv).view(T, ctx.top_k, g.shape[1])  # (T, k, d)
        gx = gx[:, 0] if ctx.top_k == 1 else gx.sum(1)
        return gx, None, None, None, None


class _Unpermute(torch.autograd.Function):
    """out[a] = y[inv[a]] (zero for dropped assignments); backward is a gather through perm."""

    @staticmethod
    def forward(ctx, y: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
        ctx.save_for_backward(perm)
        if perm.numel() < inv.numel():
            y = torch.cat([y, y.new_zeros(1, y.shape[1])])
        return y.index_select(0, inv)  # (T*k, d)

    @staticmethod
    def backward(ctx, g: Tensor):
        (perm,) = ctx.saved_tensors
        return g.contiguous().index_select(0, perm), None, None


def dispatch(x: Tensor, plan: DispatchPlan) -> Tensor:
    """(T, d) tokens -> (M, d) rows grouped by expert."""
    return _Dispatch.apply(x, plan.src_token, plan.inv, plan.top_k, plan.num_kept)


def combine(y: Tensor, weights: Tensor, plan: DispatchPlan) -> Tensor:
    """(M, d) expert outputs -> (T, d): sum over each token's k experts weighted by the gates."""
    T, k = plan.num_tokens, plan.top_k
    ya = _Unpermute.apply(y, plan.perm, plan.inv).view(T, k, y.shape[-1])  # (T, k, d)
    w = weights.to(ya.dtype)
    if k == 1:
        return ya[:, 0] * w
    # (T, 1, k) @ (T, k, d) -> (T, 1, d): the weighted sum as one batched product
    return torch.bmm(w.unsqueeze(1), ya).squeeze(1)
