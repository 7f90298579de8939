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

``expert_ffn`` runs a whole GELU expert FFN (fc1, GELU, per-expert sub-LN, fc2) expert block by expert
block in both passes, optionally recomputing fc1 in backward (activation checkpointing).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import workspace
from .gemm import onednn_takes, rows_mm, rows_product, use_onednn


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, counts: tuple[int, ...]) -> Tensor:
        ctx.onednn = use_onednn(x)
        out = _expert_rows_forward(x, w, b, counts, onednn=ctx.onednn)
        ctx.save_for_backward(x, w)
        ctx.counts, ctx.has_bias = counts, b is not None
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        g = g.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gw, gb = _param_grads(x, g, w, ctx.counts, need_w, need_b and ctx.has_bias)
        gx = _input_grad(g, w, ctx.counts, x.shape, ctx.onednn) if need_x else None
        return gx, gw, gb, None


def _expert_rows_forward(
    x: Tensor, w: Tensor, b: Tensor | None, counts: tuple[int, ...], act=None, onednn: bool | None = None
) -> Tensor:
    """out[rows of e] = act(x[rows of e]) @ w[e] + b[e], expert by expert, into one (M, N) buffer."""
    out = workspace.empty((x.shape[0], w.shape[2]), dtype=x.dtype, device=x.device)
    s = 0
    for e, n in enumerate(counts):
        if n:
            rows = x[s : s + n] if act is None else act(x[s : s + n])
            rows_mm(rows, w[e], out[s : s + n], onednn, None if b is None else b[e])
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


def _input_grad(g: Tensor, w: Tensor, counts: tuple[int, ...], shape: torch.Size,
                onednn: bool | None = None) -> Tensor:
    """Rows of the input gradient, expert by expert: g_e @ w[e]^T."""
    gx = workspace.empty(shape, dtype=g.dtype, device=g.device)
    s = 0
    for e, n in enumerate(counts):
        if n:
            rows_mm(g[s : s + n], w[e].t(), gx[s : s + n], onednn)
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


def _ln_stats(h: Tensor) -> tuple[Tensor, Tensor]:
    """(M, 1) buffers for LayerNorm's mean and rstd, in the dtype ATen's kernels write them in (the input
    dtype on CPU; float32 for half types on CUDA)."""
    low = h.dtype in (torch.bfloat16, torch.float16)
    dtype = torch.float32 if low and h.device.type == "cuda" else h.dtype
    return (torch.empty((h.shape[0], 1), dtype=dtype, device=h.device),
            torch.empty((h.shape[0], 1), dtype=dtype, device=h.device))


_LN_ALGEBRA_MAX_OFFSET = 4.0  # see _ExpertFFN: the largest |mean| / std of a sub-LN row for the fc2 shortcut


def _can_fold(x: Tensor, rows: int, out_dim: int) -> bool:
    """Whether an expert block's sub-LN may be folded into its fc2 (see :class:`_ExpertFFN`), before the
    check of its rows' |mean| / std: CPU fp32 / fp64, and at least twice as many rows as fc2 has outputs."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and rows >= 2 * out_dim


def _row_stats(a: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(n, 1) mean and 1 / sqrt(var + eps) of ``a``'s rows from two vectorised reductions (sum and L2 norm;
    ATen's ``var_mean`` over rows is ~20x slower on CPU). ``var = E[a^2] - mu^2`` loses precision only
    where ``|mu| >> std``, which the caller's ``_LN_ALGEBRA_MAX_OFFSET`` check rules out."""
    F = a.shape[1]
    mu = a.sum(1, keepdim=True).div_(F)
    var = torch.linalg.vector_norm(a, dim=1, keepdim=True).square_().div_(F).sub_(mu.square()).clamp_min_(0)
    return mu, var.add_(eps).rsqrt_()


