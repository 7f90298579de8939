"""Grouped (per-expert) matrix products over expert-contiguous rows.

``grouped_linear(x, w, b, counts)`` computes ``y[rows of e] = x[rows of e] @ w[e] + b[e]`` for a
stacked weight ``w`` of shape (E, K, N).

Why a custom autograd function: the obvious loop ``x_e @ w[e]`` makes autograd route each
expert's weight gradient through ``SelectBackward``, which allocates a zero tensor the size of the
whole (E, K, N) weight for *every* expert and adds them up - E full-size gradients per step (8x the
ideal time at 32 experts on CPU). Here the backward writes each expert's gradient straight into its
slice of one (E, K, N) buffer with ``torch.mm(..., out=...)``, and the forward writes each expert's
rows straight into the output buffer, so nothing is materialised twice. On CPU these buffers come
from :mod:`vlmoe.moe.workspace` (reused between steps instead of page-faulted in again).

On CUDA with bf16 inputs ``torch._grouped_mm`` (one kernel for all experts) is used when available.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import workspace


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, counts: tuple[int, ...]) -> Tensor:
        out = _expert_rows_forward(x, w, b, counts)
        ctx.save_for_backward(x, w)
        ctx.counts, ctx.has_bias = counts, b is not None
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        g = g.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gw, gb = _param_grads(x, g, w, ctx.counts, need_w, need_b and ctx.has_bias)
        gx = _input_grad(g, w, ctx.counts, x.shape) if need_x else None
        return gx, gw, gb, None


def _expert_rows_forward(
    x: Tensor, w: Tensor, b: Tensor | None, counts: tuple[int, ...], act=None
) -> Tensor:
    """out[rows of e] = act(x[rows of e]) @ w[e] + b[e], expert by expert, into one (M, N) buffer."""
    out = workspace.empty((x.shape[0], w.shape[2]), dtype=x.dtype, device=x.device)
    s = 0
    for e, n in enumerate(counts):
        if n:
            rows = x[s : s + n] if act is None else act(x[s : s + n])
            os = torch.mm(rows, w[e], out=out[s : s + n])
            if b is not None:
                # mm + add_ is ~1.5x faster than addmm(out=) on CPU (the latter copies the
                # broadcast bias into the output and runs a beta=1 GEMM)
                os.add_(b[e])
            s += n
    return out


def _param_grads(
    x: Tensor, g: Tensor, w: Tensor, counts: tuple[int, ...], need_w: bool, need_b: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Per-expert w[e] and b[e] gradients written into one stacked buffer each (zero for idle experts)."""
    gw = workspace.empty_like(w) if need_w else None
    gb = g.new_empty(w.shape[0], w.shape[2]) if need_b else None
    s = 0
    for e, n in enumerate(counts):
        gs = g[s : s + n]
        if gw is not None:
            torch.mm(x[s : s + n].t(), gs, out=gw[e]) if n else gw[e].zero_()
        if gb is not None:
            torch.sum(gs, 0, out=gb[e]) if n else gb[e].zero_()
        s += n
    return gw, gb


def _input_grad(g: Tensor, w: Tensor, counts: tuple[int, ...], shape: torch.Size) -> Tensor:
    """Rows of the input gradient, expert by expert: g_e @ w[e]^T."""
    gx = workspace.empty(shape, dtype=g.dtype, device=g.device)
    s = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(g[s : s + n], w[e].t(), out=gx[s : s + n])
        s += n
    return gx


class _RowBias(torch.autograd.Function):
    """y += b[row_expert] in place. The bias gradient is one small GEMM, one_hot(row_expert)^T @ g,
    instead of index_select's backward (an index_add_ whose atomics all collide on E rows: it took
    more GPU time than the expert GEMMs themselves)."""

    @staticmethod
    def forward(ctx, y: Tensor, b: Tensor, row_expert: Tensor) -> Tensor:
        ctx.mark_dirty(y)
        ctx.save_for_backward(row_expert)
        ctx.num_experts = b.shape[0]
        return y.add_(b.index_select(0, row_expert))

    @staticmethod
    def backward(ctx, g: Tensor):
        (row_expert,) = ctx.saved_tensors
        onehot = torch.nn.functional.one_hot(row_expert, ctx.num_experts).to(g.dtype)  # (M, E)
        return g, onehot.t() @ g, None


