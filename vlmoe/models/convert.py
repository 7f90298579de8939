"""State-dict key mapping between vlmoe and the BEiT-3 (torchscale / unilm) and timm ViT layouts.

Pure functions on ``{name: tensor}`` mappings; loading into a model (shape checks, position
resizing, dense -> MoE upcycling, the report) is :mod:`vlmoe.models.checkpoint` (with
:mod:`~vlmoe.models.upcycling` and :mod:`~vlmoe.models.report`).

BEiT-3 (``A`` = vision, ``B`` = language, optional ``beit3.``) -> vlmoe (``W`` = vision | text):

- ``text_embed.weight`` -> ``text_embed.token_embed.weight``
- ``vision_embed.{proj.*, cls_token, mask_token}`` -> ``vision_embed.{patch_embed.proj.*, cls_token, ...}``
- ``encoder.embed_positions.{A,B}.weight`` -> ``{vision,text}_embed.pos_embed.weight``
- ``encoder.layers.i.self_attn.{q,k,v}_proj.{A,B}.*`` -> ``blocks.i.attn.qkv.W.*`` (rows q; k; v)
- ``encoder.layers.i.self_attn.{inner_attn_ln,out_proj}.{A,B}.*`` -> ``blocks.i.attn.{norm,proj}.W.*``
- ``encoder.layers.i.{self_attn_layer_norm,final_layer_norm}.{A,B}.*`` -> ``blocks.i.{norm1,norm2}.W.*``
- ``encoder.layers.i.ffn.{A,B}.{fc1,ffn_layernorm,fc2}.*`` -> ``blocks.i.mlp.W.{fc1,norm,fc2}.*``
- ``encoder.layer_norm.{A,B}.*`` -> ``norm.W.*``

Heads (``mim_head``, ``mlm_head``, ``pooler``, ``head``, ``fc_norm``, ...) keep their BEiT-3 names:
vlmoe's task models use the same ones next to their ``backbone``, so ``beit3.`` <-> ``backbone.`` is
the whole difference. State dicts of earlier vlmoe versions kept the pretraining heads inside the
backbone as ``heads.{mlm,mim}.proj.*`` / ``heads.pooler.*``; :func:`legacy_head_keys` renames them.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from vlmoe.layers import POSITION_OFFSET

StateDict = dict[str, Tensor]
WAY = {"A": "vision", "B": "text"}
WAY_INV = {v: k for k, v in WAY.items()}

_L = r"encoder\.layers\.(\d+)\."
_BEIT3_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^text_embed\.weight$", "text_embed.token_embed.weight"),
        (r"^vision_embed\.proj\.(weight|bias)$", r"vision_embed.patch_embed.proj.\1"),
        (r"^vision_embed\.(cls_token|mask_token)$", r"vision_embed.\1"),
        (r"^encoder\.embed_positions\.A\.weight$", "vision_embed.pos_embed.weight"),
        (r"^encoder\.embed_positions\.B\.weight$", "text_embed.pos_embed.weight"),
        (_L + r"self_attn\.inner_attn_ln\.([AB])\.(weight|bias)$", r"blocks.\1.attn.norm.{\2}.\3"),
        (_L + r"self_attn\.out_proj\.([AB])\.(weight|bias)$", r"blocks.\1.attn.proj.{\2}.\3"),
        (_L + r"self_attn_layer_norm\.([AB])\.(weight|bias)$", r"blocks.\1.norm1.{\2}.\3"),
        (_L + r"final_layer_norm\.([AB])\.(weight|bias)$", r"blocks.\1.norm2.{\2}.\3"),
        (_L + r"ffn\.([AB])\.(fc1|fc2)\.(weight|bias)$", r"blocks.\1.mlp.{\2}.\3.\4"),
        (_L + r"ffn\.([AB])\.ffn_layernorm\.(weight|bias)$", r"blocks.\1.mlp.{\2}.norm.\3"),
        (r"^encoder\.layer_norm\.([AB])\.(weight|bias)$", r"norm.{\1}.\2"),
    ]
]
_LEGACY_HEADS = [
    (re.compile(r"^heads\.mim\.proj\."), "mim_head."),
    (re.compile(r"^heads\.mlm\.proj\."), "mlm_head."),
    (re.compile(r"^heads\.pooler\."), "pooler."),
]


def legacy_head_keys(sd: StateDict) -> StateDict:
    """Rename the pretraining-head keys of earlier vlmoe versions (``heads.mlm.proj.*`` ...) to
    today's task-model names (``mlm_head.*``, ``mim_head.*``, ``pooler.*``); other keys unchanged."""
    out = {}
    for k, v in sd.items():
        for pat, new in _LEGACY_HEADS:
            if pat.match(k):
                k = pat.sub(new, k, count=1)
                break
        out[k] = v
    return out
_BEIT3_QKV = re.compile(_L + r"self_attn\.([qkv])_proj\.([AB])\.(weight|bias)$")


