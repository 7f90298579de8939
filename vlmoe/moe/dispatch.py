"""Sort-based dispatch and combine.

Assignments are the (token, choice) pairs of a top-k routing. They are identified token-major,
``a = t * k + j``. Dispatch sorts them by expert (stable, over the *choice-major* order so that all
first choices of an expert come before its second choices, as in GShard / torchscale capacity
handling), gathers the token rows into one expert-contiguous buffer, and combine scatters the expert
outputs back. Cost is linear in the number of tokens: no (tokens x experts x capacity) one-hot tensor
is ever built.

Both data movements are written as autograd functions whose backward is again a gather (never an
``index_add_``): dispatch's backward gathers each token's k rows through the inverse permutation and
sums them; combine's backward gathers the output gradient of each row's token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import workspace


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


def count_experts(idx: Tensor, n: int) -> Tensor:
    """(n,) occurrences of each value in idx. Unlike ``torch.bincount`` this never syncs a CUDA device
    (bincount reads the maximum to size its output)."""
    flat = idx.reshape(-1)  # any shape, e.g. (T, k) -> (T*k,)
    return torch.zeros(n, dtype=torch.long, device=idx.device).index_add_(0, flat, torch.ones_like(flat))


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """GShard capacity: ceil(cf * k * tokens / E) slots per expert."""
    return max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


def make_plan(
    indices: Tensor, num_experts: int, capacity: int | None = None, valid: Tensor | None = None
) -> DispatchPlan:
    """Sort the (T, k) expert choices by expert; drop assignments beyond ``capacity`` if given.

    Within an expert, priority is choice rank first (all first choices before any second choice),
    then token order; dropped assignments are the lowest-priority ones. ``valid`` (T, k) marks real
    selections (top-p routing); invalid slots are neither routed nor counted.
    """
    T, k = indices.shape
    device = indices.device
    flat_cm = indices.t().reshape(-1)  # (k*T,) choice-major: c = j*T + t
    if valid is not None:  # invalid slots go to a sentinel expert E, which sorts last
        # valid (T, k) -> (k*T,), choice-major like flat_cm
        flat_cm = torch.where(valid.t().reshape(-1), flat_cm, torch.full_like(flat_cm, num_experts))
    routed = count_experts(flat_cm, num_experts + 1)[:num_experts]  # (E,)
    order = torch.sort(flat_cm, stable=True).indices  # choice-major ids, expert-sorted
    j, t = order // max(T, 1), order % max(T, 1)
    assign = t * k + j  # token-major ids, expert-sorted
    if capacity is None and valid is None:
        perm, counts = assign, routed
    else:
        sorted_expert = flat_cm[order]
        keep = sorted_expert < num_experts
        counts = routed
        if capacity is not None:
            starts = torch.cumsum(routed, 0) - routed  # first sorted position of each expert
            pos = torch.arange(T * k, device=device) - starts[sorted_expert.clamp(max=num_experts - 1)]
            keep &= pos < capacity  # rank within its expert
            counts = routed.clamp(max=capacity)
        perm = assign[keep]
    M = perm.numel()
    inv = torch.full((T * k,), M, dtype=torch.long, device=device)
    inv[perm] = torch.arange(M, device=device)
    num_routed = T * k if valid is None else int(routed.sum())
    return DispatchPlan(
        perm=perm,
        src_token=perm // k,
        inv=inv,
        counts=counts,
        routed=routed,
        num_tokens=T,
        top_k=k,
        num_dropped=num_routed - M,
    )


class _Dispatch(torch.autograd.Function):
    """rows[i] = x[src_token[i]]; backward sums each token's k rows (no atomics, no index_add)."""

    @staticmethod
    def forward(ctx, x: Tensor, src_token: Tensor, inv: Tensor, top_k: int, num_kept: int) -> Tensor:
        ctx.save_for_backward(inv)
        ctx.top_k, ctx.num_kept = top_k, num_kept
        return _gather(x, src_token)  # (M, d)

    @staticmethod
    def backward(ctx, g: Tensor):
        (inv,) = ctx.saved_tensors
        g = g.contiguous()
        if inv.numel() and ctx.num_kept < inv.numel():  # dropped assignments read a zero row
            g = torch.cat([g, g.new_zeros(1, g.shape[1])])
        T, k = inv.numel() // ctx.top_k, ctx.top_k
        ga = _gather(g, inv).view(T, k, g.shape[1])  # (T, k, d) grads of each token's k rows
        if k == 1:
            return ga[:, 0], None, None, None, None
        gx = torch.add(ga[:, 0], ga[:, 1], out=workspace.empty((T, g.shape[1]), dtype=g.dtype, device=g.device))
        for j in range(2, k):
            gx.add_(ga[:, j])
        return gx, None, None, None, None


class _Combine(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * rows[inv[t, j]] (dropped assignments contribute 0).

    Backward gathers the output gradient once per sorted row and derives both the row gradients
    (times the gate) and the gate gradients (row-wise dot products) from it.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, weights: Tensor, perm: Tensor, inv: Tensor, src_token: Tensor) -> Tensor:
        T, k = weights.shape
        d = rows.shape[1]
        padded = torch.cat([rows, rows.new_zeros(1, d)]) if perm.numel() < inv.numel() else rows
        ya = _gather(padded, inv).view(T, k, d)  # (T, k, d) each token's k expert outputs
        w = weights.to(rows.dtype)
        out = torch.mul(ya[:, 0], w[:, :1], out=workspace.empty((T, d), dtype=rows.dtype, device=rows.device))
        for j in range(1, k):
            out.addcmul_(ya[:, j], w[:, j : j + 1])
        ctx.save_for_backward(rows, w, perm, src_token)
        ctx.weights_dtype = weights.dtype
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        rows, w, perm, src_token = ctx.saved_tensors
        need_rows, need_w = ctx.needs_input_grad[:2]
        g_rows = _gather(g.contiguous(), src_token)  # (M, d) output grad of each row's token
        grad_w = None
        if need_w:
            dots = (g_rows * rows).sum(-1)  # (M,) d out / d gate, per sorted row
            # (M,) gate grads scattered into (T*k,) -> (T, k) = w.shape
            grad_w = dots.new_zeros(w.numel()).index_copy_(0, perm, dots).view(w.shape)
            grad_w = grad_w.to(ctx.weights_dtype)
        # w (T, k) -> (T*k,) -> (M,) gates of the sorted rows -> (M, 1), times g_rows (M, d)
        grad_rows = g_rows.mul_(w.reshape(-1).index_select(0, perm).unsqueeze(1)) if need_rows else None
        return grad_rows, grad_w, None, None, None


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x[index] (rows), into a workspace buffer."""
    out = workspace.empty((index.numel(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    return torch.index_select(x, 0, index, out=out)


def dispatch(x: Tensor, plan: DispatchPlan) -> Tensor:
    """(T, d) tokens -> (M, d) rows grouped by expert."""
    return _Dispatch.apply(x, plan.src_token, plan.inv, plan.top_k, plan.num_kept)


def combine(y: Tensor, weights: Tensor, plan: DispatchPlan) -> Tensor:
    """(M, d) expert outputs -> (T, d): sum over each token's k experts weighted by the gates."""
    return _Combine.apply(y, weights, plan.perm, plan.inv, plan.src_token)
