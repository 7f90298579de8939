"""The multiway (MoE) transformer: BEiT-3 as released, with any FFN an MoE layer.

Papers: BEiT-3 (Wang et al., "Image as a Foreign Language", arXiv 2208.10442), VLMo (Bao et al.,
arXiv 2111.02358), Magneto (Wang et al., arXiv 2210.06423, sub-LN), X-MoE (Chi et al., NeurIPS 2022),
MH-MoE (Wu et al., arXiv 2404.15045). Reference code: torchscale ``model/BEiT3.py`` and
``architecture/encoder.py``; unilm ``beit3/``. The computation matches torchscale's ``BEiT3``
(``multiway=True, subln=True``, pre-LN, positions from 2 per modality, vision tokens first); see
``tests/models/test_torchscale_parity.py``.

    model = create_model("base_xmoe8")
    out = model(image=images, text_ids=ids, text_padding_mask=pad)   # BackboneOutput
    out.hidden_states  # (B, 1 + N + Lt, D): [vision CLS, patches, text]
    loss = task_loss + out.aux.loss

The backbone has no heads: task models (:mod:`vlmoe.models.task_models`) put theirs on top of it.
A config with ``modalities=["vision"]`` builds only the vision branch (no text embedding, no text
copies of any layer), as ImageNet classification and detection need.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlmoe.layers import (
    FeedForward,
    KVCache,
    Multiway,
    MultiwayFFN,
    Shared,
    TextEmbedding,
    VisionEmbedding,
    build_attention_mask,
)
from vlmoe.moe import MoE, MoEAux, MoEConfig

from .block import MultiwayBlock
from .config import VLMoEConfig
from .output import BackboneOutput


def _build_ffn(config: VLMoEConfig, index: int) -> MultiwayFFN:
    """The FFN slot of block ``index``: the single place that decides dense / MoE / shared / VL."""
    c = config
    is_moe = index in c.moe_layer_indices
    vl = index >= c.depth - c.vl_ffn_layers and c.has_vision and c.has_text

    def dense() -> nn.Module:
        return FeedForward(c.dim, c.mlp_dim, sub_ln=c.subln, eps=c.layernorm_eps, drop=c.dropout)

    def moe(mc: MoEConfig) -> nn.Module:
        return MoE(c.dim, mc, layernorm_eps=c.layernorm_eps)

    if is_moe and c.moe_multiway == "shared":
        return MultiwayFFN(shared=moe(c.moe))
    if not is_moe:
        return MultiwayFFN(dense() if c.has_vision else None, dense() if c.has_text else None,
                           vl=dense() if vl else None)
    return MultiwayFFN(
        moe(c.moe) if c.has_vision else None,
        moe(c.moe_text or c.moe) if c.has_text else None,
        vl=moe(c.moe) if vl else None,
    )


class VLMoE(nn.Module):
    """The multiway transformer backbone (optional MoE FFNs; no heads).

    Args:
        config: the :class:`VLMoEConfig` (see its presets).
    """

    def __init__(self, config: VLMoEConfig) -> None:
        super().__init__()
        self.config = c = config
        mods = c.modalities
        self.vision_embed = VisionEmbedding(c.img_size, c.patch_size, c.in_chans, c.dim) if c.has_vision else None
        self.text_embed = TextEmbedding(c.vocab_size, c.dim, c.max_text_positions) if c.has_text else None
        dpr = torch.linspace(0, c.drop_path_rate, c.depth).tolist() if c.depth > 1 else [c.drop_path_rate]
        self.blocks = nn.ModuleList(
            MultiwayBlock(
                c.dim,
                c.num_heads,
                _build_ffn(c, i),
                qkv_bias=c.qkv_bias,
                sub_ln=c.subln,
                eps=c.layernorm_eps,
                drop_path=dpr[i],
                attn_drop=c.attn_drop,
                proj_drop=c.dropout,
                share_attention=c.share_attention,
                vl_norm=i >= c.depth - c.vl_ffn_layers,
                modalities=mods,
            )
            for i in range(c.depth)
        )
        if c.final_norm:
            self.norm = Multiway.copies(lambda: nn.LayerNorm(c.dim, eps=c.layernorm_eps), modalities=mods)
        else:
            self.norm = Shared(nn.Identity())
        self.grad_checkpointing = c.grad_checkpointing
        for name, m in self.named_modules():
            if isinstance(m, MoE):
                m.stats_name = name  # names the layer in routing statistics, e.g. blocks.1.mlp.vision
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """BEiT-3 init: trunc-normal(std) linears and embeddings, zero biases, unit LayerNorms.

        MoE layers keep their own initialisation of routers and MH-MoE projections; their experts take
        the same trunc-normal(std) as the dense FFNs, so that a model's ``init_std`` sets the scale of
        every FFN (BEiT-3's 0.02 suits width 768; narrow models want about ``dim ** -0.5``).
        """
        std = self.config.init_std
        moe_layers = [m for m in self.modules() if isinstance(m, MoE)]
        moe_owned = {id(m) for moe in moe_layers for m in moe.modules()}
        for moe in moe_layers:
            moe.experts.reset_parameters(std)
        for m in self.modules():
            if id(m) in moe_owned:
                continue
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.vision_embed is not None:
            self.vision_embed.init_weights(std)
        if self.text_embed is not None:
            self.text_embed.init_weights(std)
        if self.config.magneto_init:
            self._magneto_scale()

    @torch.no_grad()
    def _magneto_scale(self) -> None:
        # Magneto (sub-LN) init: the weights that feed each residual branch's output are scaled up by
        # sqrt(log 2N) (torchscale Encoder: fc1, fc2, out_proj, v_proj; experts' w1/w2 alike).
        gain = math.sqrt(math.log(2 * self.config.depth))
        d = self.config.dim
        for name, p in self.named_parameters():
            if not name.endswith("weight") and not name.endswith((".w1", ".w2")):
                continue
            if ".fc1." in name or ".fc2." in name or ".attn.proj." in name or name.endswith((".w1", ".w2")):
                p.mul_(gain)
            elif ".attn.qkv." in name:
                p[2 * d :].mul_(gain)  # the v rows of the fused (3D, D) weight

    # ------------------------------------------------------------------ API
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_image_size(self, img_size: int) -> None:
        """Change the input resolution; vision positions are resized bicubically."""
        if self.vision_embed is None:
            raise ValueError("set_image_size: this model has no vision branch")
        self.vision_embed.set_image_size(img_size)
        self.config = self.config.replace(img_size=img_size)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (timm's optimizer factory reads this).

        Positions, CLS / mask tokens, and the MoE parameters that play the role of biases or norms but
        are stored 2-D (per-expert biases and sub-LN) plus the X-MoE expert embeddings.
        """
        skip = {
            "vision_embed.cls_token",
            "vision_embed.mask_token",
            "vision_embed.pos_embed.weight",
            "text_embed.pos_embed.weight",
        }
        moe_like = (
            ".experts.b1",
            ".experts.b2",
            ".experts.ln_weight",
            ".experts.ln_bias",
            ".router.expert_embeddings",
            ".router.log_temperature",
        )
        skip.update(n for n, _ in self.named_parameters() if n.endswith(moe_like))
        return skip

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise lr decay (``create_optimizer_v2(..., layer_decay=)``).

        Group 0 = embeddings, group i + 1 = block i (the final norm joins the last block, timm's
        convention); anything else (heads) gets the top group.
        """
        return dict(
            stem=r"^(?:vision_embed|text_embed)\.",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm\.", (99999,))],
        )

    def layer_id(self, name: str) -> int:
        """Layer index of a parameter for layer-wise lr decay, as :meth:`group_matcher` groups it.

        0 = embeddings, i + 1 = block i and the final norm with the last block, depth + 1 = anything
        else (the heads of a task model on top).
        """
        if name.startswith(("vision_embed.", "text_embed.")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith("norm."):
            return self.num_layers
        return self.num_layers + 1

    # ------------------------------------------------------------------ forward
    def forward_features(
        self,
        image: Tensor | None = None,
        text_ids: Tensor | None = None,
        text_padding_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        *,
        text_positions: Tensor | None = None,
        return_layers: bool = False,
        cache: KVCache | None = None,
    ) -> BackboneOutput:
        """Encode an image, a text, or an image-text pair.

        Args:
            image: ``(B, C, H, W)`` at the model's ``img_size``.
            text_ids: ``(B, Lt)`` token ids.
            text_padding_mask: ``(B, Lt)`` True (or 1) = padding; padded keys are masked out of
                attention and never routed by MoE layers.
            image_mask: ``(B, N)`` MIM mask over patches, True = replaced by the mask token.
            attn_mask: ``(L, L)`` or ``(B, L, L)`` over the concatenated sequence (vision first),
                True / non-zero = blocked (BEiT-3 convention, e.g. the captioning mask).
            text_positions: ``(B, Lt)`` explicit text positions (incremental decoding).
            return_layers: also return every block's output in ``layer_states``.
            cache: incremental decoding (:class:`~vlmoe.layers.KVCache` with one layer per block): the
                given tokens are the new ones; every block appends their keys / values and they attend
                over everything cached before. ``attn_mask`` is then ``(L_new, L_cached + L_new)``
                (default: all of it); no padding.
        """
        if image is None and text_ids is None:
            raise ValueError("forward_features needs an image, text_ids or both")
        if image_mask is not None and image is None:
            raise ValueError("image_mask given without an image")
        if image is not None and self.vision_embed is None:
            raise ValueError(f"this model has no vision branch (modalities={self.config.modalities}); pass no image")
        if text_ids is not None and self.text_embed is None:
            raise ValueError(f"this model has no text branch (modalities={self.config.modalities}); pass no text_ids")
        xv = None if image is None else self.vision_embed(image, image_mask)  # (B, 1 + N, D)
        xt, pad = None, None
        if text_ids is not None:
            xt = self.text_embed(text_ids, text_positions)  # (B, Lt, D)
            if text_padding_mask is not None:
                if text_padding_mask.shape != text_ids.shape:
                    raise ValueError(
                        f"text_padding_mask has shape {tuple(text_padding_mask.shape)}; "
                        f"text_ids has {tuple(text_ids.shape)}"
                    )
                pad = text_padding_mask.bool()
                # torchscale zeroes padding embeddings; doing the same keeps even padded outputs equal
                xt = xt.masked_fill(pad.unsqueeze(-1), 0.0)
        elif text_padding_mask is not None:
            raise ValueError("text_padding_mask given without text_ids")
        if xv is not None and xt is not None and xv.shape[0] != xt.shape[0]:
            raise ValueError(f"image batch {xv.shape[0]} != text batch {xt.shape[0]}")

        ref = xv if xv is not None else xt
        B = ref.shape[0]
        num_vision = 0 if xv is None else xv.shape[1]
        length = num_vision + (0 if xt is None else xt.shape[1])
        padding_mask = None
        if pad is not None:
            padding_mask = pad if xv is None else torch.cat([pad.new_zeros(B, num_vision), pad], dim=1)
        if cache is not None:
            if len(cache) != len(self.blocks):
                raise ValueError(f"KV cache has {len(cache)} layers; the backbone has {len(self.blocks)} blocks")
            if padding_mask is not None:
                raise ValueError("incremental decoding with a KV cache takes no text_padding_mask")
            mask = build_attention_mask(None, attn_mask, cache.length + length, B, query_length=length)
        else:
            mask = build_attention_mask(padding_mask, attn_mask, length, B)

        aux = MoEAux.zero(ref.device)
        states = []
        for i, blk in enumerate(self.blocks):
            if cache is not None:
                xv, xt, a = blk(xv, xt, mask, pad, cache=cache[i])
            elif self.grad_checkpointing and torch.is_grad_enabled():
                xv, xt, a = checkpoint(blk, xv, xt, mask, pad, use_reentrant=False)
            else:
                xv, xt, a = blk(xv, xt, mask, pad)
            if a is not None:
                aux = aux + a
            if return_layers:
                states.append(_cat(xv, xt))
        xv, xt = self.norm(xv, xt)
        return BackboneOutput(_cat(xv, xt), num_vision, padding_mask, aux, tuple(states))

    def forward(self, *args: Any, **kwargs: Any) -> BackboneOutput:
        """Same as :meth:`forward_features` (task models apply their heads to the output)."""
        return self.forward_features(*args, **kwargs)


def _cat(xv: Tensor | None, xt: Tensor | None) -> Tensor:
    if xv is None:
        return xt
    return xv if xt is None else torch.cat([xv, xt], dim=1)


# ---------------------------------------------------------------------------------------------- factory
def create_model(name_or_config: str | VLMoEConfig = "base", **overrides: Any) -> VLMoE:
    """Build a model from a preset name (``list_models()``), a YAML/JSON file path, or a config.

    Args:
        name_or_config: preset name, path to a config file, or a :class:`VLMoEConfig`.
        overrides: config fields to change (``moe={"top_k": 1}`` updates the MoE config field-wise).
    """
    if isinstance(name_or_config, VLMoEConfig):
        config = name_or_config.replace(**overrides) if overrides else name_or_config
    elif isinstance(name_or_config, str) and name_or_config.endswith((".yaml", ".yml", ".json")):
        config = VLMoEConfig.from_file(name_or_config).replace(**overrides)
    else:
        config = VLMoEConfig.from_name(name_or_config, **overrides)
    return VLMoE(config)


def list_models() -> list[str]:
    """Names of the model presets."""
    from .config import list_presets

    return list_presets()
