"""Routers: token -> (top-k experts, gate values, routing distribution).

- ``softmax``: linear gate + softmax, top-k (GShard / Switch).
- ``sigmoid``: linear gate + per-expert sigmoid scores (DeepSeek-V3 style).
- ``xmoe`` / ``xmoe_sigmoid``: the X-MoE router (Chi et al., 2022, "On the Representation Collapse
  of Sparse Mixture of Experts"): project the token to a low dimension d_e, take the cosine against
  L2-normalised expert embeddings, divide by a *learnable* temperature. The balance loss uses a
  fixed temperature tau_0. Unlike torchscale's gate, both the token and the expert side are
  normalised and the temperature is really learned.

Every router can add an auxiliary-loss-free selection bias (DeepSeek-V3, arXiv 2412.19437): the bias
shifts which experts are *selected* but never the gate values; it is nudged after every training
step towards balanced load and kept at zero mean.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig


@dataclass
class RouterOutput:
    """What a router hands to dispatch and to the losses (all float32 / int64)."""

    weights: Tensor
    """(T, k) gate value of each selected expert."""
    indices: Tensor
    """(T, k) selected experts, best first."""
    probs: Tensor
    """(T, E) routing distribution (sums to 1 per token) for the balance loss."""
    logits: Tensor
    """(T, E) pre-normalisation scores (for the z-loss)."""
    valid: Tensor | None = None
    """(T, k) which of the k slots are real selections (top-p routing: tokens activate different
    numbers of experts; k is then the largest number in the batch). None: all valid."""
    nonfinite: Tensor | None = None
    """() bool, True when some logit is NaN / inf (set by the layer when it checks)."""


class Router(nn.Module):
    """Shared top-k selection, noise, bias balancing and gate normalisation."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        *,
        sigmoid: bool = False,
        normalize_gates: bool = False,
        jitter: float = 0.0,
        noise: float = 0.0,
        bias_balance: bool = False,
        bias_update_rate: float = 1e-3,
        fp32: bool = True,
        top_p: float | None = None,
        max_experts: int | None = None,
    ) -> None:
        super().__init__()
        self.top_p, self.max_experts = top_p, max_experts
        self.num_experts = num_experts
        self.top_k = top_k
        self.sigmoid = sigmoid
        self.normalize_gates = normalize_gates
        self.jitter = jitter
        self.noise = noise
        self.bias_balance = bias_balance
        self.bias_update_rate = bias_update_rate
        self.fp32 = fp32
        # Selection-only bias; a buffer, not a parameter: it is updated by a rule, not by gradients.
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=bias_balance)
        # load seen since the last bias update; applied at the start of the next training forward, so
        # a recomputation under activation checkpointing routes exactly like the forward it repeats
        self.register_buffer("pending_load", torch.zeros(num_experts), persistent=bias_balance)
        # True: the pending load is applied by the next training forward (standalone use). Trainers that
        # run several forwards before one backward set it False (defer_bias_updates) and call
        # apply_bias_updates after each backward, so no recomputation ever sees a changed bias.
        self.bias_update_on_forward = True

    # subclasses compute (T, E) logits, and optionally balance-loss logits
    def compute_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> RouterOutput:
        if self.training and self.bias_balance and self.bias_update_on_forward and not _in_backward():
            self.apply_pending_load()
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        with torch.autocast(x.device.type, enabled=False) if self.fp32 else nullcontext():
            if self.fp32:
                x = x.float()
            logits, balance_logits = self.compute_logits(x)  # (T, E)
            if self.training and self.noise > 0:
                logits = logits + torch.randn_like(logits) * self.noise
            if self.sigmoid:
                scores = torch.sigmoid(logits)
                probs = _sigmoid_probs(balance_logits if balance_logits is not None else logits)
            else:
                scores = torch.softmax(logits, dim=-1)
                probs = scores if balance_logits is None else torch.softmax(balance_logits, dim=-1)
            select = scores + self.expert_bias if self.bias_balance else scores
            valid = None
            if self.top_p is None:
                # topk is deterministic for ties (lowest index first), which the capacity tests rely on.
                _, indices = torch.topk(select.detach(), self.top_k, dim=-1, sorted=True)  # (T, k)
                weights = scores.gather(-1, indices)  # (T, k)
                if self.normalize_gates:
                    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
            else:
                indices, valid = self._top_p(probs.detach(), select.detach())
                weights = scores.gather(-1, indices) * valid
                # top-p gates are always renormalised over the activated set (HMoE appendix eq. 11)
                weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return RouterOutput(weights=weights, indices=indices, probs=probs, logits=logits, valid=valid)

    def _top_p(self, dist: Tensor, select: Tensor) -> tuple[Tensor, Tensor]:
        """Smallest set of experts (in descending order) whose probabilities reach top_p."""
        order = select.argsort(dim=-1, descending=True, stable=True)  # (T, E)
        d_sorted = dist.gather(-1, order)
        before = d_sorted.cumsum(-1) - d_sorted  # mass of the experts ranked above
        keep = before < self.top_p  # the first expert is always kept
        if self.max_experts is not None:
            keep[:, self.max_experts :] = False
        k_max = max(int(keep.sum(-1).max()), 1) if keep.numel() else 1
        return order[:, :k_max], keep[:, :k_max]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints from before the deferred update have no pending load: nothing was pending
        key = prefix + "pending_load"
        if self.bias_balance and key not in state_dict and prefix + "expert_bias" in state_dict:
            state_dict[key] = torch.zeros_like(self.pending_load)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def record_load(self, tokens_per_expert: Tensor) -> None:
        """Count one training forward's routed tokens for the next bias update (DeepSeek-V3 updates
        the bias once per step from that step's load). A recomputation during backward (activation
        checkpointing) is not counted again."""
        if not _in_backward():
            self.pending_load += tokens_per_expert.to(self.pending_load)

    @torch.no_grad()
    def apply_pending_load(self) -> None:
        """Update the bias from the load recorded since the last update, and start counting afresh."""
        self.update_bias(self.pending_load)
        self.pending_load.zero_()

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: Tensor) -> None:
        """One aux-loss-free balancing step: raise the bias of under-loaded experts, lower the others.
        A zero load (nothing recorded) leaves the bias unchanged."""
        load = tokens_per_expert.to(self.expert_bias)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_bias -= self.expert_bias.mean()  # recentre (the bias is only defined up to a constant)


