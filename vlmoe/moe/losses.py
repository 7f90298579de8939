"""Auxiliary losses of MoE routers (pure functions of the router outputs)."""

from __future__ import annotations

import torch
from torch import Tensor


def load_balance_loss(probs: Tensor, indices: Tensor, num_experts: int, first_choice_only: bool = False) -> Tensor:
    """Switch / GShard load-balance loss  E * sum_e f_e * P_e.

    P_e is the mean routing probability of expert e over the routed tokens; f_e the fraction of
    assignments that went to e: over all k choices (``first_choice_only=False``, Switch/Megatron),
    or over first choices only (GShard / torchscale / the MH-MoE code). Equals 1 under perfectly
    uniform routing, and E when everything goes to one expert with probability 1.

    Args:
        probs: (T, E) routing distribution of the T routed (non-padding) tokens.
        indices: (T, k) chosen experts (before any capacity dropping).
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    idx = indices[:, :1] if first_choice_only else indices
    f = torch.bincount(idx.reshape(-1), minlength=num_experts).to(probs.dtype) / idx.numel()
    return num_experts * torch.dot(f, probs.mean(0))


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()
