"""What the backbone returns: :class:`BackboneOutput` (hidden states of both modalities, their split,
the padding mask and the summed MoE auxiliary output), with accessors for the tokens heads read."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vlmoe.moe import MoEAux

__all__ = ["BackboneOutput"]


@dataclass
class BackboneOutput:
    """What :meth:`VLMoE.forward_features` returns.

    Attributes:
        hidden_states: ``(B, Lv + Lt, D)``: vision tokens (CLS, patches) first, then text tokens.
        split_position: number of vision tokens ``Lv`` (0 for text-only; ``L`` for image-only,
            where torchscale reports -1).
        padding_mask: ``(B, Lv + Lt)`` True = padding, or None when the input had none.
        aux: MoE auxiliary losses and routing statistics summed over every MoE layer
            (``aux.loss`` is 0 for a dense model).
        layer_states: with ``return_layers=True``, the ``(B, L, D)`` output of every block
            (before the final norm).
    """

    hidden_states: Tensor
    split_position: int
    padding_mask: Tensor | None
    aux: MoEAux
    layer_states: tuple[Tensor, ...] = ()

    @property
    def vision_tokens(self) -> Tensor | None:
        """``(B, 1 + N, D)`` vision CLS + patches, or None."""
        return self.hidden_states[:, : self.split_position] if self.split_position > 0 else None

    @property
    def vision_cls(self) -> Tensor | None:
        return self.hidden_states[:, 0] if self.split_position > 0 else None

    @property
    def vision_patches(self) -> Tensor | None:
        """``(B, N, D)`` patch tokens (no CLS), or None."""
        return self.hidden_states[:, 1 : self.split_position] if self.split_position > 0 else None

    @property
    def text_tokens(self) -> Tensor | None:
        """``(B, Lt, D)`` text tokens, or None."""
        has_text = self.split_position < self.hidden_states.shape[1]
        return self.hidden_states[:, self.split_position :] if has_text else None

    @property
    def text_cls(self) -> Tensor | None:
        """``(B, D)`` first text token (``<s>``), as BEiT-3's NLVR2 / retrieval heads read it."""
        has_text = self.split_position < self.hidden_states.shape[1]
        return self.hidden_states[:, self.split_position] if has_text else None

    @property
    def text_padding_mask(self) -> Tensor | None:
        return None if self.padding_mask is None else self.padding_mask[:, self.split_position :]
