"""``vlmoe export``: a checkpoint (BEiT-3, timm ViT, vlmoe training or export) -> a vlmoe export
(``model.safetensors`` + ``config.json``), or a vlmoe model -> the BEiT-3 layout.

    vlmoe export beit3_base_patch16_224.pth out/beit3_base                 # official BEiT-3 -> vlmoe
    vlmoe export beit3_base_patch16_224.pth out/xmoe8 --config base_xmoe8  # ... upcycled to MoE
    vlmoe export out/beit3_base beit3_base.safetensors --to beit3           # vlmoe -> BEiT-3 layout
    vlmoe export runs/pretrain/demo/checkpoints/last.ckpt out/demo          # a `vlmoe pretrain` checkpoint
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _check_tokenizer_file(preprocess: dict[str, Any] | None, out: str) -> None:
    """The tokenizer file a checkpoint names is copied into the export: it must load as a tokenizer, so a
    crafted checkpoint cannot have some other local file copied."""
    tok = (preprocess or {}).get("tokenizer")
    if not tok or not Path(str(tok)).expanduser().is_file():
        return  # a built-in name (clip), or a file the export does not copy
    from vlmoe.data import build_tokenizer

    try:
        build_tokenizer(str(tok))
    except ImportError as e:  # the library that reads this kind of tokenizer is missing
        raise ValueError(f"preprocess.tokenizer {tok}: cannot check that it is a tokenizer ({e}); "
                         f"it is not copied into {out}") from None
    except Exception as e:  # SentencePiece and tokenizers raise their own types
        raise ValueError(f"preprocess.tokenizer {tok}: not a tokenizer file ({type(e).__name__}); "
                         f"it is not copied into {out}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmoe export",
        description="Convert a BEiT-3 / timm ViT / vlmoe checkpoint into a vlmoe export "
        "(model.safetensors + config.json), or a vlmoe model into the BEiT-3 layout.",
    )
    p.add_argument("src", help="checkpoint file (.pth/.pt/.bin/.ckpt/.safetensors) or a vlmoe export directory")
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


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    args.set = _parse_set(args.set)
    from vlmoe.models.export import convert, export_beit3, save_pretrained

    model, report, preprocess = convert(args)
    if report is not None:
        print(report)
    if args.to == "beit3":
        out = export_beit3(model, args.out, overwrite=args.overwrite)
    else:
        _check_tokenizer_file(preprocess, args.out)
        out = save_pretrained(model, args.out, preprocess=preprocess, overwrite=args.overwrite)
    n = sum(p.numel() for p in model.parameters())
    task = getattr(model, "task", "") or "backbone"
    print(f"wrote {out} ({model.config.name}, {task}, {n / 1e6:.1f}M parameters, layout {args.to})")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