def strip_prefix(sd: StateDict, prefixes: tuple[str, ...] = ("module.", "beit3.")) -> StateDict:
    """Drop wrapper prefixes (DDP ``module.``, BEiT-3 ``beit3.``) from keys that carry them."""
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def _way(match: re.Match[str], template: str) -> str:
    return match.expand(template).replace("{A}", "vision").replace("{B}", "text")


def beit3_to_vlmoe(sd: StateDict) -> tuple[StateDict, dict[str, str], list[str]]:
    """Map a BEiT-3 state dict (with or without ``beit3.``) to vlmoe names.

    Returns:
        ``(converted, origin, unused)``: the converted tensors, the source key of every converted key
        (for error messages), and the source keys that have no vlmoe counterpart (task heads such
        as ``head.*``, ``fc_norm.*``, ...).
    """
    out: StateDict = {}
    origin: dict[str, str] = {}
    unused: list[str] = []
    qkv: dict[tuple[str, str, str], dict[str, tuple[str, Tensor]]] = {}
    for key, v in sd.items():
        k = key[len("beit3.") :] if key.startswith("beit3.") else key
        m = _BEIT3_QKV.match(k)
        if m:
            layer, which, way, kind = m.groups()
            qkv.setdefault((layer, way, kind), {})[which] = (key, v)
            continue
        for pat, template in _BEIT3_RULES:
            m = pat.match(k)
            if m:
                new = _way(m, template)
                out[new], origin[new] = v, key
                break
        else:
            if k.endswith("relative_position_index"):  # a buffer BEiT-3's own loader skips too
                continue
            unused.append(key)
    for (layer, way, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            unused.extend(src for src, _ in parts.values())
            continue
        new = f"blocks.{layer}.attn.qkv.{WAY[way]}.{kind}"
        out[new] = torch.cat([parts[w][1] for w in "qkv"], dim=0)  # (3D, D) / (3D,): rows q, k, v
        origin[new] = parts["q"][0].replace("q_proj", "{q,k,v}_proj")
    return out, origin, unused


_VLMOE_TO_BEIT3: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^text_embed\.token_embed\.weight$", "text_embed.weight"),
        (r"^vision_embed\.patch_embed\.proj\.(weight|bias)$", r"vision_embed.proj.\1"),
        (r"^vision_embed\.(cls_token|mask_token)$", r"vision_embed.\1"),
        (r"^vision_embed\.pos_embed\.weight$", "encoder.embed_positions.A.weight"),
        (r"^text_embed\.pos_embed\.weight$", "encoder.embed_positions.B.weight"),
        (
            r"^blocks\.(\d+)\.attn\.norm\.(vision|text)\.(weight|bias)$",
            r"encoder.layers.\1.self_attn.inner_attn_ln.{\2}.\3",
        ),
        (
            r"^blocks\.(\d+)\.attn\.proj\.(vision|text)\.(weight|bias)$",
            r"encoder.layers.\1.self_attn.out_proj.{\2}.\3",
        ),
        (
            r"^blocks\.(\d+)\.norm1\.(vision|text)\.(weight|bias)$",
            r"encoder.layers.\1.self_attn_layer_norm.{\2}.\3",
        ),
        (
            r"^blocks\.(\d+)\.norm2\.(vision|text)\.(weight|bias)$",
            r"encoder.layers.\1.final_layer_norm.{\2}.\3",
        ),
        (
            r"^blocks\.(\d+)\.mlp\.(vision|text)\.(fc1|fc2)\.(weight|bias)$",
            r"encoder.layers.\1.ffn.{\2}.\3.\4",
        ),
        (
            r"^blocks\.(\d+)\.mlp\.(vision|text)\.norm\.(weight|bias)$",
            r"encoder.layers.\1.ffn.{\2}.ffn_layernorm.\3",
        ),
        (r"^norm\.(vision|text)\.(weight|bias)$", r"encoder.layer_norm.{\1}.\2"),
    ]
]
_VLMOE_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(vision|text)\.(weight|bias)$")


def vlmoe_to_beit3(sd: StateDict, prefix: str = "beit3.") -> StateDict:
    """Map a *dense, decoupled* vlmoe state dict to the BEiT-3 layout (backbone keys get ``prefix``).

    ``sd`` is a backbone's state dict or a task model's (``backbone.*`` + heads, whose names are
    BEiT-3's already and pass through unchanged).

    Raises:
        ValueError: for keys BEiT-3 has no place for (MoE experts, shared attention, VL-FFN).
    """
    sd = legacy_head_keys(sd)
    task = any(k.startswith("backbone.") for k in sd)
    out: StateDict = {}
    bad = []
    for k, v in sd.items():
        if task:
            if not k.startswith("backbone."):
                out[k] = v  # a head, already under its BEiT-3 name
                continue
            k = k[len("backbone.") :]
        elif k.startswith(("mim_head.", "mlm_head.", "pooler.")):
            out[k] = v
            continue
        m = _VLMOE_QKV.match(k)
        if m:
            layer, way, kind = m.groups()
            for name, part in zip("qkv", v.chunk(3, dim=0)):  # (3D, ...) -> 3 x (D, ...)
                out[f"{prefix}encoder.layers.{layer}.self_attn.{name}_proj.{WAY_INV[way]}.{kind}"] = part.clone()
            continue
        for pat, template in _VLMOE_TO_BEIT3:
            m = pat.match(k)
            if m:
                out[prefix + m.expand(template).replace("{vision}", "A").replace("{text}", "B")] = v
                break
        else:
            bad.append(k)
    if bad:
        raise ValueError(
            f"{len(bad)} key(s) have no BEiT-3 counterpart (only dense decoupled models export to BEiT-3), "
            f"e.g. {bad[:5]}"
        )
    return out