def _scratch(h: Tensor, counts: tuple[int, ...]) -> Tensor:
    """Room for one expert's GELU rows: (max rows per expert, ffn)."""
    return workspace.empty((max(counts, default=0), h.shape[1]), dtype=h.dtype, device=h.device)


class _GeluGroupedLinear(torch.autograd.Function):
    """y = GELU(h)_e @ w[e] + b[e], saving only h; GELU(h) is computed one expert's rows at a time.

    The expert hidden layer is the largest activation of an MoE layer ((k * tokens) x ffn). Neither
    pass materialises GELU(h) for all rows: forward and backward (which recomputes it for the weight
    gradient) each write one expert's GELU rows into a scratch block of (max rows per expert, ffn),
    use it at once - while it is still in cache - and reuse the block for the next expert. Only h
    and, in backward, its gradient are (M, ffn) buffers.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor | None, counts: tuple[int, ...]) -> Tensor:
        scratch = _scratch(h, counts)
        def gelu(rows: Tensor) -> Tensor:  # one expert's GELU rows, into the shared scratch block
            return torch.ops.aten.gelu.out(rows, out=scratch[: rows.shape[0]])

        out = _expert_rows_forward(h, w, b, counts, gelu)
        ctx.save_for_backward(h, w)
        ctx.counts, ctx.has_bias = counts, b is not None
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        h, w = ctx.saved_tensors
        g = g.contiguous()
        counts = ctx.counts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        gw = workspace.empty_like(w) if need_w else None
        gb = g.new_empty(w.shape[0], w.shape[2]) if need_b else None
        gh = workspace.empty_like(h) if need_h else None
        scratch = _scratch(h, counts) if need_w else None
        s = 0
        for e, n in enumerate(counts):
            hs, gs = h[s : s + n], g[s : s + n]
            if gw is not None:
                if n:
                    a = torch.ops.aten.gelu.out(hs, out=scratch[:n])
                    torch.mm(a.t(), gs, out=gw[e])
                else:
                    gw[e].zero_()
            if gb is not None:
                torch.sum(gs, 0, out=gb[e]) if n else gb[e].zero_()
            if gh is not None and n:
                ga = torch.mm(gs, w[e].t(), out=gh[s : s + n])
                torch.ops.aten.gelu_backward.grad_input(ga, hs, grad_input=ga)  # d GELU, in place
            s += n
        return gh, gw, gb, None


def gelu_grouped_linear(h: Tensor, w: Tensor, b: Tensor | None, counts_list: tuple[int, ...]) -> Tensor:
    """``grouped_linear(GELU(h), w, b)`` on the loop backend: GELU one expert block at a time, recomputed
    in backward; no (M, ffn) GELU buffer."""
    return _GeluGroupedLinear.apply(h.contiguous(), w, b, counts_list)


class _GeluSegmentLayerNorm(torch.autograd.Function):
    """LayerNorm(GELU(h)) of rows grouped by expert, expert e's rows with its own affine
    ``(weight[e], bias[e])`` (an expert's GELU + sub-LN), saving only h.

    ATen's LayerNorm kernels run once per expert block, writing into one (M, F) output: the per-expert
    affine costs nothing extra (no (E, F, d) copy of the fc2 weights with the affine folded in, whose
    forward product and three backward products each cost a pass over every expert's weights per step,
    and no gathered per-row gamma / beta). GELU(h) - an (M, F) buffer as large as the
    expert hidden layer - is never stored: forward and backward (which recomputes it) write one
    expert's GELU rows into a scratch block and normalise them at once, while they are still in cache.
    Every (M, F) result comes from :mod:`vlmoe.moe.workspace`, so a step does not page-fault fresh
    buffers in (an MH-MoE layer at FLOP parity has h x k x F_mh / (k x F) = 3.5x the hidden values of a
    top-2 layer: its element-wise work dominates otherwise).
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, counts: tuple[int, ...], eps: float) -> Tensor:
        h = h.contiguous()
        M, F = h.shape
        out = workspace.empty((M, F), dtype=h.dtype, device=h.device)
        mean, rstd = _ln_stats(h)
        scratch = _scratch(h, counts)
        o = 0
        for e, n in enumerate(counts):
            if n:
                a = torch.ops.aten.gelu.out(h[o : o + n], out=scratch[:n])
                torch.ops.aten.native_layer_norm.out(a, [F], weight[e], bias[e], eps,
                                                     out0=out[o : o + n], out1=mean[o : o + n], out2=rstd[o : o + n])
            o += n
        ctx.save_for_backward(h, weight, bias, mean, rstd)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        g = g.contiguous()
        F = h.shape[1]
        need_h, need_w, need_b = (bool(x) for x in ctx.needs_input_grad[:3])
        gh = workspace.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b else None
        act, grad_act = _scratch(h, ctx.counts), _scratch(h, ctx.counts)
        dummy = h.new_empty(0)
        o = 0
        for e, n in enumerate(ctx.counts):
            if n:
                hs = h[o : o + n]
                a = torch.ops.aten.gelu.out(hs, out=act[:n])  # GELU recomputed
                ga = grad_act[:n] if need_h else dummy
                torch.ops.aten.native_layer_norm_backward.out(
                    g[o : o + n], a, [F], mean[o : o + n], rstd[o : o + n], weight[e], bias[e],
                    [need_h, need_w, need_b], out0=ga, out1=gw[e] if need_w else dummy,
                    out2=gb[e] if need_b else dummy)
                if need_h:
                    torch.ops.aten.gelu_backward.grad_input(ga, hs, grad_input=gh[o : o + n])
            o += n
        return gh, gw, gb, None, None


