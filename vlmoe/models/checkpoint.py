"""Loading checkpoints into a :class:`~vlmoe.models.VLMoE`: reading files, mapping their keys, filling
backbones and task models.

    report = load_checkpoint(model, "runs/pretrain/demo/checkpoints/last.ckpt")   # any layout, detected
    print(report)                                                                 # missing / unused / ...

Files are read without unpickling code: safetensors, or ``torch.load(weights_only=True)`` (with
``argparse.Namespace`` allowed, which BEiT-3 training checkpoints store under ``args``). A dense FFN in
the checkpoint where the model has an MoE layer is upcycled (:mod:`vlmoe.models.upcycling`); the
official BEiT-3 and timm checkpoints are read by :mod:`vlmoe.models.external`, the load report is
:class:`~vlmoe.models.report.LoadReport`, and :func:`vlmoe.models.load` is the one entry point for
every kind of checkpoint.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vlmoe.io import torch_load
from vlmoe.layers import POSITION_OFFSET, resample_vision_positions

from .backbone import VLMoE, create_model
from .config import VLMoEConfig
from .convert import StateDict, beit3_to_vlmoe, detect_format, legacy_head_keys, strip_prefix, timm_vit_to_vlmoe
from .report import LoadReport
from .upcycling import _moe_target, _upcycle

_CONTAINER_KEYS = ("model", "module", "state_dict", "model_state_dict")
MIN_SHARE = 0.5
"""A load that provides less than this fraction of the weights it should is an error by default."""


# ---------------------------------------------------------------------------------------------- reading
def read_state_dict(src: str | Path | dict[str, Any], key: str | None = None) -> tuple[StateDict, str]:
    """Read a checkpoint file (or take a mapping) and unwrap it to a flat ``{name: tensor}`` dict.

    Args:
        src: ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` path, a directory holding
            ``model.safetensors``, or an already loaded mapping.
        key: container key to unwrap; default: the first of ``model``, ``module``, ``state_dict``.
            A Lightning training checkpoint (``vlmoe pretrain`` / ``finetune``) is unwrapped to the
            model's own weights: its ``state_dict`` with the task's ``model.`` prefix removed.

    Returns:
        ``(state_dict, source description)``.
    """
    if isinstance(src, dict):
        obj, where = src, "<state dict>"
    else:
        path = Path(src)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        where = str(path)
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                obj = load_file(str(path), device="cpu")
            except SafetensorError as e:
                raise ValueError(f"{path}: not a safetensors file or corrupt ({e})") from None
        else:
            obj = torch_load(path, allow=(argparse.Namespace,))
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: not a checkpoint (holds a {type(obj).__name__}, not a mapping of tensors)")
    if key is not None:
        if key not in obj:
            raise KeyError(f"{where}: no key {key!r}; top-level keys: {sorted(obj)[:10]}")
        obj = obj[key]
    elif is_training_checkpoint(obj):
        obj = task_state_dict(obj)
    else:
        for k in _CONTAINER_KEYS:
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{where}: not a state dict (non-tensor entries {bad[:5]}); pass key=... to unwrap it")
    return dict(obj), where


def is_training_checkpoint(obj: Any) -> bool:
    """A Lightning ``.ckpt`` (a dict with ``state_dict`` and Lightning's version or vlmoe's config)."""
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("state_dict"), dict)
        and ("pytorch-lightning_version" in obj or "vlmoe_config" in obj)
    )


def task_state_dict(ckpt: dict[str, Any], prefix: str = "model.") -> StateDict:
    """The model's weights in a training checkpoint: ``state_dict`` entries under ``prefix``, unprefixed.

    Entries outside the prefix (task-only state) are kept as they are, so a load reports them as
    unused rather than dropping them silently.
    """
    sd = ckpt["state_dict"]
    if not any(k.startswith(prefix) for k in sd):
        return dict(sd)
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------- loading
_DENSE_FFN = re.compile(r"^blocks\.(\d+)\.mlp\.(vision|text|vl)\.(fc1|fc2|norm)\.(weight|bias)$")


def _describe(sd: StateDict) -> str:
    dims = {t.shape[-1] for k, t in sd.items() if k.endswith("cls_token")}
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))), default=-1)
    parts = [f"dim={d}" for d in dims] + ([f"depth={depth}"] if depth else [])
    return ", ".join(parts) or "unknown shape"


def load_state_dict(
    model: nn.Module,
    sd: StateDict,
    *,
    source: str = "<state dict>",
    format: str = "vlmoe",
    origin: dict[str, str] | None = None,
    unused: list[str] | None = None,
    heads: StateDict | None = None,
    strict: bool = False,
    upcycle_noise: float = 0.0,
    min_share: float = MIN_SHARE,
    allow_partial: bool = False,
) -> LoadReport:
    """Load backbone tensors in vlmoe naming (and head tensors) into a backbone or a task model.

    Handles what a plain ``load_state_dict`` cannot: a vision position table of another grid
    (bicubic resize), a longer text position table (truncated), dense FFNs loaded into MoE layers
    (upcycling, see the module docstring), the branch a single-modality model does not have
    (skipped, reported). Any other backbone shape difference is an error naming the key; a head
    tensor of another shape (another answer vocabulary, another number of classes) stays at its
    initialisation and is reported, as BEiT-3's own loader does.

    Args:
        model: a :class:`VLMoE` or a :class:`~vlmoe.models.task_models.TaskModel`.
        sd: backbone tensors under vlmoe names (no ``backbone.`` prefix).
        source: description for messages.
        format: the layout the keys came from (for the report).
        origin: vlmoe key -> source key, for messages.
        unused: source keys already known to have no backbone place.
        heads: tensors for the task model's own (non-backbone) parameters, under their names
            (BEiT-3's and timm's head names are the task models' own).
        strict: raise when parameters are missing or keys are unused.
        upcycle_noise: std of the noise added to each expert's copy of a dense FFN.
        min_share: raise when the checkpoint provides less than this fraction of the backbone's
            parameter elements (of a task model: its ``backbone.``; new heads do not count): a
            checkpoint of another model, or of another layout, would otherwise leave the model at
            random init without a word. :attr:`LoadReport.share` reports the whole model's share.
        allow_partial: load whatever matches, however little (a partial load on purpose).
    """
    from .task_models import TaskModel

    origin = origin or {}
    report = LoadReport(source=source, format=format)
    backbone: VLMoE = model.backbone if isinstance(model, TaskModel) else model
    prefix = "backbone." if backbone is not model else ""
    own = backbone.state_dict()
    cfg = backbone.config
    to_load: StateDict = {}
    dense_ffn: dict[tuple[int, str], dict[str, Tensor]] = defaultdict(dict)
    other_branch = _other_branch(cfg)

    def shape_error(key: str, got: Tensor, want: Tensor, hint: str = "") -> ValueError:
        src = origin.get(key, key)
        name = f"{src!r} (-> {key!r})" if src != key else f"{key!r}"
        return ValueError(
            f"{source}: checkpoint key {name} has shape {tuple(got.shape)} but the model expects "
            f"{tuple(want.shape)}{hint}. The checkpoint looks like {_describe(sd)}; the model is "
            f"{cfg.name!r} with dim={cfg.dim}, depth={cfg.depth}, mlp_dim={cfg.mlp_dim}: "
            "pick the matching preset"
        )

    for key, value in sd.items():
        if key not in own:
            m = _DENSE_FFN.match(key)
            if m and _moe_target(backbone, int(m.group(1)), m.group(2)) is not None:
                dense_ffn[(int(m.group(1)), m.group(2))][f"{m.group(3)}.{m.group(4)}"] = value
            elif other_branch is not None and other_branch(key):
                report.branch_skipped.append(origin.get(key, key))
            else:
                report.unexpected.append(origin.get(key, key))
            continue
        want = own[key]
        if value.shape != want.shape:
            if key == "vision_embed.pos_embed.weight" and value.shape[1:] == want.shape[1:]:
                value = _resize_vision_positions(value, backbone, report, source)
            elif key == "text_embed.pos_embed.weight" and value.shape[1:] == want.shape[1:]:
                if value.shape[0] < want.shape[0]:
                    raise shape_error(
                        key,
                        value,
                        want,
                        f" (a text table of {value.shape[0]} rows: build the "
                        f"model with max_text_positions={value.shape[0]})",
                    )
                report.resized.append(f"{key}: kept the first {want.shape[0]} of {value.shape[0]} rows")
                value = value[: want.shape[0]]
            else:
                raise shape_error(key, value, want)
        to_load[key] = value

    covered: set[str] = set()
    for (layer, way), parts in sorted(dense_ffn.items()):
        covered |= _upcycle(backbone, layer, way, parts, upcycle_noise, report, source)

    result = backbone.load_state_dict(to_load, strict=False)
    missing = [k for k in result.missing_keys if k not in covered]
    fresh = set(report.fresh)
    report.missing = [k for k in missing if k not in fresh]
    if format == "timm":
        # a ViT checkpoint has no language branch: that is the format, not a failed load
        report.skipped = [k for k in report.missing if _is_text_param(k)]
        report.missing = [k for k in report.missing if not _is_text_param(k)]

    # the task model's own parameters (heads), under their own names
    candidates = dict(heads or {})
    leftover = list(unused or [])
    if prefix:
        head_state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
        loaded_heads: StateDict = {}
        for k, v in candidates.items():
            if k not in head_state:
                continue
            if tuple(v.shape) != tuple(head_state[k].shape):
                report.head_mismatch.append(
                    f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(head_state[k].shape)} here (left at init)"
                )
            else:
                loaded_heads[k] = v
        model.load_state_dict(loaded_heads, strict=False)
        used = set(loaded_heads) | {m.split(":")[0] for m in report.head_mismatch}
        leftover = [k for k in leftover if k not in used]
        report.unexpected += [k for k in candidates if k not in head_state and k not in leftover]
        report.missing = [prefix + k for k in report.missing] + [k for k in head_state if k not in loaded_heads
                                                                 and k in dict(model.named_parameters())]
        report.skipped = [prefix + k for k in report.skipped]
        report.fresh = [prefix + k for k in report.fresh]
        fresh = set(report.fresh)
    else:
        report.unexpected += [k for k in candidates if k not in leftover]
    report.unexpected = leftover + report.unexpected

    params = dict(model.named_parameters())
    absent = set(report.missing)
    skipped = set(report.skipped)
    expected = [k for k in params if k not in fresh and k not in skipped]
    report.expected_numel = sum(params[k].numel() for k in expected)
    report.loaded_numel = sum(params[k].numel() for k in expected if k not in absent)
    if strict and not report.complete:
        raise ValueError(str(report) + "\n(strict=True: the checkpoint does not fit the model exactly)")
    # the threshold is on the backbone: a task model's heads are new by design, and a detector's heads
    # can outweigh a small backbone
    core = [k for k in expected if k.startswith(prefix)] if prefix else expected
    core_numel = sum(params[k].numel() for k in core)
    core_share = sum(params[k].numel() for k in core if k not in absent) / core_numel if core_numel else 1.0
    if not allow_partial and core_share < min_share:
        matched = sum(1 for k in core if k not in absent)
        what = "backbone's" if prefix else "model's"
        raise ValueError(
            f"{source}: the checkpoint ({format} layout) provides only {core_share:.1%} of the {what} "
            f"weights ({matched} of {len(core)} parameter tensors; at least {min_share:.0%} expected). "
            f"Unused checkpoint keys, e.g. {report.unexpected[:3]}; model keys left at init, e.g. "
            f"{report.missing[:3]}. A checkpoint of another model or layout? To load the matching part "
            "on purpose pass allow_partial=True (CLI: --model.allow_partial_init true)."
        )
    return report


def _other_branch(cfg: VLMoEConfig):
    """A predicate for backbone keys of the branch a single-modality model does not build, or None."""
    if cfg.has_vision and cfg.has_text:
        return None
    if cfg.has_vision:
        return _is_text_param
    return lambda k: k.startswith("vision_embed.") or ".vision." in k


def _resize_vision_positions(value: Tensor, model: VLMoE, report: LoadReport, source: str) -> Tensor:
    num_prefix = POSITION_OFFSET + 1
    n_old = value.shape[0] - num_prefix
    side = math.isqrt(n_old)
    if side * side != n_old:
        raise ValueError(
            f"{source}: vision position table of {value.shape[0]} rows is not {num_prefix} + a square grid"
        )
    new_grid = model.vision_embed.grid_size
    out = resample_vision_positions(value, new_grid, (side, side), num_prefix)
    report.resized.append(
        f"vision_embed.pos_embed.weight: {side}x{side} -> {new_grid[0]}x{new_grid[1]} patches (bicubic)"
    )
    return out


def load_checkpoint(
    model: nn.Module,
    src: str | Path | dict[str, Any],
    *,
    format: str = "auto",
    key: str | None = None,
    strict: bool = False,
    upcycle_noise: float = 0.0,
    allow_partial: bool = False,
    source: str | None = None,
) -> LoadReport:
    """Load a BEiT-3, timm ViT or vlmoe checkpoint into a backbone or a task model (layout detected
    from the keys).

    The checkpoint may hold a backbone alone or a task model (``backbone.*`` + heads, or BEiT-3's
    ``beit3.*`` + heads): backbone weights go to the backbone, head weights to the task model's
    heads of the same name (BEiT-3's names; a head of another shape stays at init and is reported).
    Checkpoints of earlier vlmoe versions (pretraining heads under ``heads.*``) load too.

    Args:
        model: the model to fill (its config decides dense / MoE, sizes, modalities and image size).
        src: file path (``.pth``, ``.safetensors``, a training ``.ckpt``), directory with
            ``model.safetensors``, or a loaded mapping.
        format: ``auto``, ``beit3``, ``timm`` or ``vlmoe``.
        key: container key to unwrap (default: ``model`` / ``module`` / ``state_dict``).
        strict: raise unless every parameter is loaded and every key used.
        upcycle_noise: noise std for dense -> MoE copies.
        allow_partial: accept a checkpoint that provides under half of the backbone's weights (see
            :func:`load_state_dict`).
        source: the file a loaded mapping was read from, for messages and the report.
    """
    sd, where = read_state_dict(src, key)
    where = source or where
    sd = legacy_head_keys(strip_prefix(sd, ("module.",)))
    body, heads = split_task_state(sd)
    fmt = detect_format(body) if format == "auto" else format
    if fmt == "beit3":
        conv, origin, unused = beit3_to_vlmoe(body)
    elif fmt == "timm":
        conv, origin, unused = timm_vit_to_vlmoe(body)
    elif fmt == "vlmoe":
        # a backbone's own keys start with its top-level modules; the rest are heads (mlm_head, ...)
        conv = {k: v for k, v in body.items() if k.startswith(_BACKBONE_ROOTS)}
        heads = {**{k: v for k, v in body.items() if not k.startswith(_BACKBONE_ROOTS)}, **heads}
        origin, unused = {}, []
    else:
        raise ValueError(f"unknown checkpoint format {format!r}; choose from auto, beit3, timm, vlmoe")
    return load_state_dict(
        model,
        conv,
        source=where,
        format=fmt,
        origin=origin,
        unused=unused,
        heads={**{k: body[k] for k in unused if k in body}, **heads},
        strict=strict,
        upcycle_noise=upcycle_noise,
        allow_partial=allow_partial,
    )


_BACKBONE_ROOTS = ("vision_embed.", "text_embed.", "blocks.", "norm.")


def _is_text_param(key: str) -> bool:
    return key.startswith("text_embed.") or ".text." in key


def split_task_state(sd: StateDict) -> tuple[StateDict, StateDict]:
    """``(backbone part, head part)`` of a task model's state dict (``backbone.*`` vs the rest); a
    backbone's own state dict (no ``backbone.`` keys) is all backbone part."""
    if not any(k.startswith("backbone.") for k in sd):
        return sd, {}
    body = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return body, {k: v for k, v in sd.items() if not k.startswith("backbone.")}


def resolve_config(
    config: str | VLMoEConfig | None, overrides: dict[str, Any] | None = None, default: str = "base"
) -> VLMoEConfig:
    """A config from a preset name, a YAML/JSON path or a config, with overrides applied."""
    overrides = overrides or {}
    if config is None:
        config = default
    if isinstance(config, VLMoEConfig):
        return config.replace(**overrides) if overrides else config
    if str(config).endswith((".yaml", ".yml", ".json")):
        return VLMoEConfig.from_file(config).replace(**overrides)
    return VLMoEConfig.from_name(config, **overrides)


def upcycle(
    dense: VLMoE, config: str | VLMoEConfig, *, noise_std: float = 0.0, **overrides: Any
) -> tuple[VLMoE, LoadReport]:
    """An MoE model initialised from a dense model (every expert a copy of its dense FFN).

    Args:
        dense: the dense model.
        config: the MoE model's preset / config (same shapes as ``dense`` outside the MoE layers).
        noise_std: noise on each expert's copy.
    """
    model = create_model(resolve_config(config, overrides))
    report = load_state_dict(model, dense.state_dict(), source="dense model", upcycle_noise=noise_std)
    return model, report
