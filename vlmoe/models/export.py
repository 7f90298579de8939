"""Export / import of a model alone: ``model.safetensors`` + ``config.json`` (``vlmoe export``).

    save_pretrained(model, "out/base_xmoe8")        # out/base_xmoe8/{model.safetensors, config.json}
    model = load_pretrained("out/base_xmoe8")

    vlmoe export beit3_base_patch16_224.pth out/beit3_base                 # official BEiT-3 -> vlmoe
    vlmoe export beit3_base_patch16_224.pth out/xmoe8 --config base_xmoe8  # ... upcycled to MoE
    vlmoe export out/beit3_base beit3_base.safetensors --to beit3           # vlmoe -> BEiT-3 layout
    vlmoe export runs/pretrain/demo/checkpoints/last.ckpt out/demo          # a `vlmoe pretrain` checkpoint

Files are written atomically (a temporary file renamed into place) and existing files are never
replaced unless ``overwrite`` is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmoe.io import atomic_torch_save, atomic_write, atomic_write_text, torch_load

from .backbone import VLMoE
from .checkpoint import (
    LoadReport,
    is_training_checkpoint,
    load_beit3,
    load_checkpoint,
    load_timm_vit,
    read_state_dict,
    resolve_config,
    task_state_dict,
)
from .config import VLMoEConfig
from .convert import detect_format, strip_prefix, vlmoe_to_beit3

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _state_dict(model: VLMoE) -> dict[str, Any]:
    # safetensors refuses views that share storage; every parameter is its own contiguous tensor
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_pretrained(model: VLMoE, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir``.

    Args:
        model: the model.
        out_dir: target directory (created if needed).
        overwrite: replace existing files.

    Returns:
        The directory.
    """
    from safetensors.torch import save

    out = Path(out_dir)
    config_text = model.config.to_json()
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if (out / name).exists() and not overwrite:
            raise FileExistsError(f"{out / name} exists; pass overwrite=True (--overwrite) to replace it")
    sd = _state_dict(model)
    meta = {"format": "pt", "vlmoe_config": config_text}
    with atomic_write(out / WEIGHTS_NAME, overwrite=overwrite) as f:
        f.write(save(sd, metadata=meta))
    atomic_write_text(out / CONFIG_NAME, config_text + "\n", overwrite=overwrite)
    return out


def load_pretrained(path: str | Path, *, strict: bool = True, **overrides: Any) -> VLMoE:
    """Load a model written by :func:`save_pretrained`.

    Args:
        path: the directory, or its ``model.safetensors`` (``config.json`` next to it, else the
            config stored in the file's metadata).
        strict: raise unless every parameter is in the file and every tensor is used.
        overrides: config fields to change (e.g. ``img_size=384`` resizes the vision positions).
    """
    from safetensors import safe_open

    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.exists():
        raise FileNotFoundError(f"{weights} does not exist")
    config_file = weights.parent / CONFIG_NAME
    if config_file.exists():
        config = VLMoEConfig.from_file(config_file)
    else:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
        if "vlmoe_config" not in meta:
            raise ValueError(f"{weights}: no {CONFIG_NAME} next to it and no vlmoe_config in its metadata")
        config = VLMoEConfig.from_dict(json.loads(meta["vlmoe_config"]))
    model = VLMoE(config.replace(**overrides) if overrides else config)
    load_checkpoint(model, str(weights), format="vlmoe", strict=strict)
    return model


def export_beit3(model: VLMoE, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a dense decoupled model in the BEiT-3 key layout.

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


def _training_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(model state dict, config dict)`` of a vlmoe training checkpoint (the ``.ckpt`` of ``vlmoe
    pretrain``: the task's ``state_dict`` with the model under ``model.`` and its config under
    ``vlmoe_config``), or None for any other file."""
    if not path.is_file() or path.suffix != ".ckpt":
        return None
    obj = torch_load(path)
    if not is_training_checkpoint(obj) or "vlmoe_config" not in obj:
        return None
    return task_state_dict(obj), obj["vlmoe_config"]


def convert(args: Any) -> tuple[VLMoE, LoadReport | None]:
    """Build and fill the model ``vlmoe export``'s arguments describe (``args.set``: the config overrides)."""
    overrides = dict(args.set)
    src = Path(args.src)
    if src.is_dir() and (src / CONFIG_NAME).exists() and args.config is None:
        return load_pretrained(src, strict=args.strict, **overrides), None
    trained = _training_checkpoint(src)
    if trained is not None:
        sd, config = trained
        base = VLMoEConfig.from_dict(config) if args.config is None else args.config
        model = VLMoE(resolve_config(base, overrides))
        report = load_checkpoint(model, sd, format="vlmoe", strict=args.strict, upcycle_noise=args.upcycle_noise)
        report.source = str(src)
        return model, report
    sd, where = read_state_dict(src, args.key)
    fmt = detect_format(strip_prefix(sd, ("module.",))) if args.format == "auto" else args.format
    if fmt == "beit3":
        model, report = load_beit3(sd, args.config, strict=args.strict, upcycle_noise=args.upcycle_noise, **overrides)
    elif fmt == "timm":
        model, report = load_timm_vit(sd, args.config, strict=args.strict, **overrides)
    else:
        if args.config is None:
            raise ValueError("a vlmoe state dict needs --config (or a directory with config.json)")
        model = VLMoE(resolve_config(args.config, overrides))
        noise = args.upcycle_noise
        report = load_checkpoint(model, sd, format="vlmoe", strict=args.strict, upcycle_noise=noise)
    report.source = where
    return model, report