def _folded_ln_fc2_backward(a: Tensor, g: Tensor, z: Tensor, mu: Tensor, rs: Tensor, w2: Tensor, gamma: Tensor,
                            beta: Tensor, gw2: Tensor | None, gb2: Tensor | None, glw: Tensor | None,
                            glb: Tensor | None, e: int, scratch: Tensor | None, dnn: bool) -> Tensor:
    """Gradients of ``LN(a) @ w2 + b2`` for one expert block whose forward folded the LN into fc2.

    ``a`` (n, F): GELU's output; ``g`` (n, D): the output's gradient; ``z = a @ (gamma * w2)`` from the
    forward; ``mu``, ``rs`` (n, 1): the LN's statistics. Writes fc2's and the LN affine's gradients (into
    ``gw2`` / ``gb2`` and row ``e`` of ``glw`` / ``glb``, each where not None) and returns the gradient of
    ``a``. With ``G = g @ (gamma * w2)^T`` (the normalised rows' gradient), ``c1 = mean_f G = g . colsum`` and
    ``c2 = mean_f G * n = rs (g . z / F - mu c1)``, LayerNorm's input gradient ``rs (G - c1 - n c2)`` is
    ``rs G + p a + q`` with per-row ``p = -rs^2 c2``, ``q = -rs c1 - p mu``: one GEMM of ``[rs g | q]``
    against ``[(gamma w2)^T ; 1]`` and one pass over (n, F) - no normalised rows, no LayerNorm kernel."""
    F = a.shape[1]
    wg = w2 * gamma.unsqueeze(1)  # (F, D)
    gsr = g * rs
    gsum = torch.sum(g, 0, out=gb2) if gb2 is not None else g.sum(0)
    if gw2 is not None or glw is not None:  # n^T g = a^T (rs g) - 1 (mu rs)^T g
        nt_g = torch.mm(a.t(), gsr, out=gw2) if gw2 is not None else a.t() @ gsr
        nt_g.sub_((gsr * mu).sum(0))
        if glw is not None:
            glw[e] = (nt_g * w2).sum(1)
        if gw2 is not None:  # y^T g = gamma n^T g + beta 1^T g
            nt_g.mul_(gamma.unsqueeze(1)).addr_(beta, gsum)
    if glb is not None:
        glb[e] = w2 @ gsum
    mu, rs = mu.view(-1), rs.view(-1)  # (n, 1) -> (n,)
    c1 = (g @ wg.sum(0)).div_(F)
    c2 = ((g * z).sum(1).div_(F) - mu * c1).mul_(rs)
    p = -rs.square() * c2
    q = -rs * c1 - p * mu
    lhs = torch.cat([gsr, q.unsqueeze(1)], 1)  # (n, D + 1)
    rhs = torch.cat([wg, wg.new_ones(F, 1)], 1).t()  # (D + 1, F), the transpose of an (out, in) weight
    ga = rows_product(lhs, rhs, scratch, dnn)
    return ga.addcmul_(a, p.unsqueeze(1))


