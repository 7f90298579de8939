"""The MoE layer: router -> dispatch -> grouped experts -> combine, with optional MH-MoE heads.

MH-MoE (Wu et al., arXiv 2404.15045): a multi-head linear d -> d, split each token into h sub-tokens
of d/h (contiguous slices, in order), route and compute every sub-token on its own, concatenate the
h outputs back to d, then a merge linear d -> d. With ``heads=1`` and no projections this is the plain
top-k layer.

HMoE (Wang et al., arXiv 2408.10681): ``expert_sizes`` gives every expert its own hidden width;
``top_p`` routing activates a variable number of experts per token; ``p_penalty`` balances by size.

Stratified MoE (Xu et al., arXiv 2305.02176): ``strata`` groups experts into L strata passed through
in order; see :mod:`vlmoe.moe.stratified`.

Padding tokens (``padding_mask`` True) are removed before anything else: they are never routed,
never counted, never take capacity, and their output is exactly zero (the block residual keeps them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import MoEConfig
from .dispatch import DispatchPlan, combine, dispatch, expert_capacity, make_plan
from .experts import GroupedExperts, HeteroExperts
from .gemm import Linear
from .losses import load_balance_loss, p_penalty_loss, router_entropy_loss, router_z_loss
from .routers import Router, RouterOutput, build_router
from .stats import MoEAux, RoutingStats


class NonFiniteRoutingError(FloatingPointError, ValueError):
    """An MoE layer's router produced NaN / inf logits (``layer`` names it; a ValueError too, so the CLI
    prints it as one line)."""

    def __init__(self, message: str, layer: str = "") -> None:
        super().__init__(message)
        self.layer = layer


def defer_finite_checks(module: nn.Module, defer: bool = True) -> int:
    """Make every MoE layer in ``module`` record NaN / inf router logits in its
    :class:`~vlmoe.moe.RoutingStats` (``nonfinite``) instead of raising at once.

    A training loop that checks its losses anyway can then name the first bad layer without one host
    sync per layer, and every data-parallel rank can stop at the same step (a rank raising alone
    leaves the others waiting in the gradient all-reduce). Returns the number of layers.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, MoE):
            m.defer_finite_check = defer
            n += 1
    return n


