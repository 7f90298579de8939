"""Self-describing model folders: ``model.safetensors`` + ``config.json`` (``vlmoe export``).

    save_pretrained(model, "out/vqa", preprocess={...})   # out/vqa/{model.safetensors, config.json, ...}
    model = load_pretrained("out/vqa")                    # the same task model, heads included
    model.preprocess                                      # {"image_size": 480, "mean": [...], ...}

``config.json`` (in the spirit of timm's ``pretrained_cfg``)::

    {"format": "vlmoe", "version": 2,
     "model": {...VLMoEConfig...},                    # the backbone
     "task": {"type": "vqa", "answers": [...]} | null,  # what build_task_model rebuilds (heads, labels)
     "preprocess": {"image_size": 480, "mean": [...], "std": [...], "interpolation": "bicubic",
                    "resize": "squash", "tokenizer": "clip", "max_len": 64} | null}

A tokenizer given as a file (SentencePiece model, ``tokenizer.json``) is copied into the folder (with
no broader permissions than the file has) and named relative to it, so a folder needs nothing else to
predict. A folder's tokenizer file must lie inside it (its real path, links followed): its config
never makes vlmoe read or copy a file outside the folder. Folders in vlmoe's older format (a flat model
config, pretraining heads listed under ``heads``) load too.

    vlmoe export beit3_base_patch16_224.pth out/beit3_base                 # official BEiT-3 -> vlmoe
    vlmoe export beit3_base_patch16_224.pth out/xmoe8 --config base_xmoe8  # ... upcycled to MoE
    vlmoe export out/beit3_base beit3_base.safetensors --to beit3           # vlmoe -> BEiT-3 layout
    vlmoe export runs/pretrain/demo/checkpoints/last.ckpt out/demo          # a training checkpoint

Files are written atomically (a temporary file renamed into place) and existing files are never
replaced unless ``overwrite`` is asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vlmoe.io import atomic_torch_save, atomic_write, atomic_write_text

from .backbone import VLMoE
from .config import LEGACY_HEAD_FIELDS, VLMoEConfig
from .convert import vlmoe_to_beit3
from .report import LoadReport
from .task_models import TaskModel

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ExportInfo",
    "export_beit3",
    "legacy_task",
    "load_pretrained",
    "read_export",
    "save_pretrained",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 2
# what vlmoe.data.build_tokenizer reads as a file; any other value without a path in it is a name (clip)
TOKENIZER_FILE_SUFFIXES = (".json", ".spm", ".model")


def _state_dict(model: nn.Module) -> dict[str, Any]:
    # safetensors refuses views that share storage; every parameter is its own contiguous tensor
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _backbone(model: nn.Module) -> VLMoE:
    return model.backbone if isinstance(model, TaskModel) else model


def _bundle_tokenizer(preprocess: dict[str, Any] | None, out: Path, overwrite: bool) -> dict[str, Any] | None:
    """Copy a tokenizer *file* into the folder and name it relative to it (names like ``clip`` stay)."""
    if not preprocess or not preprocess.get("tokenizer"):
        return preprocess
    tok = Path(str(preprocess["tokenizer"])).expanduser()
    if not tok.is_file():
        return preprocess
    if not tok.name.lower().endswith(TOKENIZER_FILE_SUFFIXES):
        raise ValueError(f"preprocess.tokenizer {str(tok)!r} is not a tokenizer file "
                         f"({' / '.join(TOKENIZER_FILE_SUFFIXES)}); it is not copied into {out}")
    target = out / tok.name
    if target.resolve() != tok.resolve():
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
        mode = stat.S_IMODE(tok.stat().st_mode)
        with open(tok, "rb") as src, atomic_write(target, permissions=mode) as f:
            shutil.copyfileobj(src, f)
    return {**preprocess, "tokenizer": tok.name}


def _tokenizer_in_folder(value: Any, folder: Path, where: str) -> str:
    """A model folder's ``preprocess.tokenizer``: a name (``clip``) as it is, a file as its real path, which
    must lie inside ``folder`` (links followed); anything else is a ValueError naming ``where``."""
    name = str(value)
    if not ("/" in name or os.sep in name or name.startswith("~") or name.lower().endswith(TOKENIZER_FILE_SUFFIXES)):
        return name  # vlmoe.data.build_tokenizer knows it or refuses it without reading a file
    path = (folder / name).resolve()
    if name.startswith("~") or not path.is_relative_to(folder.resolve()):
        raise ValueError(f"{where}: preprocess.tokenizer {name!r} is outside the model folder {folder} "
                         "(a folder's files must be inside it; or name a built-in tokenizer such as 'clip')")
    if not path.is_file():
        raise ValueError(f"{where}: preprocess.tokenizer {name!r} is not a file in the model folder {folder}")
    return str(path)


def save_pretrained(
    model: nn.Module,
    out_dir: str | Path,
    *,
    preprocess: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a self-describing model folder: ``model.safetensors`` + ``config.json`` (+ tokenizer file).

    Args:
        model: a backbone (:class:`VLMoE`) or a task model (its task block is written too).
        out_dir: target directory (created if needed).
        preprocess: how inputs are prepared (image size, normalisation, resize, tokenizer, text
            length); for a model trained with vlmoe the training run's, see
            :func:`vlmoe.data.preprocess_config`.
        overwrite: replace existing files.

    Returns:
        The directory.
    """
    from safetensors.torch import save

    out = Path(out_dir)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if (out / name).exists() and not overwrite:
            raise FileExistsError(f"{out / name} exists; pass overwrite=True (--overwrite) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "format": "vlmoe",
        "version": FORMAT_VERSION,
        "model": _backbone(model).config.to_dict(),
        "task": model.task_config() if isinstance(model, TaskModel) else None,
        "preprocess": _bundle_tokenizer(preprocess, out, overwrite),
    }
    config_text = json.dumps(config, indent=2)
    with atomic_write(out / WEIGHTS_NAME, overwrite=overwrite) as f:
        f.write(save(_state_dict(model), metadata={"format": "pt", "vlmoe_config": config_text}))
    atomic_write_text(out / CONFIG_NAME, config_text + "\n", overwrite=overwrite)
    return out


