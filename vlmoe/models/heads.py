"""Heads read a :class:`~vlmoe.models.backbone.BackboneOutput`; the backbone never knows about tasks.

A head is an ``nn.Module`` whose ``forward(out, ...)`` takes the backbone output first, so a task
head is a few lines: pick tokens with ``out.vision_cls`` / ``out.text_cls`` / ``out.vision_patches``
/ ``out.text_tokens`` and map them. The pretraining heads here keep BEiT-3's parameter names
(``mlm_head``, ``mim_head``, ``pooler.{norm,dense}`` map to ``heads.{mlm,mim,pooler}``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .backbone import BackboneOutput
    from .config import VLMoEConfig


class Head(nn.Module):
    """Base class of heads: ``forward(out: BackboneOutput, ...) -> Tensor``."""

    def forward(self, out: BackboneOutput, *args, **kwargs) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _select(x: Tensor, mask: Tensor | None, what: str) -> Tensor:
    """Tokens ``(B, L, D)`` -> the masked ones ``(M, D)`` (or all, ``(B, L, D)``)."""
    if mask is None:
        return x
    if mask.shape != x.shape[:2]:
        raise ValueError(f"{what} mask has shape {tuple(mask.shape)}; expected {tuple(x.shape[:2])}")
    # only the masked positions reach the (large) output projection
    return x[mask.bool()]


class MLMHead(Head):
    """Masked language modelling: text tokens -> vocabulary logits.

    Args:
        dim: token width.
        vocab_size: output classes.
    """

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size)

    def forward(self, out: BackboneOutput, mask: Tensor | None = None) -> Tensor:
        """``(B, Lt, V)`` logits, or ``(M, V)`` for the ``mask`` (B, Lt) True positions."""
        if out.text_tokens is None:
            raise ValueError("MLMHead needs text tokens; the backbone was run without text_ids")
        return self.proj(_select(out.text_tokens, mask, "MLM"))


class MIMHead(Head):
    """Masked image modelling: patch tokens -> visual-tokenizer codebook logits.

    Args:
        dim: token width.
        codebook_size: output classes (8192 for BEiT v2's VQ-KD).
    """

    def __init__(self, dim: int, codebook_size: int = 8192) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, codebook_size)

    def forward(self, out: BackboneOutput, mask: Tensor | None = None) -> Tensor:
        """``(B, N, K)`` logits over patches (no CLS), or ``(M, K)`` at the ``mask`` (B, N) positions."""
        if out.vision_patches is None:
            raise ValueError("MIMHead needs vision tokens; the backbone was run without an image")
        return self.proj(_select(out.vision_patches, mask, "MIM"))


class Pooler(Head):
    """``tanh(dense(norm(cls)))`` over the vision CLS token (BEiT-3's VQA pooler) or the first text token.

    Args:
        dim: token width.
        eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, dim)

    def forward(self, out: BackboneOutput, token: str = "vision") -> Tensor:
        """``(B, D)`` pooled feature of the ``vision`` CLS or the first ``text`` token."""
        if token not in ("vision", "text"):
            raise ValueError(f"Pooler token={token!r}: choose 'vision' or 'text'")
        x = out.vision_cls if token == "vision" else out.text_cls
        if x is None:
            raise ValueError(f"Pooler(token={token!r}): the backbone output has no {token} tokens")
        return torch.tanh(self.dense(self.norm(x)))


def build_head(name: str, config: VLMoEConfig) -> Head:
    """The pretraining head ``name`` (``mlm``, ``mim`` or ``pooler``) sized for ``config``."""
    if name == "mlm":
        return MLMHead(config.dim, config.vocab_size)
    if name == "mim":
        return MIMHead(config.dim, config.codebook_size)
    if name == "pooler":
        return Pooler(config.dim, config.layernorm_eps)
    raise ValueError(f"unknown head {name!r}; choose from ['mim', 'mlm', 'pooler']")
