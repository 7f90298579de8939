"""Auxiliary losses of MoE routers (pure functions of the router outputs)."""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import count_experts


def load_balance_loss(
    probs: Tensor,
    indices: Tensor,
    num_experts: int,
    first_choice_only: bool = False,
    valid: Tensor | None = None,
) -> Tensor:
    """Switch / GShard load-balance loss  E * sum_e f_e * P_e.

    P_e is the mean routing probability of expert e over the routed tokens; f_e the fraction of
    assignments that went to e: over all k choices (``first_choice_only=False``, Switch/Megatron),
    or over first choices only (GShard / torchscale / the MH-MoE code). Equals 1 under perfectly
    uniform routing, and E when everything goes to one expert with probability 1.

    Args:
        probs: (T, E) routing distribution of the T routed (non-padding) tokens.
        indices: (T, k) chosen experts (before any capacity dropping).
        valid: (T, k) real selections (top-p routing), None = all.
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    idx = indices[:, :1] if first_choice_only else indices
    if valid is not None:
        idx = idx[valid[:, : idx.shape[1]]]
    f = count_experts(idx, num_experts).to(probs.dtype) / max(idx.numel(), 1)
    return num_experts * torch.dot(f, probs.mean(0))


def p_penalty_loss(probs: Tensor, indices: Tensor, sizes: Tensor, valid: Tensor | None = None) -> Tensor:
    """HMoE P-Penalty loss  L_P = E * sum_i M_i * P_i  (arXiv 2408.10681, eq. 5).

    M_i = (1/T) sum_t 1{i activated by t} * s_i, with s_i the size of expert i divided by the mean
    size, so that with equal sizes L_P equals the paper's load-balance loss E * sum_i T_i P_i (where
    T_i is the fraction of tokens that activated i; for top-k that is k x :func:`load_balance_loss`).
    Routing to a large expert costs more than routing to a small one, which counters the router's
    drift towards the largest experts.
    """
    T, E = probs.shape
    if T == 0:
        return probs.sum() * 0.0
    idx = indices if valid is None else indices[valid]
    activated = count_experts(idx, E).to(probs.dtype) / T  # T_i
    s = sizes.to(probs.dtype)
    return E * torch.dot(activated * (s / s.mean()), probs.mean(0))


def router_entropy_loss(probs: Tensor) -> Tensor:
    """Mean per-token entropy -sum_i p_i log p_i of the routing distribution (minimised).

    HMoE prints this term as N * sum_i P_i log P_i; its stated intent (with top-p, keep the router
    confident so tokens do not activate ever more experts) requires *minimising* the entropy, which
    is what adding this positive quantity to the loss does.
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    return -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1).mean()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()