def legacy_task(config: dict[str, Any]) -> dict[str, Any] | None:
    """The task block implied by a config of an earlier vlmoe version (pretraining heads inside the
    backbone config: ``heads`` = some of ``mlm``, ``mim``, ``pooler``, and ``codebook_size``)."""
    heads = config.get("heads") or []
    if not heads:
        return None
    return {
        "type": "pretraining",
        "codebook_size": int(config.get("codebook_size", 8192)) if "mim" in heads else None,
        "pooler": "pooler" in heads,
    }


@dataclass
class ExportInfo:
    """What a model folder holds: the backbone config, the task block, the preprocessing, the weights."""

    config: VLMoEConfig
    task: dict[str, Any] | None
    preprocess: dict[str, Any] | None
    weights: Path

    @classmethod
    def from_dict(cls, data: dict[str, Any], weights: Path, where: str) -> ExportInfo:
        if isinstance(data.get("model"), dict):  # version 2
            model, task, pre = data["model"], data.get("task"), data.get("preprocess")
        else:  # a flat model config (version 1)
            model, task, pre = data, legacy_task(data), None
        if not task and any(k in model for k in LEGACY_HEAD_FIELDS):
            task = legacy_task(model)
        try:
            config = VLMoEConfig.from_dict(model)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        if pre and pre.get("tokenizer"):
            pre = {**pre, "tokenizer": _tokenizer_in_folder(pre["tokenizer"], weights.parent, where)}
        return cls(config, task or None, pre or None, weights)


def read_export(path: str | Path) -> ExportInfo:
    """Read a model folder's description (``config.json``, else the config in the weights' metadata).

    Args:
        path: the folder, or its ``model.safetensors``.
    """
    from safetensors import safe_open

    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.exists():
        raise FileNotFoundError(f"{weights} does not exist" + ("" if path.exists() else f" ({path} neither)"))
    config_file = weights.parent / CONFIG_NAME
    if config_file.exists():
        try:
            data = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON: {e}") from None
        where = str(config_file)
    else:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
        if "vlmoe_config" not in meta:
            raise ValueError(f"{weights}: no {CONFIG_NAME} next to it and no vlmoe_config in its metadata")
        data, where = json.loads(meta["vlmoe_config"]), f"{weights} (metadata)"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object")
    return ExportInfo.from_dict(data, weights, where)


def load_pretrained(path: str | Path, *, strict: bool = True, **overrides: Any) -> nn.Module:
    """Load a model folder written by :func:`save_pretrained` (or an earlier vlmoe version).

    Returns the task model the folder describes (the backbone alone when it has no task), with the
    folder's preprocessing as ``model.preprocess`` (a dict, or None). :func:`vlmoe.models.load` is the
    same for every kind of checkpoint.

    Args:
        path: the folder, or its ``model.safetensors``.
        strict: raise unless every parameter is in the file and every tensor is used.
        overrides: backbone config fields to change (e.g. ``img_size=384`` resizes the positions).
    """
    from .loading import load, read_source

    source = read_source(path)
    if source.kind != "export":
        raise ValueError(f"{path}: not a model folder (a {source.kind} checkpoint; use vlmoe.models.load)")
    model, _, preprocess = load(source, strict=strict, **overrides)
    model.preprocess = preprocess
    return model


def export_beit3(model: nn.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a dense decoupled model (backbone or task model) in the BEiT-3 key layout.

    ``.safetensors`` paths get a safetensors file, others a ``torch.save({'model': sd})`` file.
    """
    path = Path(path)
    sd = vlmoe_to_beit3(_state_dict(model))
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        with atomic_write(path, overwrite=overwrite) as f:
            f.write(save(sd, metadata={"format": "pt"}))
    else:
        atomic_torch_save({"model": sd}, path, overwrite=overwrite)
    return path


def convert(args: Any) -> tuple[nn.Module, LoadReport | None, dict[str, Any] | None]:
    """Build and fill the model ``vlmoe export``'s arguments describe (``args.set``: the config
    overrides). Returns ``(model, load report or None, preprocessing or None)``."""
    from .loading import load

    return load(args.src, args.config, strict=args.strict, upcycle_noise=args.upcycle_noise, key=args.key,
                format=args.format, **dict(args.set))
