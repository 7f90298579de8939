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
    """y = LN_e(GELU(h))_e @ w[e] + b[e], saving only h; GELU (and the optional sub-LN, each expert's
    rows with their own affine ``(ln_w[e], ln_b[e])``) computed one expert's rows at a time.

    The expert hidden layer is the largest activation of an MoE layer ((k * tokens) x ffn; for MH-MoE
    at FLOP parity h x k x F_mh = 3.5x a top-2 layer's). Neither pass materialises GELU(h) or its
    LayerNorm for all rows: forward and backward (which recomputes them for the weight and LayerNorm
    gradients) write one expert's rows into scratch blocks of (max rows per expert, ffn), use them at
    once - while they are still in cache - and reuse the blocks for the next expert. Only h and, in
    backward, its gradient are (M, ffn) buffers (from :mod:`vlmoe.moe.workspace`, so no step
    page-faults them in). The per-expert sub-LN affine is applied by ATen's LayerNorm kernel per block:
    no (E, F, d) copy of the fc2 weights with the affine folded in, no gathered per-row gamma / beta.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor | None, counts: tuple[int, ...], ln_w: Tensor | None,
                ln_b: Tensor | None, eps: float) -> Tensor:
        M, F = h.shape
        ln = ln_w is not None
        out = workspace.empty((M, w.shape[2]), dtype=h.dtype, device=h.device)
        act = _scratch(h, counts)
        normed = _scratch(h, counts) if ln else None
        mean, rstd = _ln_stats(h) if ln else (None, None)
        s = 0
        for e, n in enumerate(counts):
            if n:
                a = torch.ops.aten.gelu.out(h[s : s + n], out=act[:n])
                if ln:
                    a = torch.ops.aten.native_layer_norm.out(a, [F], ln_w[e], ln_b[e], eps, out0=normed[:n],
                                                             out1=mean[s : s + n], out2=rstd[s : s + n])[0]
                os = torch.mm(a, w[e], out=out[s : s + n])
                if b is not None:
                    os.add_(b[e])  # mm + add_ is ~1.5x faster than addmm(out=) on CPU
            s += n
        ctx.save_for_backward(h, w, ln_w, ln_b, mean, rstd)
        ctx.counts, ctx.has_bias, ctx.eps = counts, b is not None, eps
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        h, w, ln_w, ln_b, mean, rstd = ctx.saved_tensors
        g = g.contiguous()
        counts, ln, F = ctx.counts, ln_w is not None, h.shape[1]
        need_h, need_w, need_b, _, need_lw, need_lb = ctx.needs_input_grad[:6]
        need_b = need_b and ctx.has_bias
        gw = workspace.empty_like(w) if need_w else None
        gb = g.new_empty(w.shape[0], w.shape[2]) if need_b else None
        gh = workspace.empty_like(h) if need_h else None
        glw = torch.zeros_like(ln_w) if ln and need_lw else None
        glb = torch.zeros_like(ln_b) if ln and need_lb else None
        act = _scratch(h, counts)
        normed, grad_normed = (_scratch(h, counts), _scratch(h, counts)) if ln else (None, None)
        stats = _ln_stats(act) if ln else None  # recomputed statistics land here (equal to the saved ones)
        dummy = h.new_empty(0)
        s = 0
        for e, n in enumerate(counts):
            if n == 0:
                if gw is not None:
                    gw[e].zero_()
                if gb is not None:
                    gb[e].zero_()
                continue
            hs, gs = h[s : s + n], g[s : s + n]
            a = torch.ops.aten.gelu.out(hs, out=act[:n])  # recomputed
            a_in = a
            if ln:
                a = torch.ops.aten.native_layer_norm.out(a_in, [F], ln_w[e], ln_b[e], ctx.eps, out0=normed[:n],
                                                         out1=stats[0][:n], out2=stats[1][:n])[0]
            if gw is not None:
                torch.mm(a.t(), gs, out=gw[e])
            if gb is not None:
                torch.sum(gs, 0, out=gb[e])
            if need_h or glw is not None or glb is not None:
                if ln:
                    gn = torch.mm(gs, w[e].t(), out=grad_normed[:n])
                    torch.ops.aten.native_layer_norm_backward.out(
                        gn, a_in, [F], mean[s : s + n], rstd[s : s + n], ln_w[e], ln_b[e],
                        [bool(need_h), glw is not None, glb is not None],
                        out0=gh[s : s + n] if need_h else dummy, out1=glw[e] if glw is not None else dummy,
                        out2=glb[e] if glb is not None else dummy)
                    ga = gh[s : s + n] if need_h else None
                else:
                    ga = torch.mm(gs, w[e].t(), out=gh[s : s + n])
                if ga is not None:
                    torch.ops.aten.gelu_backward.grad_input(ga, hs, grad_input=ga)  # d GELU, in place
            s += n
        return gh, gw, gb, None, glw, glb, None


def _ln_stats(h: Tensor) -> tuple[Tensor, Tensor]:
    """(M, 1) buffers for LayerNorm's mean and rstd, in the dtype ATen's kernels write them in (the input
    dtype on CPU; float32 for half types on CUDA)."""
    low = h.dtype in (torch.bfloat16, torch.float16)
    dtype = torch.float32 if low and h.device.type == "cuda" else h.dtype
    return (torch.empty((h.shape[0], 1), dtype=dtype, device=h.device),
            torch.empty((h.shape[0], 1), dtype=dtype, device=h.device))


def gelu_grouped_linear(h: Tensor, w: Tensor, b: Tensor | None, counts_list: tuple[int, ...],
                        ln_weight: Tensor | None = None, ln_bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``grouped_linear(LN_e(GELU(h)), w, b)`` on the loop backend (``ln_weight`` / ``ln_bias``: the
    experts' ``(E, F)`` sub-LN affine, or None for no sub-LN): GELU and LayerNorm one expert block at
    a time, recomputed in backward; no (M, ffn) GELU or LayerNorm buffer is kept."""
    if sum(counts_list) != h.shape[0]:
        raise ValueError(f"gelu_grouped_linear: counts sum to {sum(counts_list)}, input has {h.shape[0]} rows")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("gelu_grouped_linear: give both ln_weight and ln_bias, or neither")
    return _GeluGroupedLinear.apply(h.contiguous(), w, b, counts_list, ln_weight, ln_bias, eps)


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
