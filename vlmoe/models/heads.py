"""Head building blocks; the backbone has none, task models (:mod:`vlmoe.models.task_models`) own them.

Parameter names follow BEiT-3 (``unilm/beit3/modeling_finetune.py``) so that released finetuned
checkpoints load their heads: a task model keeps e.g. ``pooler.{norm,dense}`` and ``head.{0,1,3}``
(VQA), ``head.{norm1,dense1,norm2,dense2}`` (NLVR2), ``fc_norm`` + ``head`` (classification),
``mlm_head`` / ``mim_head`` (pretraining, captioning) at its top level, next to ``backbone``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Pooler", "TwoLayerMLP", "select_tokens", "vqa_classifier"]


def select_tokens(x: Tensor, mask: Tensor | None, what: str = "token") -> Tensor:
    """Tokens ``(B, L, D)`` -> the ``mask``-True ones ``(M, D)`` (all of them, ``(B, L, D)``, for None).

    Only the selected positions then reach a (large) output projection, e.g. the MLM head.
    """
    if mask is None:
        return x
    if mask.shape != x.shape[:2]:
        raise ValueError(f"{what} mask has shape {tuple(mask.shape)}; expected {tuple(x.shape[:2])}")
    return x[mask.bool()]


class Pooler(nn.Module):
    """``tanh(dense(norm(x)))`` of one token (BEiT-3's VQA pooler, applied to the vision CLS).

    Args:
        dim: token width.
        eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D)`` -> ``(B, D)``."""
        return torch.tanh(self.dense(self.norm(x)))


def vqa_classifier(dim: int, num_answers: int, eps: float = 1e-5) -> nn.Sequential:
    """BEiT-3's VQA head ``Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, A)`` (keys ``0, 1, 3``)."""
    return nn.Sequential(
        nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim, eps=eps), nn.GELU(), nn.Linear(2 * dim, num_answers)
    )


class TwoLayerMLP(nn.Module):
    """``dense2(gelu(norm2(dense1(norm1(x)))))`` (BEiT-3's NLVR2 head; ``norm1`` optional).

    Args:
        in_features: input width (``4 D`` for NLVR2).
        hidden_features: hidden width.
        out_features: classes.
        norm_input: LayerNorm the input first.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self, in_features: int, hidden_features: int, out_features: int, norm_input: bool = True, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_features, eps=eps) if norm_input else nn.Identity()
        self.dense1 = nn.Linear(in_features, hidden_features)
        self.norm2 = nn.LayerNorm(hidden_features, eps=eps)
        self.act = nn.GELU()
        self.dense2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense2(self.act(self.norm2(self.dense1(self.norm1(x)))))
