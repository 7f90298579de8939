"""Loading checkpoints into a :class:`~vlmoe.models.VLMoE`: BEiT-3, timm ViT, vlmoe; dense -> MoE upcycling.

    model, report = load_beit3("beit3_base_patch16_224.pth", "base")        # official checkpoint
    model, report = load_beit3(sd, "base_xmoe8", img_size=384)              # upcycled, positions resized
    print(report)                                                           # missing / unused / ...

Files are read without unpickling code: safetensors, or ``torch.load(weights_only=True)`` (with
``argparse.Namespace`` allowed, which BEiT-3 training checkpoints store under ``args``).

Dense -> MoE upcycling (a dense FFN in the checkpoint, an MoE layer in the model)
-------------------------------------------------------------------------------------
Every expert of the layer's pool receives a copy of the dense FFN (``fc1``, sub-LN, ``fc2``), plus
optional Gaussian noise on ``w1``/``w2`` (``upcycle_noise``) to break the symmetry; routers keep their
fresh initialisation. What then holds:

- **top-1 with** ``normalize_gates=True``: every gate is exactly 1 and every expert is the dense
  FFN, so each MoE layer - and the model - computes the dense model's function (equal up to float
  rounding of the grouped kernels; tested at 1e-5). The default top-1 gate (Switch) instead scales
  the output by the raw router probability (about 1/E at init), which does *not* preserve it.
- **top-k > 1** with normalised gates (the default for k > 1): the k gates sum to 1 and the experts
  are equal, so the output is again the dense FFN's (up to rounding of the weighted sum).
- everywhere, *text padding* positions differ: an MoE layer never routes padding (its output there
  is 0) while a dense FFN computes it; real tokens never attend to padding, so they are unaffected.
- **per-modality pools** take the vision FFN (``A``) into the vision pool and the language FFN
  (``B``) into the language pool; the equalities above hold per modality.
- **a shared pool** (``moe_multiway="shared"``) gets the vision FFN in its first ceil(E/2) experts
  and the language FFN in the rest; tokens are routed by content, so the dense function is *not*
  preserved (a token may reach the other modality's copy).
- **MH-MoE** (``heads = h > 1``): experts act on d/h-wide sub-tokens, so a d-wide dense FFN cannot be
  copied into them; the head and merge projections are set to the identity (the layer is then
  exactly "split into h sub-tokens -> experts -> concatenate"), the experts keep their fresh
  initialisation, and the dense function is not preserved.
"""

from __future__ import annotations

import argparse
import math
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from vlmoe.io import torch_load
from vlmoe.layers import POSITION_OFFSET, resample_vision_positions
from vlmoe.moe import GroupedExperts, MoE

from .backbone import VLMoE, create_model
from .config import VLMoEConfig
from .convert import StateDict, beit3_to_vlmoe, detect_format, legacy_head_keys, strip_prefix, timm_vit_to_vlmoe

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


# ---------------------------------------------------------------------------------------------- report
def _collapse(keys: list[str]) -> list[str]:
    """Group keys that differ only in the block index: ``blocks.*.attn.qkv.text.weight (x12)``."""
    groups: dict[str, int] = defaultdict(int)
    for k in keys:
        groups[re.sub(r"(^|\.)(blocks|layers)\.\d+\.", r"\1\2.*.", k)] += 1
    return [g if n == 1 else f"{g} (x{n})" for g, n in groups.items()]


