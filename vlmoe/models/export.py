"""Export / import of a model alone: ``model.safetensors`` + ``config.json``; the ``vlmoe export`` command.

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

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .backbone import VLMoE
from .checkpoint import (
    LoadReport,
    load_beit3,
    load_checkpoint,
    load_timm_vit,
    read_state_dict,
    resolve_config,
)
from .config import VLMoEConfig
from .convert import detect_format, strip_prefix, vlmoe_to_beit3

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _atomic_write(path: Path, write: Callable[[str], None], overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    from safetensors.torch import save_file

    out = Path(out_dir)
    config_text = model.config.to_json()
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if (out / name).exists() and not overwrite:
            raise FileExistsError(f"{out / name} exists; pass overwrite=True (--overwrite) to replace it")
    sd = _state_dict(model)
    meta = {"format": "pt", "vlmoe_config": config_text}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(sd, p, metadata=meta), overwrite)
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(config_text + "\n"), overwrite)
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
    import torch

    path = Path(path)
    sd = vlmoe_to_beit3(_state_dict(model))
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        _atomic_write(path, lambda p: save_file(sd, p, metadata={"format": "pt"}), overwrite)
    else:
        _atomic_write(path, lambda p: torch.save({"model": sd}, p), overwrite)
    return path


# ---------------------------------------------------------------------------------------------- CLI
def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"vlmoe export: --set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmoe export",
        description="Convert a BEiT-3 / timm ViT / vlmoe checkpoint into a vlmoe export "
        "(model.safetensors + config.json), or a vlmoe model into the BEiT-3 layout.",
    )
    p.add_argument("src", help="checkpoint file (.pth/.pt/.bin/.safetensors) or a vlmoe export directory")
    p.add_argument("out", help="output directory (--to vlmoe) or file (--to beit3)")
    p.add_argument("--format", default="auto", choices=["auto", "beit3", "timm", "vlmoe"], help="SRC layout")
    p.add_argument(
        "--config",
        default=None,
        help="preset name or YAML/JSON config of the model to build (default: read off the checkpoint)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeat)")
    p.add_argument("--key", default=None, help="container key of SRC (default: model / module / state_dict)")
    p.add_argument("--to", default="vlmoe", choices=["vlmoe", "beit3"], help="output layout")
    p.add_argument("--upcycle-noise", type=float, default=0.0, help="noise std on experts copied from dense")
    p.add_argument("--strict", action="store_true", help="fail unless the checkpoint fits the model exactly")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def _training_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(backbone state dict, config dict)`` of a vlmoe training checkpoint (``vlmoe pretrain``'s
    ``.ckpt``: the task's ``state_dict`` with the backbone under ``model.`` and the model config under
    ``vlmoe_config``), or None for any other file."""
    if not path.is_file() or path.suffix != ".ckpt":
        return None
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from None
    if not isinstance(obj, dict) or "vlmoe_config" not in obj or "state_dict" not in obj:
        return None
    sd = {k[len("model.") :]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
    return sd, obj["vlmoe_config"]


def convert(args: argparse.Namespace) -> tuple[VLMoE, LoadReport | None]:
    """Build and fill the model the command line describes."""
    overrides = _parse_set(args.set)
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
            raise SystemExit("vlmoe export: a vlmoe state dict needs --config (or a directory with config.json)")
        model = VLMoE(resolve_config(args.config, overrides))
        noise = args.upcycle_noise
        report = load_checkpoint(model, sd, format="vlmoe", strict=args.strict, upcycle_noise=noise)
    report.source = where
    return model, report


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    try:
        model, report = convert(args)
        if report is not None:
            print(report)
        if args.to == "beit3":
            out = export_beit3(model, args.out, overwrite=args.overwrite)
        else:
            out = save_pretrained(model, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        raise SystemExit(f"vlmoe export: {e}") from None
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({model.config.name}, {n / 1e6:.1f}M parameters, layout {args.to})")
    return out


if __name__ == "__main__":
    main()
