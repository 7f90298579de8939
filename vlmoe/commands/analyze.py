"""``vlmoe analyze routing``: routing statistics and pictures of one or more models on the same data.

    vlmoe analyze routing --model runs/pretrain/demo_dense/checkpoints/last.ckpt \\
        --model runs/pretrain/demo_xmoe/checkpoints/last.ckpt --model runs/pretrain/demo/checkpoints/last.ckpt \\
        --name Dense --name X-MoE --name MH-MoE --out docs/routing

Models are ``vlmoe export`` folders or training checkpoints; the data is the demo's Karpathy test
split (easy-vqa test images with one caption each: images alone, captions alone and the pairs), at
each model's own image size and with its own tokenizer. Writes ``report.json``, PNG pictures and
``index.html`` into ``--out`` (refusing a non-empty folder unless ``--overwrite``) and prints the
activation ratio per model and stream. ``--group-by`` adds the expert choice by group: per MoE layer,
each group's share of assignments per expert and the mutual information between group and expert,
for the demo's shape classes (images alone) or its VQA questions' answer / question types (pairs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmoe analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("routing", help="expert load, activation ratio, entropy per layer; pictures")
    r.add_argument("--model", action="append", required=True, help="a model folder or .ckpt (repeatable)")
    r.add_argument("--name", action="append", help="a display name per --model (default: the path)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--batches", type=int, default=4)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--samples", type=int, default=4, help="images in the patch -> expert pictures")
    r.add_argument("--tau", type=float, default=0.1, help="activation threshold (share of the uniform load)")
    r.add_argument("--group-by", default="auto", choices=["auto", "class", "answer_type", "question_type", "none"],
                   help="expert choice by group: the demo's shape classes (images), or the VQA questions' answer "
                        "or question type (pairs); auto: answer_type for VQA models, class otherwise")
    r.add_argument("--demo-dir", help="where the demo data is (default $VLMOE_DATA/demo)")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    names = args.name or []
    if names and len(names) != len(args.model):
        raise ValueError(f"{len(names)} --name for {len(args.model)} --model; give one per model or none")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} is not empty; choose another folder or add --overwrite")
    import torch

    from vlmoe.analysis import (
        demo_batches,
        expert_choice_by_group,
        grouped_demo_batches,
        patch_expert_maps,
        plot_choice_by_group,
        plot_patch_maps,
        routing_report,
        write_routing_report,
    )
    from vlmoe.inference import load

    reports, figures = {}, []
    for i, path in enumerate(args.model):
        pred = load(path)
        pre = pred.preprocess
        tok = pred.tokenizer if pre.tokenizer else None
        batches = demo_batches(pre.image_size, tok, pre.max_len, args.batches, args.batch_size,
                               (pre.mean, pre.std), args.demo_dir)
        name = names[i] if names else str(path)
        reports[name] = routing_report(pred.model, batches, args.tau)
        sample = batches[0]["image"][: args.samples]
        maps = patch_expert_maps(pred.model, sample)
        if maps:  # the patch -> expert map of a few images (denormalised for display)
            # (3,) -> (3, 1, 1) each, broadcast over sample (n, 3, S, S)
            mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
            experts = {n: len(reports[name]["streams"]["vision"][n]["counts"]) for n in maps}
            fig = plot_patch_maps(sample * std + mean, maps, experts, f"{name}: first-choice expert per image patch")
            slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
            figures.append((fig, f"patch_experts_{slug}.png",
                            f"{name}: each image patch coloured by its first-choice expert, per vision MoE layer"
                            + (" and sub-token head" if any(m.shape[1] > 1 for m in maps.values()) else "")))
        group_by = args.group_by
        if group_by == "auto":
            spec = pred.spec()
            group_by = spec.routing_groups if spec is not None else "class"
        if group_by != "none" and reports[name]["streams"]:
            gb, groups = grouped_demo_batches(group_by, pre.image_size, tok, pre.max_len, args.batches,
                                              args.batch_size, (pre.mean, pre.std), args.demo_dir)
            choice = expert_choice_by_group(pred.model, gb, groups)
            reports[name]["by_group"] = {"group_by": group_by, **choice}
            slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
            what = {"class": "image class (images alone)", "answer_type": "answer type (image + question)",
                    "question_type": "question type (image + question)"}[group_by]
            figures.append((plot_choice_by_group(choice, f"{name}: expert choice by {what}"),
                            f"choice_by_{group_by}_{slug}.png",
                            f"{name}: share of each group's routed assignments per expert, per MoE layer, by {what}; "
                            "MI = mutual information between group and expert (bits)"))
    write_routing_report(reports, out, overwrite=True, extra_figures=figures)
    for name, rep in reports.items():
        cells = ", ".join(f"{s} {v['activation_ratio']:.2f} (entropy {v['load_entropy']:.2f})"
                          for s, v in rep["summary"].items())
        print(f"{name}: activation ratio {cells}" if cells else f"{name}: no MoE layers")
    print(f"-> {out / 'index.html'}")
    return reports