@dataclass
class LoadReport:
    """What loading a checkpoint did.

    Attributes:
        source: where the weights came from.
        format: ``beit3``, ``timm`` or ``vlmoe``.
        missing: model parameters the checkpoint did not provide (left at their initialisation).
        unexpected: checkpoint keys (source names) with no place in the model.
        fresh: parameters initialised fresh by design (routers, MH-MoE projections) when upcycling.
        upcycled: MoE layers filled from a dense FFN, with a note.
        resized: position tables resized or truncated, with a note.
        skipped: model parameters this checkpoint format cannot hold (the text branch for a timm
            ViT), left at their initialisation and not counted against the load.
        branch_skipped: checkpoint keys of the branch a single-modality model does not build.
        head_mismatch: head tensors of another shape than the model's (left at init).
        loaded_numel / expected_numel: parameter elements loaded / that the checkpoint was expected
            to provide (every parameter that is neither fresh by design nor skipped).
    """

    source: str
    format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    upcycled: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    branch_skipped: list[str] = field(default_factory=list)
    head_mismatch: list[str] = field(default_factory=list)
    loaded_numel: int = 0
    expected_numel: int = 0

    @property
    def share(self) -> float:
        """Fraction of the expected parameter elements the checkpoint provided (1.0 if none expected)."""
        return self.loaded_numel / self.expected_numel if self.expected_numel else 1.0

    @property
    def complete(self) -> bool:
        """Every parameter loaded (or fresh by design) and every checkpoint key used."""
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        lines = [f"loaded {self.format} checkpoint {self.source}: {self.share:.1%} of the expected weights"]
        for title, items in (
            ("resized", self.resized),
            ("upcycled (dense FFN -> experts)", self.upcycled),
            ("initialised fresh by design", _collapse(self.fresh)),
            ("missing from the checkpoint (left at init)", _collapse(self.missing)),
            ("unused checkpoint keys", _collapse(self.unexpected)),
            (f"not in a {self.format} checkpoint (left at init)", _collapse(self.skipped)),
            ("keys of a branch this single-modality model does not have (skipped)", _collapse(self.branch_skipped)),
            ("head tensors of another shape", self.head_mismatch),
        ):
            if items:
                lines.append(f"  {title}: {len(items)}")
                lines += [f"    {x}" for x in items]
        if self.complete:
            lines.append("  every parameter loaded")
        return "\n".join(lines)


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


def _moe_target(model: VLMoE, layer: int, way: str) -> tuple[MoE, list[int] | None] | None:
    """The MoE (and expert subset) a dense FFN ``blocks.layer.mlp.way`` upcycles into, if any."""
    if layer >= len(model.blocks):
        return None
    ffn = model.blocks[layer].mlp
    if isinstance(ffn.shared, MoE):
        if way == "vl":
            return None
        E = ffn.shared.num_experts
        half = (E + 1) // 2
        return ffn.shared, (list(range(half)) if way == "vision" else list(range(half, E)) or [E - 1])
    target = getattr(ffn, way, None)
    return (target, None) if isinstance(target, MoE) else None