def _ln_stats(h: Tensor) -> tuple[Tensor, Tensor]:
    """(M, 1) buffers for LayerNorm's mean and rstd, in the dtype ATen's kernels write them in (the input
    dtype on CPU; float32 for half types on CUDA)."""
    low = h.dtype in (torch.bfloat16, torch.float16)
    dtype = torch.float32 if low and h.device.type == "cuda" else h.dtype
    return (torch.empty((h.shape[0], 1), dtype=dtype, device=h.device),
            torch.empty((h.shape[0], 1), dtype=dtype, device=h.device))


def gelu_segment_layer_norm(h: Tensor, weight: Tensor, bias: Tensor, counts_list: tuple[int, ...],
                            eps: float) -> Tensor:
    """(M, F) fc1 rows sorted by expert -> LayerNorm(GELU(rows)), each expert's rows with its own ``(E, F)``
    affine (GELU not stored: recomputed in backward)."""
    if sum(counts_list) != h.shape[0]:
        raise ValueError(f"gelu_segment_layer_norm: counts sum to {sum(counts_list)}, input has {h.shape[0]} rows")
    return _GeluSegmentLayerNorm.apply(h, weight, bias, counts_list, eps)


def _grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_linear(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    counts: Tensor,
    counts_list: tuple[int, ...] | None = None,
    backend: str = "auto",
) -> Tensor:
    """y = x_e @ w[e] + b[e] for each expert's contiguous block of rows.

    Args:
        x: (M, K) rows sorted by expert.
        w: (E, K, N) stacked weights.
        b: (E, N) stacked biases or None.
        counts: (E,) rows per expert (int64), on any device.
        counts_list: the same counts as Python ints, if the caller already has them.
        backend: ``auto`` | ``loop`` | ``grouped_mm``.
    """
    if backend == "auto":
        use_gmm = (
            x.is_cuda
            and x.dtype == torch.bfloat16
            and _grouped_mm_available()
            and x.shape[1] % 8 == 0
            and w.shape[2] % 8 == 0
        )
        backend = "grouped_mm" if use_gmm else "loop"
    if backend == "grouped_mm":
        offs = torch.cumsum(counts, 0).to(torch.int32)
        y = torch._grouped_mm(x, w, offs=offs)
        if b is not None:
            # per-row bias: expert id of each row, without leaving the device
            row_expert = torch.repeat_interleave(
                torch.arange(w.shape[0], device=x.device), counts, output_size=x.shape[0]
            )
            y = _RowBias.apply(y, b, row_expert)
        return y
    if backend != "loop":
        raise ValueError(f"grouped_linear backend={backend!r}: choose from 'auto', 'loop', 'grouped_mm'")
    if counts_list is None:
        counts_list = tuple(int(c) for c in counts.tolist())
    return _GroupedLinear.apply(x.contiguous(), w, b, counts_list)