class _ExpertFFN(torch.autograd.Function):
    """y = LN_e(GELU(x @ w1[e] + b1[e])) @ w2[e] + b2[e], one expert block of rows at a time, both passes.

    The whole GELU expert FFN in one autograd node (the loop backend's path). Per expert block, the
    forward runs fc1, GELU, that expert's sub-LN (ATen's LayerNorm kernel with its own affine
    ``(ln_w[e], ln_b[e])``) and fc2; the backward recomputes GELU and runs the block's whole chain of
    gradients - fc2's weight and input gradients, LayerNorm's, GELU's, fc1's weight, bias and input
    gradients - while the block's (rows, ffn) tensors live only for that block. Kept for backward: the
    input rows, the sub-LN statistics and fc1's output (M, ffn) - or, with ``recompute``, not even that:
    the backward then recomputes each block's fc1 (one more GEMM per block, +1/6 of the experts'
    training FLOPs) and no (M, ffn) tensor exists in either pass. The expert hidden layer is an MoE
    layer's largest activation ((k x tokens) x ffn; for MH-MoE at FLOP parity h x k x F_mh = 3.5x a
    top-2 layer's).

    Why not the plain chain of ops: GELU and LayerNorm over all rows write (M, ffn) outputs that
    autograd keeps, each a fresh allocation above glibc's mmap threshold (page-faulted in every step);
    and a sub-LN with per-expert affine either gathers per-row gamma / beta or folds them into an
    (E, ffn, dim) copy of fc2's weights - weight-sized temporaries in both passes.

    Element-wise passes over a block's (rows, ffn) tensors cost a fifth to a quarter of its GEMMs at
    MH-MoE's widths, so the kernel runs as few as it can:

    - oneDNN's GEMM results are used where they are made, without a copy into a buffer (on the BLAS,
      which can write into one, the (rows, ffn) products go to scratch from :mod:`vlmoe.moe.workspace`);
      only fc1's output kept for backward is copied, into one (M, ffn) buffer.
    - The sub-LN is not recomputed in backward for fc2's weight gradient. With ``n = (a - mu) * rstd``
      the LN output is ``y = n * gamma + beta``, so ``y^T g = gamma * (a^T (rstd * g) - 1 (mu * rstd)^T g)
      + beta (1^T g)``: one GEMM on GELU's output and (ffn, dim) corrections, instead of a LayerNorm pass
      and its (rows, ffn) output - cheaper where a block has at least twice as many rows as fc2 has
      outputs (MH-MoE's sub-tokens: 1,576 rows against 192 in ``base_mhmoe8``'s vision layers). The
      subtraction cancels what a row's mean adds to ``a``: its rounding error grows with ``|mu| * rstd``
      (the mean over the spread), so a block whose rows exceed ``_LN_ALGEBRA_MAX_OFFSET`` recomputes the
      LN instead (a GELU output's mean is below its spread in practice), and so do half types and
      non-CPU devices (where the check would be a host sync). The fp32 gradient stays within a few times
      plain autograd's rounding (``tests/moe/test_layer.py``).
    - Where the same conditions hold in the forward (CPU fp32 / fp64, rows >= 2 x fc2's outputs, every row's
      ``|mu| * rstd`` within the bound), the sub-LN is folded into fc2 and never materialised:
      ``fc2(LN(a)) = rstd (a @ w') - (mu rstd) colsum(w') + beta @ w2 + b2`` with ``w' = gamma * w2`` (the
      statistics from a sum and an L2 norm of each row), and the backward takes LayerNorm's input, weight
      and bias gradients from ``z = a @ w'`` (kept, (M, dim)) and the same products
      (:func:`_folded_ln_fc2_backward`): per block, no LayerNorm output or gradient of (rows, ffn) and no
      fresh allocation of that size - MH-MoE's blocks (``base_mhmoe8``: 1,576 rows against 192 outputs).
      fp32 accuracy: the output and gradients within 3x plain autograd's rounding, the LN weight's within 5x.
    - LayerNorm calls ATen's functional kernels: the ``out=`` variants of ``native_layer_norm`` and its
      backward are composite (the functional kernel, then a ``copy_`` into ``out``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                counts: tuple[int, ...], ln_w: Tensor | None, ln_b: Tensor | None, eps: float,
                recompute: bool) -> Tensor:
        M, F, D = x.shape[0], w1.shape[2], w2.shape[2]
        ln = ln_w is not None
        dnn = use_onednn(x)
        out = workspace.empty((M, D), dtype=x.dtype, device=x.device)
        rows = max(counts, default=0)
        # fc1's output: kept for backward (into one buffer, so that the saved tensors do not depend on the
        # routing) or, with recompute, oneDNN's own result / scratch on the BLAS; GELU's output: scratch
        kept = None if recompute else workspace.empty((M, F), dtype=x.dtype, device=x.device)
        hid = None if recompute and onednn_takes(w1[0], dnn) else workspace.empty((rows, F), dtype=x.dtype,
                                                                                  device=x.device)
        mean, rstd = _ln_stats(out) if ln else (None, None)
        folded = [False] * len(counts)  # blocks whose sub-LN is folded into fc2 (see the class docstring)
        zs = None  # GELU's output times the folded fc2 weights, (M, D), kept for backward
        s = 0
        for e, n in enumerate(counts):
            if n:
                b1e = None if b1 is None else b1[e]
                b2e = None if b2 is None else b2[e]
                if recompute:
                    h = rows_product(x[s : s + n], w1[e], None if hid is None else hid[:n], dnn, b1e)
                else:
                    h = rows_mm(x[s : s + n], w1[e], kept[s : s + n], dnn, b1e)
                a = torch.ops.aten.gelu_(h) if recompute else torch.ops.aten.gelu.out(h, out=hid[:n])
                o = out[s : s + n]
                if ln and _can_fold(x, n, D):
                    mu, rs = _row_stats(a, eps)
                    folded[e] = float((mu.abs() * rs).max()) <= _LN_ALGEBRA_MAX_OFFSET
                if folded[e]:  # fc2(LN(a)) = rstd (a @ w') - (mu rstd) colsum(w') + beta @ w2 + b2
                    wg = w2[e] * ln_w[e].unsqueeze(1)
                    rows_mm(a, wg, o, dnn)
                    if any(ctx.needs_input_grad):
                        if zs is None:
                            zs = workspace.empty((M, D), dtype=x.dtype, device=x.device)
                        zs[s : s + n].copy_(o)
                    const = ln_b[e] @ w2[e] if b2e is None else torch.addmv(b2e, w2[e].t(), ln_b[e])
                    # mu * rs: (n, 1) -> (n,); its outer product with colsum (D,) is (n, D), like o
                    o.mul_(rs).addr_((mu * rs).view(-1), wg.sum(0), alpha=-1).add_(const)
                    mean[s : s + n].copy_(mu)
                    rstd[s : s + n].copy_(rs)
                    del wg
                else:
                    if ln:
                        a, mu, rs = torch.ops.aten.native_layer_norm(a, [F], ln_w[e], ln_b[e], eps)
                        mean[s : s + n].copy_(mu.view(n, 1))  # -> (n, 1) rows of the (M, 1) buffer
                        rstd[s : s + n].copy_(rs.view(n, 1))  # -> (n, 1) rows of the (M, 1) buffer
                    rows_mm(a, w2[e], o, dnn, b2e)
                del a, h
            s += n
        ctx.save_for_backward(x, w1, b1, w2, ln_w, ln_b, mean, rstd, kept, zs)
        ctx.counts, ctx.has_b2, ctx.eps, ctx.onednn, ctx.recompute = counts, b2 is not None, eps, dnn, recompute
        ctx.folded = tuple(folded)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w1, b1, w2, ln_w, ln_b, mean, rstd, kept, zs = ctx.saved_tensors
        g = g.contiguous()
        counts, ln, F, dnn, recompute = ctx.counts, ln_w is not None, w1.shape[2], ctx.onednn, ctx.recompute
        need = ctx.needs_input_grad
        need_x, need_w1, need_b1, need_w2, need_b2 = need[0], need[1], need[2] and b1 is not None, need[3], \
            need[4] and ctx.has_b2
        need_lw, need_lb = ln and need[6], ln and need[7]
        gx = workspace.empty_like(x) if need_x else None
        gw1 = workspace.empty_like(w1) if need_w1 else None
        gw2 = workspace.empty_like(w2) if need_w2 else None
        gb1 = g.new_empty(w1.shape[0], F) if need_b1 else None
        gb2 = g.new_empty(w2.shape[0], w2.shape[2]) if need_b2 else None
        glw = torch.zeros_like(ln_w) if need_lw else None
        glb = torch.zeros_like(ln_b) if need_lb else None
        ln_algebra = ln and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)  # see the class
        rows = max(counts, default=0)

        def scratch(needed: bool) -> Tensor | None:  # for a product the BLAS writes (see rows_product)
            return workspace.empty((rows, F), dtype=x.dtype, device=x.device) if needed else None

        # fc1's recomputed output, then its gradient
        hid = scratch(not onednn_takes(w1[0], dnn)) if recompute else None
        act = workspace.empty((rows, F), dtype=x.dtype, device=x.device)  # GELU's output
        # the sub-LN output's gradient (or, folded, its input's: a product of the same layout)
        grad_normed = scratch(not onednn_takes(w2[0].t(), dnn)) if ln else None
        s = 0
        for e, n in enumerate(counts):
            if n == 0:
                for buf in (gw1, gb1, gw2, gb2):
                    if buf is not None:
                        buf[e].zero_()
                continue
            xs, gs = x[s : s + n], g[s : s + n]
            if recompute:
                h = rows_product(xs, w1[e], None if hid is None else hid[:n], dnn, None if b1 is None else b1[e])
            else:
                h = kept[s : s + n]
            a = torch.ops.aten.gelu.out(h, out=act[:n])
            mu, rs = (mean[s : s + n], rstd[s : s + n]) if ln else (None, None)
            if ctx.folded[e]:  # the sub-LN folded into fc2 in forward: its gradients without its output
                ga = _folded_ln_fc2_backward(a, gs, zs[s : s + n], mu, rs, w2[e], ln_w[e], ln_b[e],
                                             None if gw2 is None else gw2[e], None if gb2 is None else gb2[e],
                                             glw, glb, e, None if grad_normed is None else grad_normed[:n], dnn)
            else:
                # y^T g without y (see the class docstring), unless a row's mean dwarfs its spread
                algebra = (ln_algebra and gw2 is not None and n >= 2 * w2.shape[2]
                           and float((mu.abs() * rs).max()) <= _LN_ALGEBRA_MAX_OFFSET)
                gsum = torch.sum(gs, 0, out=gb2[e]) if gb2 is not None else gs.sum(0) if algebra else None
                if gw2 is not None:
                    if algebra:  # gamma * (a^T (rstd g) - (mu rstd)^T g) + beta g_sum
                        gsr = gs * rs
                        torch.mm(a.t(), gsr, out=gw2[e])
                        gw2[e].sub_((gsr * mu).sum(0)).mul_(ln_w[e].unsqueeze(1)).addr_(ln_b[e], gsum)
                        del gsr
                    else:
                        y = torch.ops.aten.native_layer_norm(a, [F], ln_w[e], ln_b[e], ctx.eps)[0] if ln else a
                        torch.mm(y.t(), gs, out=gw2[e])
                        del y
                if ln:
                    gy = rows_product(gs, w2[e].t(), None if grad_normed is None else grad_normed[:n], dnn)
                    ga, gl, gb = torch.ops.aten.native_layer_norm_backward(
                        gy, a, [F], mu, rs, ln_w[e], ln_b[e],
                        [True, glw is not None, glb is not None])
                    del gy
                    if glw is not None:
                        glw[e] = gl
                    if glb is not None:
                        glb[e] = gb
                else:
                    ga = rows_product(gs, w2[e].t(), act[:n], dnn)  # GELU's output is used up
            del a
            # fc1's gradient: into fc1's recomputed output (dead now); a kept one may be needed again
            gh = torch.ops.aten.gelu_backward.grad_input(ga, h, grad_input=h if recompute else ga)
            if gb1 is not None:
                torch.sum(gh, 0, out=gb1[e])
            if gw1 is not None:
                torch.mm(xs.t(), gh, out=gw1[e])
            if gx is not None:
                rows_mm(gh, w1[e].t(), gx[s : s + n], dnn)
            del ga, gh, h
            s += n
        return gx, gw1, gb1, gw2, gb2, None, glw, glb, None, None


def expert_ffn(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, counts_list: tuple[int, ...],
               ln_weight: Tensor | None = None, ln_bias: Tensor | None = None, eps: float = 1e-5,
               recompute: bool = False) -> Tensor:
    """The GELU expert FFN ``fc2(LN_e(GELU(fc1(x))))`` over expert-contiguous rows on the loop backend.

    Args:
        x: (M, dim) rows sorted by expert; ``counts_list``: rows per expert (Python ints).
        w1, b1, w2, b2: stacked (E, dim, ffn), (E, ffn), (E, ffn, dim), (E, dim) weights (biases or None).
        ln_weight, ln_bias: the experts' (E, ffn) sub-LN affine, or None for no sub-LN.
        recompute: keep only the input rows for backward and recompute fc1 there.

    See :class:`_ExpertFFN`."""
    if sum(counts_list) != x.shape[0]:
        raise ValueError(f"expert_ffn: counts sum to {sum(counts_list)}, input has {x.shape[0]} rows")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("expert_ffn: give both ln_weight and ln_bias, or neither")
    return _ExpertFFN.apply(x.contiguous(), w1, b1, w2, b2, counts_list, ln_weight, ln_bias, eps, recompute)


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
                o = torch.mm(x[xo : xo + n * k].view(n, k), w[wo : wo + k * m].view(k, m),  # x_e (n, k) @ W_e (k, m)
                             out=out[yo : yo + n * m].view(n, m))  # -> y_e (n, m)
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
            gs = g[yo : yo + n * m].view(n, m)  # flat -> g_e (n, m)
            we = w[wo : wo + k * m].view(k, m)  # flat -> W_e (k, m)
            if gx is not None:
                torch.mm(gs, we.t(), out=gx[xo : xo + n * k].view(n, k))  # gx_e (n, k) = g_e (n, m) @ W_e^T (m, k)
            if gw is not None:
                # gw_e (k, m) = x_e^T (k, n) @ g_e (n, m)
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
    # each -> 1-D: x (x_numel,), w (w_numel,), b (b_numel,)
    return _RaggedLinear.apply(x.reshape(-1), w.reshape(-1), None if b is None else b.reshape(-1), layout)
