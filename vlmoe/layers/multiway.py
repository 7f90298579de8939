"""Multiway modules: the same position in a block holds one module per modality.

The multiway backbone carries a sequence as two *streams*, vision tokens ``(B, Lv, D)`` and text
tokens ``(B, Lt, D)``, either of which may be ``None`` (image-only or text-only input). Keeping the
streams apart instead of splitting a concatenated ``(B, Lv + Lt, D)`` tensor at every multiway layer
(as torchscale's ``MultiwayNetwork`` does) means no split/concatenate copies between per-modality
layers; the streams meet only inside attention. Semantics equal torchscale's: with only vision
tokens everything goes through the vision module (its ``split_position == -1``), with only text
through the text module (``== 0``), otherwise the first ``Lv`` tokens through vision and the rest
through text.

- :class:`Multiway` - decoupled vision / text copies, optionally a third ``vl`` module used for
  image+text inputs (the VL-FFN of the BEiT-3 paper / VLMo top layers);
- :class:`Shared` - one module for both streams (shared attention of the paper variant);
- :class:`MultiwayDropPath` - stochastic depth with one draw per sample across both streams;
- :class:`MultiwayFFN` - the FFN slot: dense FFNs or :class:`vlmoe.moe.MoE` layers per modality, or
  one expert pool routing all tokens by content.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from vlmoe.moe import MoE, MoEAux

Stream = Tensor | None
MODALITIES = ("vision", "text")


def _apply(module: nn.Module | None, x: Stream, way: str = "") -> Stream:
    if x is None:
        return None
    if module is None:
        raise ValueError(f"this model has no {way} branch (built with modalities without {way!r}); give no {way} input")
    return module(x)


def check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    """Validate a modality list (a non-empty subset of :data:`MODALITIES`), in canonical order."""
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        raise ValueError(f"modalities {list(modalities)}: choose a non-empty subset of {list(MODALITIES)}")
    return tuple(m for m in MODALITIES if m in modalities)


class Multiway(nn.Module):
    """Per-modality copies of a module (BEiT-3's decoupled multiway: ``A`` = vision, ``B`` = text).

    Args:
        vision: applied to vision tokens (None: a text-only model).
        text: applied to text tokens (None: a vision-only model).
        vl: optional module applied to *both* streams when both are present (paper-variant VL-FFN
            layers); single-modality inputs still use ``vision`` / ``text``.
    """

    def __init__(self, vision: nn.Module | None, text: nn.Module | None, vl: nn.Module | None = None) -> None:
        super().__init__()
        if vision is None and text is None:
            raise ValueError("Multiway needs a vision or a text module")
        self.vision, self.text = vision, text
        self.vl = vl

    @classmethod
    def copies(
        cls, factory: Callable[[], nn.Module], vl: bool = False, modalities: Sequence[str] = MODALITIES
    ) -> Multiway:
        """Independent copies from ``factory`` (each freshly initialised), one per modality built."""
        mods = check_modalities(modalities)
        both = len(mods) == 2
        return cls(
            factory() if "vision" in mods else None,
            factory() if "text" in mods else None,
            factory() if vl and both else None,
        )

    def forward(self, xv: Stream, xt: Stream) -> tuple[Stream, Stream]:
        if self.vl is not None and xv is not None and xt is not None:
            return self.vl(xv), self.vl(xt)
        return _apply(self.vision, xv, "vision"), _apply(self.text, xt, "text")

    def forward_sequence(self, x: Tensor, num_vision: int) -> Tensor:
        """Apply to a concatenated ``(B, L, D)`` sequence whose first ``num_vision`` tokens are vision."""
        xv, xt = x[:, :num_vision], x[:, num_vision:]  # (B, Lv, D), (B, Lt, D) views
        yv, yt = self(xv if num_vision > 0 else None, xt if num_vision < x.shape[1] else None)
        return torch.cat([y for y in (yv, yt) if y is not None], dim=1)


class Shared(nn.Module):
    """One module applied to both streams (stream-interface twin of :class:`Multiway`).

    Args:
        module: the shared module.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.shared = module

    def forward(self, xv: Stream, xt: Stream) -> tuple[Stream, Stream]:
        return _apply(self.shared, xv), _apply(self.shared, xt)


class MultiwayDropPath(nn.Module):
    """Stochastic depth on a residual branch given as two streams.

    A sample's branch is dropped for all its tokens at once, as ``DropPath`` on the concatenated
    sequence would do, so vision and text tokens of one sample share one draw.

    Args:
        drop_prob: probability of dropping a sample's branch (training only).
        scale_by_keep: divide kept branches by ``1 - drop_prob``.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"

    def forward(self, xv: Stream, xt: Stream) -> tuple[Stream, Stream]:
        if self.drop_prob == 0.0 or not self.training:
            return xv, xt
        ref = xv if xv is not None else xt
        keep_prob = 1.0 - self.drop_prob
        keep = ref.new_empty(ref.shape[0], 1, 1).bernoulli_(keep_prob)  # (B, 1, 1): one draw per sample
        if self.scale_by_keep and keep_prob > 0.0:
            keep.div_(keep_prob)
        return (None if xv is None else xv * keep), (None if xt is None else xt * keep)


def _ffn(
    module: nn.Module, x: Tensor, padding_mask: Tensor | None, residual: Tensor | None
) -> tuple[Tensor, MoEAux | None]:
    if not isinstance(module, MoE):
        return module(x), None
    # only Stratified MoE reads the residual stream (its later passes see r + earlier outputs)
    needs_residual = module.config.strata is not None
    return module(x, padding_mask=padding_mask, residual=residual if needs_residual else None)


def _add_aux(a: MoEAux | None, b: MoEAux | None) -> MoEAux | None:
    if a is None:
        return b
    return a if b is None else a + b


class MultiwayFFN(nn.Module):
    """The FFN slot of a multiway block; each way is a dense FFN or an :class:`~vlmoe.moe.MoE`.

    Exactly one layout is used:

    - ``vision`` + ``text`` (decoupled, BEiT-3): each modality through its own FFN / expert pool;
      with ``vl`` set, image+text inputs send all tokens through ``vl`` instead (paper variant).
    - ``shared``: all tokens of both modalities through one module; when it is an MoE the tokens of
      both streams are routed together, by content, in one call.

    Text padding tokens are never routed by an MoE (their output is 0; the residual keeps them).

    Args:
        vision: FFN for vision tokens.
        text: FFN for text tokens.
        shared: one FFN / expert pool for every token (excludes the others).
        vl: FFN for both modalities of image+text inputs.
    """

    def __init__(
        self,
        vision: nn.Module | None = None,
        text: nn.Module | None = None,
        *,
        shared: nn.Module | None = None,
        vl: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if shared is not None and (vision is not None or text is not None or vl is not None):
            raise ValueError("MultiwayFFN: `shared` excludes `vision`, `text` and `vl`")
        if shared is None and vision is None and text is None:
            raise ValueError("MultiwayFFN needs `vision` and / or `text`, or `shared`")
        self.vision, self.text, self.shared, self.vl = vision, text, shared, vl

    def forward(
        self,
        xv: Stream,
        xt: Stream,
        text_padding_mask: Tensor | None = None,
        residual: tuple[Stream, Stream] = (None, None),
    ) -> tuple[Stream, Stream, MoEAux | None]:
        """Returns ``(vision out, text out, summed MoE aux or None)``.

        Args:
            xv: vision tokens ``(B, Lv, D)`` (after the block's norm) or None.
            xt: text tokens ``(B, Lt, D)`` or None.
            text_padding_mask: ``(B, Lt)`` True = padding.
            residual: the block's residual streams (before the norm), read by Stratified MoE only.
        """
        rv, rt = residual
        joint = self.shared
        if joint is None and self.vl is not None and xv is not None and xt is not None:
            joint = self.vl
        if joint is not None and isinstance(joint, MoE) and xv is not None and xt is not None:
            return self._pooled(joint, xv, xt, text_padding_mask, rv, rt)
        vision = self.vision if joint is None else joint
        text = self.text if joint is None else joint
        yv = yt = aux = None
        if xv is not None:
            if vision is None:
                _apply(None, xv, "vision")
            yv, aux = _ffn(vision, xv, None, rv)
        if xt is not None:
            if text is None:
                _apply(None, xt, "text")
            yt, aux_t = _ffn(text, xt, text_padding_mask, rt)
            aux = _add_aux(aux, aux_t)
        return yv, yt, aux

    @staticmethod
    def _pooled(
        moe: MoE, xv: Tensor, xt: Tensor, text_padding_mask: Tensor | None, rv: Stream, rt: Stream
    ) -> tuple[Tensor, Tensor, MoEAux]:
        # One pool for every token: route vision and text rows in a single call so that the
        # balance loss and the capacity see the whole batch, whatever the modality.
        B, Lv, D = xv.shape
        Lt = xt.shape[1]
        rows = torch.cat([xv.reshape(B * Lv, D), xt.reshape(B * Lt, D)])  # (B*Lv + B*Lt, D)
        res = None
        if rv is not None and rt is not None:
            res = torch.cat([rv.reshape(B * Lv, D), rt.reshape(B * Lt, D)])  # (B*Lv + B*Lt, D)
        pad = None
        if text_padding_mask is not None:
            # (B, Lt) -> (B*Lt,) after B*Lv zeros (vision is never padding): (B*Lv + B*Lt,)
            pad = torch.cat([text_padding_mask.new_zeros(B * Lv), text_padding_mask.reshape(B * Lt)])
        y, aux = _ffn(moe, rows, pad, res)
        yv, yt = y.split([B * Lv, B * Lt])
        return yv.view(B, Lv, D), yt.view(B, Lt, D), aux  # (B*Lv, D) -> (B, Lv, D), (B*Lt, D) -> (B, Lt, D)