# ---------------------------------------------------------------------------------------------- ragged
class RaggedLayout:
    """Per-expert blocks of a ragged grouped product ``y_e (n_e, N_e) = x_e (n_e, K_e) @ W_e (K_e, N_e)``.

    Heterogeneous experts (HMoE) have a different hidden width per expert, so the hidden activations
    of the routed rows do not form one (M, F) matrix. They live in one flat buffer instead: expert e's
    block is ``n_e * F_e`` contiguous values viewed as (n_e, F_e). Element-wise ops (GELU, SiLU * up)
    run once over the whole flat buffer.
    """

    def __init__(self, counts: tuple[int, ...], in_dims: tuple[int, ...], out_dims: tuple[int, ...]) -> None:
        self.counts, self.in_dims, self.out_dims = counts, in_dims, out_dims
        self.x_off, self.y_off, self.w_off, self.b_off = [], [], [], []
        xo = yo = wo = bo = 0
        for n, k, m in zip(counts, in_dims, out_dims):
            self.x_off.append(xo)
            self.y_off.append(yo)
            self.w_off.append(wo)
            self.b_off.append(bo)
            xo, yo, wo, bo = xo + n * k, yo + n * m, wo + k * m, bo + m
        self.x_numel, self.y_numel, self.w_numel, self.b_numel = xo, yo, wo, bo

    def blocks(self):
        for e, (n, k, m) in enumerate(zip(self.counts, self.in_dims, self.out_dims)):
            yield e, n, k, m, self.x_off[e], self.y_off[e], self.w_off[e], self.b_off[e]


class _RaggedLinear(torch.autograd.Function):
    """Flat-buffer grouped linear for experts of different widths (see :class:`RaggedLayout`)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, layout: RaggedLayout) -> Tensor:
        out = workspace.empty((layout.y_numel,), dtype=x.dtype, device=x.device)
        for _, n, k, m, xo, yo, wo, bo in layout.blocks():
            if n:
                o = torch.mm(x[xo : xo + n * k].view(n, k), w[wo : wo + k * m].view(k, m),
                             out=out[yo : yo + n * m].view(n, m))
                if b is not None:
                    o.add_(b[bo : bo + m])
        ctx.save_for_backward(x, w)
        ctx.layout, ctx.has_bias = layout, b is not None
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        lay: RaggedLayout = ctx.layout
        g = g.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = workspace.empty_like(x) if need_x else None
        gw = workspace.empty_like(w) if need_w else None
        gb = g.new_zeros(lay.b_numel) if (need_b and ctx.has_bias) else None
        for _, n, k, m, xo, yo, wo, bo in lay.blocks():
            if n == 0:
                if gw is not None:  # an idle expert's weight gradient is zero
                    gw[wo : wo + k * m].zero_()
                continue
            gs = g[yo : yo + n * m].view(n, m)
            we = w[wo : wo + k * m].view(k, m)
            if gx is not None:
                torch.mm(gs, we.t(), out=gx[xo : xo + n * k].view(n, k))
            if gw is not None:
                torch.mm(x[xo : xo + n * k].view(n, k).t(), gs, out=gw[wo : wo + k * m].view(k, m))
            if gb is not None:
                torch.sum(gs, 0, out=gb[bo : bo + m])
        return gx, gw, gb, None


def ragged_linear(x: Tensor, w: Tensor, b: Tensor | None, layout: RaggedLayout) -> Tensor:
    """Flat ragged grouped product: x, w, b and the result are 1-D buffers laid out by ``layout``."""
    if x.numel() != layout.x_numel or w.numel() != layout.w_numel:
        raise ValueError(
            f"ragged_linear: input has {x.numel()} values (layout wants {layout.x_numel}), weight has "
            f"{w.numel()} (layout wants {layout.w_numel})"
        )
    return _RaggedLinear.apply(x.reshape(-1), w.reshape(-1), None if b is None else b.reshape(-1), layout)
