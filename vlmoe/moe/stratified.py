"""Stratified Mixture-of-Experts (Xu et al., arXiv 2305.02176): dynamic capacity through strata.

The E experts are grouped into L strata (e.g. ``strata=[4, 4, 8]``). Every token starts in stratum 0.
In a pass at stratum s, the tokens currently at s are routed by the router of stratum s, which scores
only the experts of stratum s or higher; the stratum of a token's top-1 expert, plus one, is where it
goes next. A token that picks an expert of the last stratum leaves at once, one that keeps picking its
current stratum goes through up to L experts: between 1 and L expert passes per token.

Every pass has its own residual: with r the block's residual stream and y_s the MoE output of pass s,
the input of pass s >= 1 is LN_s(r + y_0 + ... + y_{s-1}) (``strata_layernorm``), and the layer returns
y_0 + y_1 + ... so that the block's ``r + MoE(...)`` equals the reference code's final hidden state.

Only the tokens active at a stratum are computed in its pass. The balance loss of a pass is taken over
that stratum's eligible experts, and the losses are averaged over passes. Under expert parallelism all
ranks run the same number of passes (the loop bound is all-reduced).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import MoEConfig
from .routers import build_router
from .stats import RoutingStats


def build_strata_routers(config: MoEConfig, dim: int, eps: float) -> tuple[nn.ModuleList, nn.ModuleList]:
    routers, norms = nn.ModuleList(), nn.ModuleList()
    offset = 0
    for i, n in enumerate(config.strata):
        eligible = config.num_experts - offset
        sub = config.replace(
            num_experts=eligible, top_k=min(config.top_k, eligible), strata=None, expert_sizes=None,
            max_experts_per_token=None,
        )
        routers.append(build_router(sub, dim))
        norms.append(nn.LayerNorm(dim, eps=eps) if config.strata_layernorm and i > 0 else nn.Identity())
        offset += n
    return routers, norms


def stratified_forward(layer, sub: Tensor, residual: Tensor | None) -> tuple[Tensor, dict, RoutingStats]:
    """All passes of a Stratified MoE layer over (T, d') rows -> (summed outputs, losses, stats)."""
    c: MoEConfig = layer.config
    L, E, T = len(c.strata), c.num_experts, sub.shape[0]
    device = sub.device
    offsets = [sum(c.strata[:i]) for i in range(L)]
    stratum_of = torch.repeat_interleave(
        torch.arange(L, device=device), torch.tensor(c.strata, device=device)
    )  # (E,) stratum of each expert
    stream = sub if residual is None else residual
    state = torch.zeros(T, dtype=torch.long, device=device)  # stratum each token is at
    passes = torch.zeros(T, dtype=torch.long, device=device)
    out = torch.zeros_like(sub)
    routed = torch.zeros(E, dtype=torch.long, device=device)
    dropped = 0
    nonfinite: Tensor | None = None
    losses: dict[str, Tensor] = {}
    n_pass, lowest = 0, _sync_min(layer, 0 if T else L, L)
    while lowest < L:
        active = (state == lowest).nonzero().squeeze(1)  # (n,) tokens at this stratum
        if n_pass == 0 and active.numel() == T:
            inp = sub
        else:
            inp = layer.strata_norms[lowest]((stream + out).index_select(0, active))
        y, route, plan = layer.route_and_compute(inp, layer.strata_routers[lowest], None, offsets[lowest])
        out = out.index_add(0, active, y.to(out.dtype))
        if active.numel():
            nxt = stratum_of[route.indices[:, 0] + offsets[lowest]] + 1  # top-1 expert decides the next stratum
            state = state.index_copy(0, active, nxt)
            passes = passes.index_add(0, active, torch.ones_like(active))
        for k, v in layer.aux_losses(route, plan, offsets[lowest]).items():
            losses[k] = losses[k] + v if k in losses else v
        routed += plan.routed
        dropped += plan.num_dropped
        if route.nonfinite is not None:
            nonfinite = route.nonfinite if nonfinite is None else nonfinite | route.nonfinite
        n_pass += 1
        waiting = state[state < L]
        lowest = _sync_min(layer, int(waiting.min()) if waiting.numel() else L, L)
    losses = {k: v / max(n_pass, 1) for k, v in losses.items()}
    stats = RoutingStats(
        tokens_per_expert=routed,
        dropped=torch.tensor(dropped),
        routed_tokens=T,
        top_k=c.top_k,
        name=layer.stats_name,
        expert_params=layer.expert_param_counts,
        expert_sizes=tuple(c.sizes),
        passes_per_token=torch.bincount(passes, minlength=L + 1)[1:],
        nonfinite=nonfinite,
    )
    return out, losses, stats


def _sync_min(layer, value: int, L: int) -> int:
    """The loop bound, the same on every expert-parallel rank."""
    if layer.expert_parallel is None:
        return value
    return layer.expert_parallel.all_reduce_min(value)
