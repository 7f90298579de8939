"""Official checkpoints of other code bases into vlmoe models: BEiT-3 (unilm / torchscale key layout)
and timm's ViTs (the vision branch), with their architecture read off the tensors.

    model, report = load_beit3("beit3_base_patch16_224.pth", "base")        # official checkpoint
    model, report = load_beit3(sd, "base_xmoe8", img_size=384)              # upcycled, positions resized
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

from vlmoe.layers import POSITION_OFFSET

from .backbone import VLMoE
from .checkpoint import load_checkpoint, read_state_dict, resolve_config
from .config import VLMoEConfig
from .convert import StateDict, strip_prefix
from .report import LoadReport

__all__ = ["beit3_config", "load_beit3", "load_timm_vit", "timm_vit_config"]


def load_beit3(
    src: str | Path | dict[str, Any],
    config: str | VLMoEConfig | None = None,
    *,
    strict: bool = False,
    upcycle_noise: float = 0.0,
    key: str | None = None,
    source: str | None = None,
    **overrides: Any,
) -> tuple[VLMoE, LoadReport]:
    """Build a backbone and load an official BEiT-3 checkpoint into it.

    Accepts ``{'model': sd}``, ``{'module': sd}`` (DeepSpeed) or a bare state dict, keys with or
    without ``beit3.``; ``A`` weights go to the vision branch, ``B`` to the language branch; head
    tensors are reported as unused (load the checkpoint into a task model, e.g.
    ``load_checkpoint(VLMoEForPretraining(...), path)``, to keep them). The vision positions are
    resized (bicubic) when ``img_size`` differs from the checkpoint's. MoE presets are upcycled from
    the dense FFNs (see the module docstring for what holds exactly).

    Args:
        src: path or loaded checkpoint.
        config: preset name, config file or :class:`VLMoEConfig`; None reads the architecture off
            the checkpoint (:func:`beit3_config`: ``base`` / ``large`` shapes, final norm present or
            not, heads present). Give a preset to load into another model (e.g. an MoE one).
        strict: raise unless the checkpoint fits the model exactly.
        upcycle_noise: noise std for dense -> MoE copies.
        key: container key to unwrap.
        source: the file a loaded mapping was read from, for messages and the report.
        overrides: config fields to change (``img_size=384``, ``modalities=["vision"]`` ...).

    Returns:
        ``(model, report)``.
    """
    sd, where = read_state_dict(src, key)
    where = source or where
    sd = strip_prefix(sd, ("module.",))
    if config is None:
        config = beit3_config(sd, **overrides)
        if config.name == "custom" and "num_heads" not in overrides:
            warnings.warn(
                f"{where}: not a BEiT-3 base/large shape; num_heads={config.num_heads} assumes 64-wide heads "
                "(attention heads cannot be read off the weights): pass num_heads=... if that is wrong",
                stacklevel=2,
            )
        overrides = {}
    model = VLMoE(resolve_config(config, overrides))
    report = load_checkpoint(model, sd, format="beit3", strict=strict, upcycle_noise=upcycle_noise, source=where)
    report.source = where
    return model, report


def beit3_config(sd: StateDict, **overrides: Any) -> VLMoEConfig:
    """A dense :class:`VLMoEConfig` with the backbone shapes of a BEiT-3 state dict.

    Width, depth, FFN width, vocabulary, patch and image size, text positions, sub-LN and the final
    norm are read off the tensors; ``num_heads`` = width / 64 (BEiT-3 base and large). The name is
    ``base`` / ``large`` when the shapes are those presets'.
    """
    sd = strip_prefix(sd, ("module.", "beit3."))
    try:
        patch = sd["vision_embed.proj.weight"]
        vpos = sd["encoder.embed_positions.A.weight"]
        tpos = sd["encoder.embed_positions.B.weight"]
        vocab = sd["text_embed.weight"].shape[0]
        mlp = sd["encoder.layers.0.ffn.A.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a BEiT-3 state dict: no {e.args[0]!r} key") from None
    dim, p = patch.shape[0], patch.shape[-1]
    side = math.isqrt(vpos.shape[0] - POSITION_OFFSET - 1)
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^encoder\.layers\.(\d+)\.", k)))
    fields: dict[str, Any] = dict(
        img_size=side * p,
        patch_size=p,
        in_chans=patch.shape[1],
        vocab_size=vocab,
        max_text_positions=tpos.shape[0],
        dim=dim,
        depth=depth,
        num_heads=max(dim // 64, 1),
        mlp_dim=mlp,
        final_norm="encoder.layer_norm.A.weight" in sd,
        subln="encoder.layers.0.self_attn.inner_attn_ln.A.weight" in sd,
    )
    name = "custom"
    for preset in ("base", "large"):
        ref = VLMoEConfig.from_name(preset)
        if (ref.dim, ref.depth, ref.mlp_dim, ref.patch_size) == (dim, depth, mlp, p):
            name = preset
    fields.update(overrides)
    return VLMoEConfig(name=fields.pop("name", name), **fields)


def load_timm_vit(
    src: str | Path | dict[str, Any],
    config: str | VLMoEConfig | None = None,
    *,
    strict: bool = False,
    key: str | None = None,
    source: str | None = None,
    **overrides: Any,
) -> tuple[VLMoE, LoadReport]:
    """Build a model and load a timm ``VisionTransformer`` checkpoint into its vision branch.

    Without ``config`` the architecture is read off the checkpoint (width, depth, MLP width, patch
    and image size, sub-LN and final-norm presence, q/k/v bias); ``num_heads`` defaults to width / 64
    (pass it for other ViTs) and ``layernorm_eps`` to 1e-6 (timm's ViT default), or 1e-5 for
    checkpoints with sub-LN (timm's BEiT-3 ports). The language branch stays at its initialisation:
    use the model on images only.

    Returns:
        ``(model, report)``.
    """
    sd, where = read_state_dict(src, key)
    where = source or where
    if config is None:
        config = timm_vit_config(sd, **overrides)
        overrides = {}
    model = VLMoE(resolve_config(config, overrides))
    report = load_checkpoint(model, sd, format="timm", strict=False, source=where)
    report.source = where
    if strict and not report.complete:
        raise ValueError(str(report) + "\n(strict=True)")
    return model, report


def timm_vit_config(sd: StateDict, **overrides: Any) -> VLMoEConfig:
    """A :class:`VLMoEConfig` whose vision branch has the shapes of a timm ViT state dict."""
    try:
        patch = sd["patch_embed.proj.weight"]
        pos = sd["pos_embed"]
    except KeyError as e:
        raise ValueError(f"not a timm ViT state dict: no {e.args[0]!r} key") from None
    dim, in_chans, p = patch.shape[0], patch.shape[1], patch.shape[-1]
    n = pos.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(
            f"timm pos_embed {tuple(pos.shape)}: not CLS + a square grid (no_embed_class ViTs are unsupported)"
        )
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k)))
    fields = dict(
        name="timm_vit",
        img_size=side * p,
        patch_size=p,
        in_chans=in_chans,
        dim=dim,
        depth=depth,
        num_heads=max(dim // 64, 1),
        mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        subln="blocks.0.attn.norm.weight" in sd,
        final_norm="norm.weight" in sd,
        # timm's ViTs use eps 1e-6; its BEiT-3 ports (the only ones with sub-LN) keep BEiT-3's 1e-5
        layernorm_eps=1e-5 if "blocks.0.attn.norm.weight" in sd else 1e-6,
    )
    fields.update(overrides)
    return VLMoEConfig(**fields)