def defer_bias_updates(module: nn.Module, defer: bool = True) -> int:
    """Make every bias-balanced router in ``module`` wait for :func:`apply_bias_updates` instead of
    updating at its next forward. Needed when one step runs several forwards before its backward (the
    pretraining streams) under activation checkpointing: a bias changed by the second forward would
    make the first forward's recomputation route differently. Returns the number of routers."""
    n = 0
    for m in module.modules():
        if isinstance(m, Router) and m.bias_balance:
            m.bias_update_on_forward = not defer
            n += 1
    return n


@torch.no_grad()
def apply_bias_updates(module: nn.Module, group=None) -> int:
    """Apply the recorded load of every bias-balanced router in ``module`` (call after backward).

    Under torch.distributed the loads are summed over ``group`` first (one all-reduce for all
    routers), so every rank applies the same update from the global batch's load.
    """
    routers = [m for m in module.modules() if isinstance(m, Router) and m.bias_balance]
    if not routers:
        return 0
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        flat = torch.cat([r.pending_load for r in routers])
        dist.all_reduce(flat, group=group)
        for r, load in zip(routers, flat.split([r.pending_load.numel() for r in routers])):
            r.pending_load.copy_(load)
    for r in routers:
        r.apply_pending_load()
    return len(routers)


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (e.g. a checkpointed block recomputing)."""
    return torch._C._current_graph_task_id() != -1


class LinearRouter(Router):
    """``softmax`` / ``sigmoid`` routers: logits = x W_g^T."""

    def __init__(self, dim: int, num_experts: int, top_k: int, **kw) -> None:
        super().__init__(num_experts, top_k, **kw)
        self.gate = nn.Linear(dim, num_experts, bias=False)
        nn.init.trunc_normal_(self.gate.weight, std=0.02)

    def compute_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return F.linear(x, self.gate.weight.to(x.dtype)), None


class CosineRouter(Router):
    """X-MoE router: s = cos(W x, e_i) / tau with learnable tau; balance loss on cos / tau_0."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        router_dim: int = 16,
        temperature: float = 0.3,
        balance_temperature: float = 0.3,
        embedding_norm: float = 0.1,
        **kw,
    ) -> None:
        super().__init__(num_experts, top_k, **kw)
        self.proj = nn.Linear(dim, router_dim, bias=False)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        emb = torch.empty(num_experts, router_dim)
        if num_experts <= router_dim:
            nn.init.orthogonal_(emb)
        else:
            nn.init.normal_(emb)
        self.expert_embeddings = nn.Parameter(F.normalize(emb, dim=-1) * embedding_norm)
        self.embedding_norm = embedding_norm
        # log-parametrised so tau stays positive; clamped at 0.01 like tutel's cosine gate.
        # shape (1,), not a scalar: FSDP cannot shard 0-d parameters
        self.log_temperature = nn.Parameter(torch.tensor([math.log(temperature)]))
        self.balance_temperature = balance_temperature

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp().clamp_min(0.01)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints written while the temperature was a 0-d parameter still load
        key = prefix + "log_temperature"
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)  # () -> (1,)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def compute_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.training:
            # Keep the expert embeddings at a fixed norm (X-MoE implementation tip): cosine routing is
            # scale-free, but a growing norm shrinks the effective learning rate of the embeddings.
            # Through `.data` so the in-place rescale does not bump the autograd version: a second
            # forward before backward (several streams per training step, activation recomputation)
            # would otherwise invalidate the first graph. Between optimizer steps the rescale is a
            # no-op in value, so every graph of a step sees the same embeddings.
            with torch.no_grad():
                e = self.expert_embeddings.data
                e.mul_(self.embedding_norm / e.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        h = F.normalize(F.linear(x, self.proj.weight.to(x.dtype)), dim=-1)  # (T, d_e)
        e = F.normalize(self.expert_embeddings.to(x.dtype), dim=-1)  # (E, d_e)
        cos = h @ e.t()  # (T, E)
        # the balance loss sees a fixed temperature tau_0 (gradients still reach W and e through cos)
        return cos / self.temperature.to(x.dtype), cos / self.balance_temperature


def _sigmoid_probs(logits: Tensor) -> Tensor:
    s = torch.sigmoid(logits)
    return s / s.sum(-1, keepdim=True).clamp_min(1e-20)


def build_router(config: MoEConfig, dim: int) -> Router:
    """The router named by ``config.router`` for tokens of width ``dim``."""
    common = dict(
        sigmoid=config.sigmoid_scores,
        normalize_gates=config.resolved_normalize_gates,
        jitter=config.router_jitter,
        noise=config.router_noise,
        bias_balance=config.bias_balance,
        bias_update_rate=config.bias_update_rate,
        fp32=config.router_fp32,
        top_p=config.top_p,
        max_experts=config.max_experts_per_token,
    )
    if config.router in ("softmax", "sigmoid"):
        return LinearRouter(dim, config.num_experts, config.top_k, **common)
    default_tau = 0.07 if config.sigmoid_scores else 0.3
    return CosineRouter(
        dim,
        config.num_experts,
        config.top_k,
        router_dim=config.resolved_router_dim,
        temperature=config.router_temperature or default_tau,
        balance_temperature=config.balance_temperature or default_tau,
        embedding_norm=config.expert_embedding_norm,
        **common,
    )
