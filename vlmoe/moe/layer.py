"""The MoE layer: router -> dispatch -> grouped experts -> combine, with optional MH-MoE heads.

MH-MoE (Wu et al., arXiv 2404.15045): a multi-head linear d -> d, split each token into h sub-tokens
of d/h (contiguous slices, in order), route and compute every sub-token on its own, concatenate the
h outputs back to d, then a merge linear d -> d. With ``heads=1`` and no projections this is the plain
top-k layer.

Padding tokens (``padding_mask`` True) are removed before anything else: they are never routed,
never counted, never take capacity, and their output is exactly zero (the block residual keeps them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import MoEConfig
from .dispatch import combine, dispatch, expert_capacity, make_plan
from .experts import GroupedExperts
from .losses import load_balance_loss, router_z_loss
from .routers import build_router
from .stats import MoEAux, RoutingStats


class MoE(nn.Module):
    """A Mixture-of-Experts FFN mapping ``(..., dim) -> (..., dim)`` and returning ``(y, aux)``.

    Args:
        dim: token width.
        config: the :class:`MoEConfig`.

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
            self.head_proj = nn.Linear(dim, dim)
            self.merge_proj = nn.Linear(dim, dim)
        else:
            self.head_proj = self.merge_proj = None
        self.router = build_router(config, self.sub_dim)
        self.experts = GroupedExperts(
            config.num_experts,
            self.sub_dim,
            config.ffn_dim,
            expert_type=config.expert_type,
            ffn_layernorm=config.ffn_layernorm,
            bias=config.bias,
            layernorm_eps=layernorm_eps,
        )
        self.stats_name = ""  # set by the model, names this layer in routing statistics
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
        return f"dim={self.dim}, experts={c.num_experts}, top_k={c.top_k}, heads={c.heads}, router={c.router}"

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, MoEAux]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoE input has last dimension {x.shape[-1]} (shape {tuple(x.shape)}), expected dim={self.dim}")
        if padding_mask is not None and padding_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"padding_mask shape {tuple(padding_mask.shape)} does not match input tokens {tuple(x.shape[:-1])}"
            )
        shape = x.shape
        flat = x.reshape(-1, self.dim)  # (N, d)
        keep = None
        if padding_mask is not None:
            keep = (~padding_mask.reshape(-1).bool()).nonzero().squeeze(1)  # (T,) non-padding rows
            if keep.numel() == flat.shape[0]:
                keep = None
            else:
                flat = flat.index_select(0, keep)  # (T, d)
        y, aux = self._forward_tokens(flat)
        if keep is not None:
            y = y.new_zeros(shape[:-1].numel(), self.dim).index_copy(0, keep, y)
        return y.view(shape), aux

    def _forward_tokens(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        """(T, d) non-padding tokens -> (T, d)."""
        c, h = self.config, self.config.heads
        T = x.shape[0]
        if self.head_proj is not None:
            x = self.head_proj(x)
        sub = x.reshape(T * h, self.sub_dim)  # (T, d) -> (T*h, d/h): h contiguous slices per token
        route = self.router(sub)
        if c.check_finite and not torch.isfinite(route.logits).all():
            raise ValueError(
                f"MoE layer {self.stats_name or '(unnamed)'}: router logits contain NaN/Inf "
                f"(input finite: {bool(torch.isfinite(sub).all())})"
            )
        cf = c.capacity_factor if self.training else c.eval_capacity_factor
        capacity = None if cf is None else expert_capacity(T * h, c.num_experts, c.top_k, cf)
        plan = make_plan(route.indices, c.num_experts, capacity)
        rows = dispatch(sub, plan)  # (M, d/h) grouped by expert
        out = self.experts(rows, plan.counts)  # (M, d/h)
        y = combine(out, route.weights, plan)  # (T*h, d/h)
        y = y.reshape(T, self.dim)  # merge the h sub-tokens back
        if self.merge_proj is not None:
            y = self.merge_proj(y)

        if self.training and c.bias_balance:
            self.router.update_bias(plan.routed)
        losses = {}
        if c.balance_loss != "none" and c.balance_coef > 0:
            lb = load_balance_loss(route.probs, route.indices, c.num_experts, c.balance_loss == "gshard")
            losses["balance"] = c.balance_coef * lb
        if c.z_loss_coef > 0:
            losses["z"] = c.z_loss_coef * router_z_loss(route.logits)
        loss = sum(losses.values()) if losses else route.logits.new_zeros(())
        stats = RoutingStats(
            tokens_per_expert=plan.routed,
            dropped=torch.tensor(plan.num_dropped),
            routed_tokens=T * h,
            top_k=c.top_k,
            name=self.stats_name,
        )
        return y.to(x.dtype), MoEAux(loss=loss, losses=losses, stats=(stats,))