@torch.no_grad()
def _upcycle(
    model: VLMoE,
    layer: int,
    way: str,
    parts: dict[str, Tensor],
    noise: float,
    report: LoadReport,
    source: str,
) -> set[str]:
    moe, experts = _moe_target(model, layer, way)
    prefix = f"blocks.{layer}.mlp.{'shared' if isinstance(model.blocks[layer].mlp.shared, MoE) else way}"
    needed = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    if not needed <= set(parts):
        raise ValueError(
            f"{source}: the dense FFN blocks.{layer}.mlp.{way} is incomplete (has {sorted(parts)}); cannot upcycle"
        )
    ex = moe.experts
    if not isinstance(ex, GroupedExperts):
        raise ValueError(
            f"{source}: cannot upcycle blocks.{layer}.mlp.{way} into heterogeneous experts "
            "(MoEConfig.expert_sizes): their widths differ from the dense FFN's"
        )
    # routers (and Stratified MoE pass norms) start fresh; experts and projections are set below
    for name, _ in moe.named_parameters():
        if not name.startswith(("experts.", "head_proj.", "merge_proj.")) and f"{prefix}.{name}" not in report.fresh:
            report.fresh.append(f"{prefix}.{name}")
    covered = set()
    if moe.head_proj is not None:
        # identity projections make "split into h sub-tokens -> experts -> concatenate" exact
        eye = torch.eye(moe.dim, dtype=moe.head_proj.weight.dtype, device=moe.head_proj.weight.device)
        for pname in ("head_proj", "merge_proj"):
            proj = getattr(moe, pname)
            proj.weight.copy_(eye)
            proj.bias.zero_()
            covered |= {f"{prefix}.{pname}.weight", f"{prefix}.{pname}.bias"}
    if moe.config.heads > 1:
        # MH-MoE: experts see d/h-wide sub-tokens; the d-wide dense FFN does not fit into them.
        report.upcycled.append(
            f"{prefix}: MH-MoE (h={moe.config.heads}) head/merge projections set to identity; experts keep "
            "their initialisation (d/h-wide experts cannot hold the d-wide dense FFN)"
        )
        report.fresh += [
            f"{prefix}.experts.{n}" for n, _ in ex.named_parameters() if f"{prefix}.experts.{n}" not in report.fresh
        ]
        return covered
    has_ln = "norm.weight" in parts
    if has_ln != (ex.ln_weight is not None):
        raise ValueError(
            f"{source}: cannot upcycle blocks.{layer}.mlp.{way}: the dense FFN "
            f"{'has' if has_ln else 'has no'} sub-LN but the experts "
            f"{'have' if ex.ln_weight is not None else 'have no'}"
            " (set MoEConfig.ffn_layernorm to match VLMoEConfig.subln)"
        )
    if parts["fc1.weight"].shape != (ex.ffn_dim, ex.dim):
        raise ValueError(
            f"{source}: cannot upcycle blocks.{layer}.mlp.{way}: dense fc1.weight has shape "
            f"{tuple(parts['fc1.weight'].shape)} but the experts are {ex.dim} -> {ex.ffn_dim} "
            "(MoEConfig.ffn_dim)"
        )
    fc1 = SimpleNamespace(weight=parts["fc1.weight"], bias=parts["fc1.bias"])
    fc2 = SimpleNamespace(weight=parts["fc2.weight"], bias=parts["fc2.bias"])
    ln = SimpleNamespace(weight=parts["norm.weight"], bias=parts["norm.bias"]) if has_ln else None
    ex.load_dense(fc1, fc2, ln, experts=experts, noise_std=noise)
    n = ex.num_experts if experts is None else len(experts)
    which = "" if experts is None else f" (experts {experts[0]}-{experts[-1]})"
    note = f", noise std {noise}" if noise else ""
    report.upcycled.append(f"{prefix}{which}: {n} expert(s) <- dense {way} FFN{note}")
    return covered | {f"{prefix}.experts.{n}" for n, _ in ex.named_parameters()}


def load_checkpoint(
    model: nn.Module,
    src: str | Path | dict[str, Any],
    *,
    format: str = "auto",
    key: str | None = None,
    strict: bool = False,
    upcycle_noise: float = 0.0,
    allow_partial: bool = False,
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
    """
    sd, where = read_state_dict(src, key)
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


def load_beit3(
    src: str | Path | dict[str, Any],
    config: str | VLMoEConfig | None = None,
    *,
    strict: bool = False,
    upcycle_noise: float = 0.0,
    key: str | None = None,
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
        overrides: config fields to change (``img_size=384``, ``modalities=["vision"]`` ...).

    Returns:
        ``(model, report)``.
    """
    sd, where = read_state_dict(src, key)
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
    report = load_checkpoint(model, sd, format="beit3", strict=strict, upcycle_noise=upcycle_noise)
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
    if config is None:
        config = timm_vit_config(sd, **overrides)
        overrides = {}
    model = VLMoE(resolve_config(config, overrides))
    report = load_checkpoint(model, sd, format="timm", strict=False)
    report.source = where
    if strict and not report.complete:
        raise ValueError(str(report) + "\n(strict=True)")
    return model, report


def _is_text_param(key: str) -> bool:
    return key.startswith("text_embed.") or ".text." in key


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
