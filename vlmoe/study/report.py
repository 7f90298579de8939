"""The study's report: ``study.md`` (per task mean +- std over seeds, the t-test against Dense),
``summary.json`` and ``study.png`` (see :mod:`vlmoe.study`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .jobs import METRICS, REPORTED, TASKS, Job, read_result
from .stats import aggregate
from .variants import VARIANTS, flop_table

__all__ = ["write_report"]


def _fmt(row: dict[str, Any], scale: float) -> str:
    return f"{row['mean'] * scale:.2f} ± {row['std'] * scale:.2f}"


# metric -> (shown name, scale)
_SHOW = {"accuracy": ("accuracy (%)", 100), "top1": ("top-1 (%)", 100), "CIDEr": ("CIDEr", 100),
         "Bleu_4": ("BLEU-4", 100), "bbox_AP": ("box AP", 100), "segm_AP": ("mask AP", 100),
         "average_score": ("mean R@1/5/10 (%)", 100), "val_loss": ("val loss", 1),
         "val_mlm_text": ("val MLM, texts", 1), "val_mlm_pair": ("val MLM, pairs", 1),
         "val_mim_image": ("val MIM, images", 1), "val_mim_pair": ("val MIM, pairs", 1),
         "samples_per_s": ("samples/s", 1), "activation_ratio": ("activation ratio", 1),
         "load_entropy": ("load entropy", 1)}


def write_report(out: Path, jobs: Sequence[Job], variants: Sequence[str]) -> dict[str, Any]:
    """``summary.json``, ``study.md`` and ``study.png`` from the stored results."""
    from vlmoe.io import atomic_write_text

    stored = {str(j): r for j in jobs if (r := read_result(j)) is not None}
    results = list(stored.values())
    agg = aggregate(results, reference="dense" if "dense" in variants else variants[0])
    flops = flop_table(variants)
    seeds = sorted({r["seed"] for r in results})
    labels = {v: VARIANTS[v][0] for v in variants}
    lines = [f"Seeds: {', '.join(map(str, seeds)) or 'none yet'}; {len(results)} of {len(jobs)} jobs done. "
             "Mean ± sample standard deviation over seeds; Welch's two-sided t-test of each variant against "
             f"{labels.get('dense', variants[0])} (p < 0.05 = resolved, marked *).", "",
             "| variant | FFN FLOPs / token (per block) | activated FFN params / token |", "|---|---:|---:|"]
    for v in variants:
        lines.append(f"| {labels[v]} | {flops[v]['ffn_flops_per_token']:,.0f} | "
                     f"{flops[v]['activated_ffn_params_per_token']:,.0f} |")
    lines.append("")
    header = "| task | metric | " + " | ".join(labels[v] for v in variants) + " |"
    lines += [header, "|---|---|" + "---:|" * len(variants)]
    for task in TASKS:
        if task not in agg:
            continue
        for metric in REPORTED[task]:
            rows = agg[task].get(metric)
            if not rows:
                continue
            name, scale = _SHOW.get(metric, (metric, 100 if task not in ("pretrain", "routing") else 1))
            cells = []
            for v in variants:
                r = rows.get(v)
                if r is None:
                    cells.append("-")
                    continue
                cell = _fmt(r, scale) + (f" (n={r['n']})" if r["n"] != len(seeds) else "")
                vs = r.get("vs_reference")
                if vs is not None:
                    cell += f" ({'*' if vs['resolved'] else ''}p={vs['p']:.2f})" if not math.isnan(vs["p"]) else ""
                cells.append(cell)
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    per_layer = _routing_per_layer(results, variants)
    if per_layer:
        layers = sorted({name for v in per_layer.values() for name in v})
        lines += ["", "Routing per MoE layer on the demo test images and captions (pairs stream; mean over seeds): "
                  "activation ratio (tau = 0.1) / load entropy; HMoE and Stratified MoE: the expert parameters a "
                  "routed token activates (measured: HMoE's router may prefer small experts; a homogeneous top-2 "
                  "expert pair holds 33,664) and Stratified MoE's mean expert passes per token.", "",
                  "| variant | " + " | ".join(n.replace("pairs/", "").replace("blocks.", "b").replace(".mlp", "")
                                           for n in layers) + " |",
                  "|---|" + "---|" * len(layers)]
        for v in variants:
            if v not in per_layer:
                continue
            cells = []
            for n in layers:
                r = per_layer[v].get(n)
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{r['activation_ratio']:.2f} / {r['load_entropy']:.2f}"
                ragged = VARIANTS[v][2].get("moe", {}).keys() & {"expert_sizes", "strata"}
                if "activated_params_per_token" in r and ragged:
                    cell += f", {r['activated_params_per_token']:,.0f} params"
                if "mean_passes" in r:
                    cell += f", {r['mean_passes']:.2f} passes"
                cells.append(cell)
            lines.append(f"| {labels[v]} | " + " | ".join(cells) + " |")
    summary = {"seeds": seeds, "variants": variants, "flops": flops, "aggregate": agg, "jobs": len(jobs),
               "routing_per_layer": per_layer,
               "done": len(results), "wall_s": {k: r["wall_s"] for k, r in stored.items()}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, allow_nan=True))
    atomic_write_text(out / "study.md", "\n".join(lines) + "\n")
    if agg:
        _plot(agg, variants, labels, out / "study.png")
    return summary


def _routing_per_layer(results: Sequence[dict[str, Any]], variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per variant and pairs-stream MoE layer, the routing numbers of the routing jobs, averaged over seeds."""
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in results:
        if r["task"] != "routing" or r["variant"] not in variants:
            continue
        for name, row in r["metrics"].get("per_layer", {}).items():
            if not name.startswith("pairs/"):
                continue
            for k, v in row.items():
                acc.setdefault(r["variant"], {}).setdefault(name, {}).setdefault(k, []).append(float(v))
    return {v: {n: {k: sum(xs) / len(xs) for k, xs in row.items()} for n, row in layers.items()}
            for v, layers in acc.items()}


def _plot(agg: dict[str, Any], variants: Sequence[str], labels: dict[str, str], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmoe.io import atomic_write

    panels = [(t, METRICS[t][1]) for t in TASKS if t in agg and METRICS[t][1] in agg[t]]
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (task, metric) in zip(axes.flat, panels):
        name, scale = _SHOW.get(metric, (metric, 1))
        got = [v for v in variants if v in agg[task][metric]]
        means = [agg[task][metric][v]["mean"] * scale for v in got]
        stds = [agg[task][metric][v]["std"] * scale for v in got]
        ax.bar(range(len(got)), means, yerr=stds, capsize=3, color=[f"C{variants.index(v)}" for v in got])
        for i, v in enumerate(got):
            xs = [x * scale for x in agg[task][metric][v]["values"]]
            ax.plot([i] * len(xs), xs, "k.", ms=3)
        ax.set_xticks(range(len(got)), [labels[v] for v in got], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{task}: {name}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("vlmoe study: mean ± std over seeds (dots: seeds)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_write(path, overwrite=True) as f:
        f.write(buf.getvalue())


# ---------------------------------------------------------------------------------------------- CLI