class MoE(nn.Module):
    """A Mixture-of-Experts FFN mapping ``(..., dim) -> (..., dim)`` and returning ``(y, aux)``.

    Args:
        dim: token width.
        config: the :class:`MoEConfig`.
        layernorm_eps: epsilon of the experts' sub-LN and of the Stratified MoE pass norms.

    Example::

        layer = MoE(dim=768, config=MoEConfig(num_experts=8, top_k=2, ffn_dim=3072))
        y, aux = layer(x, padding_mask=None)  # aux.loss: scalar, aux.tokens_per_expert: (E,)
    """

    def __init__(self, dim: int, config: MoEConfig | None = None, *, layernorm_eps: float = 1e-5) -> None:
        super().__init__()
        config = config or MoEConfig()
        if dim % config.heads:
            raise ValueError(f"MoE dim={dim} is not divisible by MoEConfig.heads={config.heads}")
        self.dim, self.config = dim, config
        self.sub_dim = dim // config.heads
        if config.use_head_projections:
            self.head_proj = Linear(dim, dim)
            self.merge_proj = Linear(dim, dim)
        else:
            self.head_proj = self.merge_proj = None
        if config.strata is None:
            self.router = build_router(config, self.sub_dim)
        else:
            from .stratified import build_strata_routers

            self.router = None
            self.strata_routers, self.strata_norms = build_strata_routers(config, self.sub_dim, layernorm_eps)
        if config.expert_sizes is not None:
            self.experts = HeteroExperts(
                self.sub_dim, config.expert_sizes, expert_type=config.expert_type, bias=config.bias,
                recompute=config.recompute_experts,
            )
        else:
            self.experts = GroupedExperts(
                config.num_experts,
                self.sub_dim,
                config.ffn_dim,
                expert_type=config.expert_type,
                ffn_layernorm=config.ffn_layernorm,
                bias=config.bias,
                layernorm_eps=layernorm_eps,
                recompute=config.recompute_experts,
            )
        self.register_buffer(
            "expert_param_counts", torch.tensor(self.experts.expert_params(), dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "expert_size_tensor", torch.tensor(config.sizes, dtype=torch.float32), persistent=False
        )
        self.stats_name = ""  # set by the model, names this layer in routing statistics
        self.expert_parallel = None  # set by vlmoe.moe.parallel.shard_experts
        self.defer_finite_check = False  # see defer_finite_checks
        self.record_assignments = False  # routing analysis: keep each (sub-)token's experts in the stats
        self.reset_projections()

    def reset_projections(self) -> None:
        # MH-MoE appendix E: multi-head layer xavier_uniform(gain=1/sqrt 2); merge layer xavier, bias 0.
        if self.head_proj is not None:
            nn.init.xavier_uniform_(self.head_proj.weight, gain=1 / math.sqrt(2))
            nn.init.zeros_(self.head_proj.bias)
            nn.init.xavier_uniform_(self.merge_proj.weight)
            nn.init.zeros_(self.merge_proj.bias)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def extra_repr(self) -> str:
        c = self.config
        routing = f"top_p={c.top_p}" if c.top_p is not None else f"top_k={c.top_k}"
        extra = f", strata={c.strata}" if c.strata else ""
        return f"dim={self.dim}, experts={c.num_experts}, {routing}, heads={c.heads}, router={c.router}{extra}"

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, residual: Tensor | None = None
    ) -> tuple[Tensor, MoEAux]:
        """Args:
            x: (..., dim) tokens (the FFN input, i.e. after the block's norm).
            padding_mask: (...) True where x is padding.
            residual: (..., dim) the block's residual stream; used by Stratified MoE only, whose passes
                after the first read the updated residual stream (default: ``x`` itself).
        """
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"MoE input has last dimension {x.shape[-1]} (shape {tuple(x.shape)}), expected dim={self.dim}"
            )
        if padding_mask is not None and padding_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"padding_mask shape {tuple(padding_mask.shape)} does not match input tokens {tuple(x.shape[:-1])}"
            )
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} does not match input {tuple(x.shape)}")
        shape = x.shape
        flat = x.reshape(-1, self.dim)  # (N, d)
        res = residual.reshape(-1, self.dim) if residual is not None else None  # (..., d) -> (N, d)
        keep = None
        if padding_mask is not None:
            keep = (~padding_mask.reshape(-1).bool()).nonzero().squeeze(1)  # (T,) non-padding rows
            if keep.numel() == flat.shape[0]:
                keep = None
            else:
                flat = flat.index_select(0, keep)  # (T, d)
                res = res.index_select(0, keep) if res is not None else None
        y, aux = self._forward_tokens(flat, res)
        if keep is not None:
            y = y.new_zeros(shape[:-1].numel(), self.dim).index_copy(0, keep, y)
        return y.view(shape), aux  # (N, d) -> (..., d)

    def _forward_tokens(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, MoEAux]:
        """(T, d) non-padding tokens -> (T, d)."""
        c, h = self.config, self.config.heads
        T = x.shape[0]
        if self.head_proj is not None:
            x = self.head_proj(x)
        sub = x.reshape(T * h, self.sub_dim)  # (T, d) -> (T*h, d/h): h contiguous slices per token
        if c.strata is not None:
            from .stratified import stratified_forward

            # residual (T, d) -> (T*h, d/h), like sub
            res_sub = None if residual is None or self.head_proj is not None else residual.reshape(T * h, -1)
            y, losses, stats = stratified_forward(self, sub, res_sub)
        else:
            cf = c.capacity_factor if self.training else c.eval_capacity_factor
            capacity = None if cf is None else expert_capacity(T * h, c.num_experts, c.top_k, cf)
            y, route, plan = self.route_and_compute(sub, self.router, capacity)
            losses = self.aux_losses(route, plan)
            stats = self.routing_stats(plan, T * h, route)
            if self.record_assignments:
                stats.assignments = route.indices.detach()
        y = y.reshape(T, self.dim)  # (T*h, d/h) -> (T, d): merge the h sub-tokens back
        if self.merge_proj is not None:
            y = self.merge_proj(y)
        loss = sum(losses.values()) if losses else x.new_zeros((), dtype=torch.float32)
        return y.to(x.dtype), MoEAux(loss=loss, losses=losses, stats=(stats,))

    # ------------------------------------------------------------------ parts (also used by strata / EP)
    def route_and_compute(
        self, sub: Tensor, router: Router, capacity: int | None, expert_offset: int = 0
    ) -> tuple[Tensor, RouterOutput, DispatchPlan]:
        """Route (T, d') rows with ``router`` (whose expert ids start at ``expert_offset``) and combine."""
        route = router(sub)
        if self.config.check_finite:
            route.nonfinite = ~torch.isfinite(route.logits).all()
            if not self.defer_finite_check and bool(route.nonfinite):
                name = self.stats_name or "(unnamed)"
                finite_in = bool(torch.isfinite(sub).all())
                raise NonFiniteRoutingError(
                    f"MoE layer {name}: router logits contain NaN/Inf (input finite: {finite_in})", name
                )
        indices = route.indices + expert_offset if expert_offset else route.indices
        plan = make_plan(indices, self.num_experts, capacity, route.valid)
        if self.training and router.bias_balance:
            router.record_load(plan.routed[expert_offset : expert_offset + router.num_experts])
        if self.expert_parallel is not None:
            out = self.expert_parallel.compute(self, dispatch(sub, plan), plan)
        else:
            out = self.experts(dispatch(sub, plan), plan.counts)  # (M, d') grouped by expert
        return combine(out, route.weights, plan), route, plan

    def aux_losses(self, route: RouterOutput, plan: DispatchPlan, expert_offset: int = 0) -> dict[str, Tensor]:
        """Weighted auxiliary losses of one routing (``expert_offset``: first expert the router scores)."""
        c = self.config
        losses = {}
        if c.balance_loss != "none" and c.balance_coef > 0:
            if c.balance_loss == "p_penalty":
                sizes = self.expert_size_tensor[expert_offset : expert_offset + route.probs.shape[1]]
                lb = p_penalty_loss(route.probs, route.indices, sizes, route.valid)
            else:
                lb = load_balance_loss(
                    route.probs, route.indices, route.probs.shape[1], c.balance_loss == "gshard", route.valid
                )
            losses["balance"] = c.balance_coef * lb
        if c.entropy_coef > 0:
            losses["entropy"] = c.entropy_coef * router_entropy_loss(route.probs)
        if c.z_loss_coef > 0:
            losses["z"] = c.z_loss_coef * router_z_loss(route.logits)
        return losses

    def routing_stats(self, plan: DispatchPlan, routed_tokens: int, route: RouterOutput | None = None) -> RoutingStats:
        k = self.config.top_k if route is None else route.indices.shape[1]
        return RoutingStats(
            tokens_per_expert=plan.routed,
            dropped=torch.tensor(plan.num_dropped),
            routed_tokens=routed_tokens,
            top_k=k,
            name=self.stats_name,
            expert_params=self.expert_param_counts,
            expert_sizes=tuple(self.config.sizes),
            nonfinite=None if route is None else route.nonfinite,
        )
