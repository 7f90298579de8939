"""A plain per-token reference MoE: the oracle the grouped engine must match.

It reuses only the layer's router (routing itself is tested separately) and each expert's plain
single-expert function; dispatch, capacity, grouped compute, combine, MH-MoE splitting and padding
handling are all re-done here with Python loops over tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vlmoe.moe import MoE


def reference_forward(layer: MoE, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    c = layer.config
    shape = x.shape
    flat = x.reshape(-1, layer.dim)
    valid = (
        torch.ones(flat.shape[0], dtype=torch.bool)
        if padding_mask is None
        else ~padding_mask.reshape(-1).bool()
    )
    out_rows = [torch.zeros(layer.dim, dtype=x.dtype) for _ in range(flat.shape[0])]
    tokens = [i for i in range(flat.shape[0]) if valid[i]]
    if tokens:
        xv = flat[tokens]
        if layer.head_proj is not None:
            xv = layer.head_proj(xv)
        h = c.heads
        sub = xv.reshape(len(tokens) * h, layer.sub_dim)
        route = layer.router(sub)
        n_sub = sub.shape[0]
        cf = c.capacity_factor if layer.training else c.eval_capacity_factor
        capacity = None if cf is None else max(1, math.ceil(cf * c.top_k * n_sub / c.num_experts))
        # capacity priority: choice rank first, then token order
        k = route.indices.shape[1]
        kept = torch.ones(n_sub, k, dtype=torch.bool) if route.valid is None else route.valid.clone()
        if capacity is not None:
            used = [0] * c.num_experts
            for j in range(k):
                for t in range(n_sub):
                    e = int(route.indices[t, j])
                    if not kept[t, j]:
                        continue
                    if used[e] < capacity:
                        used[e] += 1
                    else:
                        kept[t, j] = False
        sub_out = []
        for t in range(n_sub):
            acc = torch.zeros(layer.sub_dim, dtype=x.dtype)
            for j in range(k):
                if kept[t, j]:
                    e = int(route.indices[t, j])
                    acc = acc + route.weights[t, j].to(x.dtype) * layer.experts.expert_forward(e, sub[t : t + 1])[0]
            sub_out.append(acc)
        y = torch.stack(sub_out).reshape(len(tokens), layer.dim)
        if layer.merge_proj is not None:
            y = layer.merge_proj(y)
        for i, t in enumerate(tokens):
            out_rows[t] = y[i]
    return torch.stack(out_rows).reshape(shape)


def reference_stratified(layer: MoE, x: Tensor, residual: Tensor | None = None) -> Tensor:
    """Stratified MoE one token at a time: pass after pass, each with its own residual."""
    c = layer.config
    L = len(c.strata)
    offsets = [sum(c.strata[:i]) for i in range(L)]
    stratum_of = [s for s, n in enumerate(c.strata) for _ in range(n)]
    rows = []
    for t in range(x.shape[0]):
        r = (residual if residual is not None else x)[t : t + 1]
        out = torch.zeros_like(x[t : t + 1])
        state, first = 0, True
        while state < L:
            inp = x[t : t + 1] if first else layer.strata_norms[state](r + out)
            route = layer.strata_routers[state](inp)
            y = torch.zeros_like(out)
            for j in range(route.indices.shape[1]):
                e = offsets[state] + int(route.indices[0, j])
                y = y + route.weights[0, j].to(x.dtype) * layer.experts.expert_forward(e, inp)
            out = out + y
            state = stratum_of[offsets[state] + int(route.indices[0, 0])] + 1
            first = False
        rows.append(out)
    return torch.cat(rows)
