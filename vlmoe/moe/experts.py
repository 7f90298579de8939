"""Experts with stacked weights: E feed-forward networks computed in one grouped pass.

``gelu``: fc1 -> GELU -> [sub-LN] -> fc2, the BEiT-3 / Magneto FFN (``ffn_layernorm`` is the sub-LN).
``swiglu``: W2 (SiLU(W_g x) * W_u x), the LLaMA / HMoE expert.

Weights have the shape ``(E, in, out)`` so that rows multiply on the left (``x @ w1[e]``); a dense
``nn.Linear`` weight ``W`` of shape (out, in) maps to ``w[e] = W.T``.

Memory layout: both are row-major (E, in, out). The kernels take any dense layout: a ``w1`` stored as
each expert's (out, in) matrix (the transposed view of an (E, out, in) tensor) runs fc1's products
~12 % faster on oneDNN (BENCHMARKS.md, "fc1's weights stored (out, in)") and gets its gradient in its
own strides. The parameters here are created row-major.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .grouped import (
    RaggedLayout,
    expert_ffn,
    grouped_linear,
    ragged_linear,
)


class GroupedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        dim: int,
        ffn_dim: int,
        *,
        expert_type: str = "gelu",
        ffn_layernorm: bool = False,
        bias: bool = True,
        layernorm_eps: float = 1e-5,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts, self.dim, self.ffn_dim = num_experts, dim, ffn_dim
        self.expert_type = expert_type
        self.layernorm_eps = layernorm_eps
        self.recompute = recompute  # keep only the input rows for backward; recompute fc1 there
        fc1_out = 2 * ffn_dim if expert_type == "swiglu" else ffn_dim  # swiglu: [gate | up]
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, fc1_out))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, fc1_out)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        if ffn_layernorm:
            self.ln_weight = nn.Parameter(torch.ones(num_experts, ffn_dim))
            self.ln_bias = nn.Parameter(torch.zeros(num_experts, ffn_dim))
        else:
            self.ln_weight = self.ln_bias = None
        self.backend = "auto"
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """trunc-normal(std) weights (BEiT-3's 0.02 by default; a model passes its ``init_std``), zero
        biases, unit sub-LayerNorms."""
        nn.init.trunc_normal_(self.w1, std=std)
        nn.init.trunc_normal_(self.w2, std=std)
        for p in (self.b1, self.b2, self.ln_bias):
            if p is not None:
                nn.init.zeros_(p)
        if self.ln_weight is not None:
            nn.init.ones_(self.ln_weight)

    def expert_params(self) -> list[int]:
        """Parameters (matrices + biases + sub-LN) of each expert."""
        n = _ffn_params(self.dim, self.ffn_dim, self.expert_type, self.b1 is not None)
        n += 0 if self.ln_weight is None else 2 * self.ffn_dim
        return [n] * self.num_experts

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, ffn_dim={self.ffn_dim}, "
            f"type={self.expert_type}, sub_ln={self.ln_weight is not None}, bias={self.b1 is not None}"
            + (", recompute=True" if self.recompute else "")
        )

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """(M, dim) rows sorted by expert, (E,) rows per expert -> (M, dim)."""
        if self.recompute and torch.is_grad_enabled() and not (self.expert_type == "gelu" and self._host_counts(x)):
            # every path but the loop kernel (which recomputes fc1 itself): plain activation checkpointing
            return checkpoint(self._forward, x, counts, use_reentrant=False)
        return self._forward(x, counts)

    def _host_counts(self, x: Tensor) -> bool:
        """The loop backend (counts read on the host) rather than one device-side grouped kernel."""
        return not x.is_cuda or self.backend == "loop"

    def _forward(self, x: Tensor, counts: Tensor) -> Tensor:
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        dt = _autocast_dtype(x)
        if dt is not None:  # the grouped kernels run outside autocast: cast once here
            x, w1, w2 = x.to(dt), w1.to(dt), w2.to(dt)
            b1 = b1.to(dt) if b1 is not None else None
            b2 = b2.to(dt) if b2 is not None else None
        counts_list = tuple(counts.tolist()) if self._host_counts(x) else None
        with torch.autocast(x.device.type, enabled=False):
            if self.expert_type == "gelu" and counts_list is not None:
                # loop backend: the whole FFN expert block by expert block in both passes (GELU and the
                # sub-LN recomputed in backward, fc1 too with `recompute`; no (M, F) GELU / LN buffer)
                lw = self.ln_weight.to(x.dtype) if self.ln_weight is not None else None
                lb = self.ln_bias.to(x.dtype) if self.ln_bias is not None else None
                return expert_ffn(x, w1, b1, w2, b2, counts_list, lw, lb, self.layernorm_eps,
                                  recompute=self.recompute and torch.is_grad_enabled())
            h = grouped_linear(x, w1, b1, counts, counts_list, self.backend)  # (M, F) or (M, 2F)
            if self.expert_type == "swiglu":
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                # BEiT-3 casts to float32 around the GELU; the bf16/fp16 GELU and LayerNorm kernels already
                # compute in float32 internally and round once, so no extra casts (and memory passes) here
                h = F.gelu(h)
            if self.ln_weight is not None:
                # Sub-LN without host counts (CUDA grouped_mm): the per-expert affine is folded into fc2
                # (exact), so the normalisation runs once over all rows without a host sync.
                h = F.layer_norm(h, (self.ffn_dim,), eps=self.layernorm_eps)
                lw, lb = self.ln_weight.to(w2.dtype), self.ln_bias.to(w2.dtype)
                fold_b = torch.bmm(lb.unsqueeze(1), w2).squeeze(1)  # (E, dim) = beta_e @ W2_e
                b2 = fold_b if b2 is None else b2 + fold_b
                w2 = lw.unsqueeze(-1) * w2  # (E, F, dim) = diag(gamma_e) W2_e
            return grouped_linear(h, w2, b2, counts, counts_list, self.backend)

    # ------------------------------------------------------------------ reference / interop
    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """Expert e applied to (n, dim) rows with plain ops (the oracle the grouped path must match)."""
        h = x @ self.w1[e] + (self.b1[e] if self.b1 is not None else 0)
        if self.expert_type == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        if self.ln_weight is not None:
            h = F.layer_norm(h, (self.ffn_dim,), self.ln_weight[e], self.ln_bias[e], self.layernorm_eps)
        return h @ self.w2[e] + (self.b2[e] if self.b2 is not None else 0)

    @torch.no_grad()
    def load_dense(self, fc1: nn.Linear, fc2: nn.Linear, ln: nn.LayerNorm | None = None,
                   experts: list[int] | None = None, noise_std: float = 0.0) -> None:
        """Copy a dense FFN (fc1, [ffn_layernorm], fc2) into experts (all by default): upcycling."""
        if self.expert_type != "gelu":
            raise ValueError("load_dense copies a GELU FFN; this layer has expert_type=" + self.expert_type)
        if fc1.weight.shape != (self.ffn_dim, self.dim) or fc2.weight.shape != (self.dim, self.ffn_dim):
            raise ValueError(
                f"dense FFN shapes fc1={tuple(fc1.weight.shape)}, fc2={tuple(fc2.weight.shape)} do not match "
                f"experts (dim={self.dim}, ffn_dim={self.ffn_dim})"
            )
        for e in experts if experts is not None else range(self.num_experts):
            self.w1[e].copy_(fc1.weight.t())
            self.w2[e].copy_(fc2.weight.t())
            if self.b1 is not None:
                self.b1[e].copy_(fc1.bias if fc1.bias is not None else 0)
                self.b2[e].copy_(fc2.bias if fc2.bias is not None else 0)
            if self.ln_weight is not None and ln is not None:
                self.ln_weight[e].copy_(ln.weight)
                self.ln_bias[e].copy_(ln.bias)
            if noise_std > 0:
                self.w1[e].add_(torch.randn_like(self.w1[e]) * noise_std)
                self.w2[e].add_(torch.randn_like(self.w2[e]) * noise_std)


class HeteroExperts(nn.Module):
    """Experts of different hidden widths (HMoE) computed in one ragged grouped pass.

    No engine supports this with stacked weights (every grouped GEMM takes one (E, K, N) tensor), so
    the weights of all experts live in flat parameters - expert e's fc1 block is (dim, F_e) - and the
    hidden activations of the routed rows live in one flat buffer (see
    :class:`vlmoe.moe.grouped.RaggedLayout`). Each expert costs exactly its own FLOPs; no padding to
    the widest expert, no per-expert Python work beyond one GEMM call.
    """

    def __init__(self, dim: int, sizes: list[int], *, expert_type: str = "swiglu", bias: bool = True,
                 recompute: bool = False) -> None:
        super().__init__()
        self.recompute = recompute  # activation checkpointing of the expert FFN
        self.dim, self.sizes, self.num_experts = dim, tuple(int(s) for s in sizes), len(sizes)
        self.expert_type = expert_type
        total = sum(self.sizes)
        self.w1 = nn.Parameter(torch.empty(dim * total))  # gate (swiglu) or fc1, blocks (dim, F_e)
        self.w3 = nn.Parameter(torch.empty(dim * total)) if expert_type == "swiglu" else None  # up
        self.w2 = nn.Parameter(torch.empty(total * dim))  # blocks (F_e, dim)
        self.b1 = nn.Parameter(torch.zeros(total)) if bias else None
        self.b3 = nn.Parameter(torch.zeros(total)) if bias and expert_type == "swiglu" else None
        self.b2 = nn.Parameter(torch.zeros(self.num_experts * dim)) if bias else None
        self.backend = "loop"
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for p in (self.w1, self.w3, self.w2):
            if p is not None:
                nn.init.trunc_normal_(p, std=std)
        for p in (self.b1, self.b3, self.b2):
            if p is not None:
                nn.init.zeros_(p)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, sizes={list(self.sizes)}, type={self.expert_type}, bias={self.b1 is not None}"

    def expert_params(self) -> list[int]:
        """Parameters (matrices + biases) of each expert."""
        return [_ffn_params(self.dim, f, self.expert_type, self.b1 is not None) for f in self.sizes]

    def expert_weights(self, e: int) -> dict[str, Tensor]:
        """Views of expert e's weights: w1 (dim, F_e), [w3 (dim, F_e)], w2 (F_e, dim), biases."""
        d, f = self.dim, self.sizes[e]
        o = sum(self.sizes[:e])
        # flat (d*f,) slices -> w1 (d, f), w2 (f, d)
        out = {"w1": self.w1[d * o : d * (o + f)].view(d, f), "w2": self.w2[d * o : d * (o + f)].view(f, d)}
        if self.w3 is not None:
            out["w3"] = self.w3[d * o : d * (o + f)].view(d, f)  # (d*f,) -> (d, f)
        if self.b1 is not None:
            out["b1"] = self.b1[o : o + f]
            out["b2"] = self.b2[e * d : (e + 1) * d]
            if self.b3 is not None:
                out["b3"] = self.b3[o : o + f]
        return out

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """(M, dim) rows sorted by expert, (E,) rows per expert -> (M, dim)."""
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, counts, use_reentrant=False)
        return self._forward(x, counts)

    def _forward(self, x: Tensor, counts: Tensor) -> Tensor:
        M = x.shape[0]
        dt = _autocast_dtype(x)
        cast = (lambda t: None if t is None else t.to(dt)) if dt is not None else (lambda t: t)
        x = cast(x)
        counts_list = tuple(int(c) for c in counts.tolist())
        E, d = self.num_experts, self.dim
        up = RaggedLayout(counts_list, (d,) * E, self.sizes)
        down = RaggedLayout(counts_list, self.sizes, (d,) * E)
        with torch.autocast(x.device.type, enabled=False):
            h = ragged_linear(x, cast(self.w1), cast(self.b1), up)  # flat: blocks (n_e, F_e)
            if self.w3 is not None:
                h = F.silu(h) * ragged_linear(x, cast(self.w3), cast(self.b3), up)
            else:
                h = F.gelu(h)
            return ragged_linear(h, cast(self.w2), cast(self.b2), down).view(M, d)  # flat (M*d,) -> (M, d)

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        w = self.expert_weights(e)
        h = x @ w["w1"] + w.get("b1", 0)
        if self.w3 is not None:
            h = F.silu(h) * (x @ w["w3"] + w.get("b3", 0))
        else:
            h = F.gelu(h)
        return h @ w["w2"] + w.get("b2", 0)


def _ffn_params(dim: int, f: int, expert_type: str, bias: bool) -> int:
    swiglu = expert_type == "swiglu"
    n = (3 if swiglu else 2) * dim * f
    if bias:
        n += (2 if swiglu else 1) * f + dim
    return n


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None