# timm VisionTransformer (incl. timm's beit3_* models: attn.norm / mlp.norm are the sub-LNs)
_TIMM_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^cls_token$", "vision_embed.cls_token"),
        (r"^patch_embed\.proj\.(weight|bias)$", r"vision_embed.patch_embed.proj.\1"),
        (r"^blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$", r"blocks.\1.\2.vision.\3"),
        (r"^blocks\.(\d+)\.attn\.(qkv|proj|norm)\.(weight|bias)$", r"blocks.\1.attn.\2.vision.\3"),
        (r"^blocks\.(\d+)\.mlp\.(fc1|fc2|norm)\.(weight|bias)$", r"blocks.\1.mlp.vision.\2.\3"),
        (r"^norm\.(weight|bias)$", r"norm.vision.\1"),
    ]
]
# parts of other timm ViT flavours that have no place in a BEiT-3 block
_TIMM_UNSUPPORTED = re.compile(
    r"(\.ls[12]\.|\.gamma_[12]$|\.(q|k)_norm\.|^reg_token$|^norm_pre\.|\.q_bias$|\.v_bias$|relative_position|"
    r"^patch_embed\.norm\.|\.attn\.qkv\.(weight|bias)_[a-z]+|^attn_pool\.)"
)
_TIMM_HEAD = re.compile(r"^(head|fc_norm|head_drop|pre_logits)\b")


def timm_vit_to_vlmoe(sd: StateDict) -> tuple[StateDict, dict[str, str], list[str]]:
    """Map a timm ``VisionTransformer`` state dict into the vision branch of a vlmoe model.

    ``pos_embed (1, 1 + N, D)`` gets BEiT-3's two unused leading rows (zeros). Classifier keys
    (``head.*``, ``fc_norm.*``) come back as unused.

    Raises:
        ValueError: naming the keys of ViT variants a BEiT-3 block cannot hold (layer scale,
            qk-norm, register tokens, pre-norm, relative positions).
    """
    unsupported = sorted(k for k in sd if _TIMM_UNSUPPORTED.search(k))
    if unsupported:
        raise ValueError(
            f"this timm checkpoint has parts a BEiT-3 block cannot hold: {unsupported[:6]}"
            f"{' ...' if len(unsupported) > 6 else ''} (layer scale / qk-norm / registers / pre-norm / "
            "relative positions are not supported)"
        )
    out: StateDict = {}
    origin: dict[str, str] = {}
    unused: list[str] = []
    for key, v in sd.items():
        if key == "pos_embed":
            if v.ndim != 3 or v.shape[0] != 1:
                raise ValueError(f"timm key 'pos_embed' has shape {tuple(v.shape)}; expected (1, 1 + N, D)")
            pad = v.new_zeros(POSITION_OFFSET, v.shape[-1])
            out["vision_embed.pos_embed.weight"] = torch.cat([pad, v[0]], dim=0)  # (2 + 1 + N, D)
            origin["vision_embed.pos_embed.weight"] = key
            continue
        for pat, template in _TIMM_RULES:
            m = pat.match(key)
            if m:
                new = m.expand(template)
                out[new], origin[new] = v, key
                break
        else:
            unused.append(key)
    return out, origin, unused


def detect_format(sd: StateDict) -> str:
    """``beit3``, ``timm`` or ``vlmoe`` from the key names of a state dict."""
    keys = list(sd)
    if any(".self_attn." in k and "encoder.layers." in k for k in keys) or any(
        k.endswith("encoder.embed_positions.A.weight") for k in keys
    ):
        return "beit3"
    if "vision_embed.patch_embed.proj.weight" in sd or any(".qkv.vision." in k or ".qkv.shared." in k for k in keys):
        return "vlmoe"
    if "patch_embed.proj.weight" in sd or "pos_embed" in sd or any(k.endswith(".attn.qkv.weight") for k in keys):
        return "timm"
    raise ValueError(f"cannot tell the checkpoint layout (BEiT-3, timm ViT or vlmoe) from its keys, e.g. {keys[:5]}")
