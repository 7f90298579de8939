"""Routing analytics: what the experts of one or more models do on the same data.

:func:`routing_report` runs a model's backbone over batches of three streams - images alone
(``vision``), texts alone (``text``) and image-text pairs (``pairs``) - with forward hooks on its MoE
layers (:func:`vlmoe.moe.record_routing`) and sums each layer's routed (sub-)token assignments per expert
(the layers' own :class:`~vlmoe.moe.RoutingStats`, before capacity dropping) in a
:class:`~vlmoe.moe.RoutingStatsAccumulator` per stream. From the summed counts it
reports per layer the expert load (counts and shares), the activation ratio (``vlmoe.moe.stats``:
share of experts with at least ``tau`` x the uniform share), the load entropy (1 = uniform), the load
CV, dropped assignments, and where the layers provide them the activated expert parameters per
(sub-)token (HMoE) and the mean expert passes per token (Stratified MoE).

:func:`write_routing_report` writes ``report.json`` (every number), PNG pictures (matplotlib, Agg) - a
layers x experts load heatmap per model and stream, and the activation ratio per layer of every model
side by side - and an ``index.html`` showing them with captions.

    vlmoe analyze routing --model runs/pretrain/demo_dense/checkpoints/last.ckpt \\
        --model runs/pretrain/demo_xmoe/checkpoints/last.ckpt --model runs/pretrain/demo/checkpoints/last.ckpt \\
        --out docs/routing
"""

from __future__ import annotations

import html
import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlmoe.moe import MoE, RoutingStats, RoutingStatsAccumulator, record_routing

__all__ = ["GROUPINGS", "STREAMS", "demo_batches", "expert_choice_by_group", "grouped_demo_batches",
           "patch_expert_maps", "plot_choice_by_group", "plot_patch_maps", "routing_report", "write_routing_report"]

STREAMS = ("vision", "text", "pairs")


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


@torch.inference_mode()
def routing_report(model: nn.Module, batches: Iterable[dict[str, Any]], tau: float = 0.1) -> dict[str, Any]:
    """Per stream and MoE layer the routing numbers (see the module docstring).

    Args:
        model: a backbone or task model (its ``backbone`` is run).
        batches: dicts with ``image`` ``(B, 3, S, S)`` and / or ``text_ids`` + ``text_padding_mask``; each
            batch feeds the three streams (images alone, texts alone, both) its parts allow.
        tau: the activation threshold.

    Returns:
        ``{"streams": {stream: {layer: {...}}}, "summary": {stream: {"activation_ratio", ...}}}``.
    """
    bb = _backbone(model).eval()
    cfg = bb.config
    accs = {s: RoutingStatsAccumulator(tau) for s in STREAMS}  # each (sub-)token's experts recorded too
    for batch in batches:
        img, ids, pad = batch.get("image"), batch.get("text_ids"), batch.get("text_padding_mask")
        runs = []
        if img is not None and cfg.has_vision:
            runs.append(("vision", dict(image=img)))
        if ids is not None and cfg.has_text:
            runs.append(("text", dict(text_ids=ids, text_padding_mask=pad)))
        if img is not None and ids is not None and cfg.has_vision and cfg.has_text:
            runs.append(("pairs", dict(image=img, text_ids=ids, text_padding_mask=pad)))
        for stream, kwargs in runs:
            with record_routing(bb, accs[stream]):
                bb(**kwargs)
    streams = {s: acc.layers() for s, acc in accs.items() if acc.counts}
    summary = {}
    for s, layers in streams.items():
        n = len(layers)
        keys = ("activation_ratio", "load_entropy", "load_cv")
        summary[s] = {k: sum(v[k] for v in layers.values()) / n for k in keys}
        summary[s]["dropped"] = sum(v["dropped"] for v in layers.values())
    return {"tau": tau, "streams": streams, "summary": summary}


@torch.inference_mode()
def patch_expert_maps(model: nn.Module, image: Tensor) -> dict[str, Tensor]:
    """The first-choice expert of every image patch in every vision MoE layer: ``{layer: (B, h, gh, gw)}``
    (``h`` = MH-MoE heads: one map per sub-token head; 1 otherwise). Stratified layers have none."""
    bb = _backbone(model).eval()
    moes = {m.stats_name: m for m in bb.modules() if isinstance(m, MoE) and m.stats_name.endswith(".vision")}
    got: dict[str, Tensor] = {}

    def first_choice(layer: MoE, s: RoutingStats, args: Any, kwargs: Any) -> None:
        if s.assignments is not None:
            got[s.name] = s.assignments[:, 0].cpu()

    with record_routing(bb, on_stats=first_choice, layers=moes.values()):
        bb(image=image)
    B = image.shape[0]
    gh, gw = bb.vision_embed.grid_size
    out = {}
    for name, first in got.items():
        heads = moes[name].config.heads
        per = first.view(B, 1 + gh * gw, heads)[:, 1:]  # (B*(1+gh*gw)*heads,) -> (B, 1+gh*gw, heads); drop CLS
        out[name] = per.permute(0, 2, 1).reshape(B, heads, gh, gw)  # (B, gh*gw, heads) -> (B, heads, gh, gw)
    return out


def plot_patch_maps(images: Tensor, maps: dict[str, Tensor], num_experts: dict[str, int], title: str) -> Any:
    """A figure: per sample image (rows) the image and, per layer and head, its patch -> expert map
    overlaid (columns). ``images``: ``(B, 3, S, S)`` in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    B = images.shape[0]
    cols = [(name, h) for name, m in maps.items() for h in range(m.shape[1])]
    fig, axes = plt.subplots(B, 1 + len(cols), figsize=(6.4, 6.4 * B / (1 + len(cols)) + 0.6), squeeze=False)
    S = images.shape[-1]
    for b in range(B):
        img = images[b].permute(1, 2, 0).clamp(0, 1).numpy()  # (3, S, S) -> (S, S, 3)
        axes[b, 0].imshow(img)
        for j, (name, h) in enumerate(cols, start=1):
            ax = axes[b, j]
            ax.imshow(img)
            ax.imshow(maps[name][b, h].numpy(), cmap="tab10", vmin=0, vmax=max(9, num_experts[name] - 1),
                      alpha=0.55, extent=(0, S, S, 0), interpolation="nearest")
            if b == 0:
                ax.set_title(_short(name) + (f" h{h}" if maps[name].shape[1] > 1 else ""), fontsize=7)
        for ax in axes[b]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def demo_batches(image_size: int, tokenizer: Any, max_len: int = 24, num_batches: int = 4, batch_size: int = 32,
                 mean_std: Any = "inception", demo_dir: str | None = None) -> list[dict[str, Any]]:
    """Batches of the demo data's Karpathy test split (easy-vqa test images with one caption each)."""
    from vlmoe.data import Collator, build_demo, build_transform
    from vlmoe.data.coco import KarpathyCaptions

    paths = build_demo(demo_dir)
    data = KarpathyCaptions(paths.coco_karpathy, paths.coco_images, "test", build_transform("eval", image_size,
                            mean_std=mean_std, output="uint8"), per_caption=True)
    collate = Collator(tokenizer, max_len, mean_std=mean_std)
    step = max(1, len(data) // (num_batches * batch_size))  # spread over the split: many images, 1 caption each
    idx = list(range(0, len(data), step))[: num_batches * batch_size]
    return [collate([{k: v for k, v in data[i].items() if k != "image_id"} for i in idx[b : b + batch_size]])
            for b in range(0, len(idx), batch_size)]


GROUPINGS = ("class", "answer_type", "question_type")


def grouped_demo_batches(group_by: str, image_size: int, tokenizer: Any, max_len: int = 24, num_batches: int = 4,
                         batch_size: int = 32, mean_std: Any = "inception", demo_dir: str | None = None
                         ) -> tuple[list[dict[str, Any]], list[str]]:
    """Demo batches whose samples carry a ``group`` id, and the group names.

    ``class``: the demo ImageFolder's validation images (``shape``: circle / rectangle / triangle), images
    alone. ``answer_type`` / ``question_type``: the demo VQAv2 validation questions with their images
    (pairs), grouped by the annotation's answer type (yes/no, other) or question type. Samples are
    spread evenly over the split.
    """
    from vlmoe.data import Collator, build_demo, build_transform
    from vlmoe.data.vqav2 import VQAv2Dataset

    if group_by not in GROUPINGS:
        raise ValueError(f"unknown grouping {group_by!r}; choose one of {', '.join(GROUPINGS)}")
    paths = build_demo(demo_dir)
    transform = build_transform("eval", image_size, mean_std=mean_std, output="uint8")
    n = num_batches * batch_size
    if group_by == "class":
        from vlmoe.data.imagenet import ImageFolderDataset

        data = ImageFolderDataset(Path(paths.imagefolder_shape) / "val", transform)
        step = max(1, len(data) // n)
        idx = list(range(0, len(data), step))[:n]
        rows = [{"image": data[i]["image"], "group": data.samples[i][1]} for i in idx]
        names = list(data.class_names)
        collate = Collator(None, max_len, mean_std=mean_std)
    else:
        if tokenizer is None:
            raise ValueError(f"grouping by {group_by} needs a model with a text branch (questions)")
        data = VQAv2Dataset(paths.vqa_val_questions, paths.coco_images, transform=transform)
        annotations = json.loads(Path(paths.vqa_val_annotations).read_text())["annotations"]
        anns = {int(a["question_id"]): a for a in annotations}
        step = max(1, len(data) // n)
        idx = list(range(0, len(data), step))[:n]
        keys = [anns[int(data.records[i]["question_id"])][group_by] for i in idx]
        names = sorted(set(keys))
        rows = []
        for i, k in zip(idx, keys):
            item = data[i]
            rows.append({"image": item["image"], "text": item["text"], "group": names.index(k)})
        collate = Collator(tokenizer, max_len, mean_std=mean_std)
    batches = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        batch = collate([{k: v for k, v in r.items() if k != "group"} for r in chunk])
        batch["group"] = torch.tensor([r["group"] for r in chunk])
        batches.append(batch)
    return batches, names


@torch.inference_mode()
def expert_choice_by_group(model: nn.Module, batches: Iterable[dict[str, Any]], groups: list[str]) -> dict[str, Any]:
    """Which experts each group of samples (answer type, class, ...) chooses, per MoE layer.

    Every routed (sub-)token's ``k`` assignments are counted for the group of the sample it belongs to
    (padding is never routed; the tokens of a sample are its image patches, CLS and text tokens that the
    layer routes). Per layer: ``counts`` ``(G, E)``, ``share`` (each group's row normalised) and the
    mutual information between group and expert in bits (0: the choice says nothing about the group),
    with its upper bound ``H(group)`` of the counted assignments.

    Args:
        batches: dicts with ``image`` and / or ``text_ids`` (+ ``text_padding_mask``) and ``group``
            ``(B,)`` ids into ``groups``; the backbone runs on what each batch holds.
    """
    bb = _backbone(model).eval()
    counts: OrderedDict[str, Tensor] = OrderedDict()
    G = len(groups)
    ctx: dict[str, Any] = {}

    def count(layer: MoE, s: RoutingStats, args: Any, kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["x"]
        pad = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
        B, Lv, Lt = ctx["B"], ctx["Lv"], ctx["Lt"]
        if x.ndim == 3:  # (B, L, D): the sample of every row
            sample = torch.arange(B).repeat_interleave(x.shape[1])
        elif x.ndim == 2 and x.shape[0] == B * (Lv + Lt):  # one shared pool: all vision rows, then all text rows
            sample = torch.cat([torch.arange(B).repeat_interleave(Lv), torch.arange(B).repeat_interleave(Lt)])
        else:
            return
        if pad is not None:
            sample = sample[~pad.reshape(-1).bool().cpu()]  # (B, L) or (B*(Lv+Lt),) -> one flag per row
        sample = sample.repeat_interleave(layer.config.heads)  # MH-MoE: h sub-token rows per token
        if s.assignments is None or s.assignments.shape[0] != sample.shape[0]:
            return  # Stratified MoE: no per-token record
        a = s.assignments.cpu().long()  # (rows, k)
        E = s.tokens_per_expert.numel()
        c = counts.setdefault(s.name, torch.zeros(G, E, dtype=torch.long))
        g = ctx["group"][sample].unsqueeze(1).expand_as(a)
        # counts (G, E) -> (G*E,) bins; ids g*E + a (rows, k) -> (rows*k,)
        c.view(-1).index_add_(0, (g * E + a).reshape(-1), torch.ones(a.numel(), dtype=torch.long))

    with record_routing(bb, on_stats=count):
        for batch in batches:
            img, ids, pad = batch.get("image"), batch.get("text_ids"), batch.get("text_padding_mask")
            B = (img if img is not None else ids).shape[0]
            Lv = 1 + bb.vision_embed.num_patches if img is not None else 0
            ctx.update(B=B, Lv=Lv, Lt=ids.shape[1] if ids is not None else 0, group=batch["group"].cpu().long())
            kwargs = {}
            if img is not None:
                kwargs["image"] = img
            if ids is not None:
                kwargs.update(text_ids=ids, text_padding_mask=pad)
            bb(**kwargs)
    layers = {}
    for name, c in counts.items():
        p = c.double() / c.sum().clamp(min=1)
        pg, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
        nz = p > 0
        mi = float((p[nz] * (p[nz] / (pg * pe).expand_as(p)[nz]).log2()).sum())
        hg = float(-(pg[pg > 0] * pg[pg > 0].log2()).sum())
        share = c.double() / c.sum(1, keepdim=True).clamp(min=1)
        layers[name] = {"counts": c.tolist(), "share": share.tolist(), "mutual_information_bits": mi,
                        "group_entropy_bits": hg}
    return {"groups": list(groups), "layers": layers}


def plot_choice_by_group(result: dict[str, Any], title: str) -> Any:
    """One heatmap per MoE layer: groups (rows) x experts (columns), each row's share of assignments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["layers"])
    groups = result["groups"]
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4, 0.6 + rows * (0.5 + 0.22 * len(groups))), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    vmax = max((max(max(r) for r in v["share"]) for v in result["layers"].values()), default=1.0)
    im = None
    for ax, name in zip(axes.flat, names):
        layer = result["layers"][name]
        im = ax.imshow(layer["share"], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(f"{_short(name)}  MI {layer['mutual_information_bits']:.2f} b", fontsize=7)
        ax.set_yticks(range(len(groups)), groups if ax in axes[:, 0] else [""] * len(groups), fontsize=6)
        ax.set_xticks(range(len(layer["share"][0])))
        ax.tick_params(axis="x", labelsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    if im is not None:
        cbar = fig.colorbar(im, cax=fig.add_axes((0.91, 0.2, 0.015, 0.6)))
        cbar.ax.tick_params(labelsize=6)
        cbar.set_label("share", fontsize=7)
    return fig


def _short(name: str) -> str:
    return name.replace("blocks.", "b").replace(".mlp.", ".")


def write_routing_report(reports: dict[str, dict[str, Any]], out: str | Path, overwrite: bool = False,
                         extra_figures: list[tuple[Any, str, str]] | None = None) -> list[Path]:
    """``report.json``, the PNGs and ``index.html`` of one or more models' reports into ``out``
    (``extra_figures``: ``(matplotlib figure, file name, caption)`` to add, e.g. patch maps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmoe.io import atomic_write, atomic_write_text

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another folder or pass overwrite (--overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    written, figures = [], []

    def save(fig: Any, name: str, caption: str) -> None:
        buf = __import__("io").BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        with atomic_write(out / name, overwrite=True) as f:
            f.write(buf.getvalue())
        written.append(out / name)
        figures.append((name, caption))

    for model_name, rep in reports.items():
        for stream, layers in rep["streams"].items():
            if not layers:
                continue
            names = list(layers)
            loads = [layers[n]["load"] for n in names]
            E = max(len(x) for x in loads)
            grid = [row + [float("nan")] * (E - len(row)) for row in loads]
            fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.35 * len(names)))
            im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
            ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=8)
            ax.set_xticks(range(E))
            ax.set_xlabel("expert")
            ax.set_title(f"{model_name} - {stream}: share of routed assignments per expert", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.03)
            fig.tight_layout()
            save(fig, f"load_{_slug(model_name)}_{stream}.png",
                 f"{model_name}, {stream} stream: expert load per layer (uniform = {1 / E:.3f})")
    for stream in STREAMS:
        rows = {m: r["streams"].get(stream) for m, r in reports.items() if r["streams"].get(stream)}
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        width = 0.8 / len(rows)
        for i, (m, layers) in enumerate(rows.items()):
            xs = [j + i * width for j in range(len(layers))]
            ax.bar(xs, [v["activation_ratio"] for v in layers.values()], width, label=m)
        first = next(iter(rows.values()))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(first))], [_short(n) for n in first], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"activation ratio (tau = {next(iter(reports.values()))['tau']})")
        ax.set_title(f"{stream} stream: activation ratio per MoE layer", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save(fig, f"activation_ratio_{stream}.png", f"Activation ratio per layer, {stream} stream, every model")
    for fig, name, caption in extra_figures or []:
        save(fig, name, caption)
    atomic_write_text(out / "report.json", json.dumps(reports, indent=1))
    written.append(out / "report.json")
    items = "\n".join(f'<figure><img src="{html.escape(n)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}'
                      f"</figcaption></figure>" for n, c in figures)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>vlmoe routing report</title></head><body>"
            f"<h1>Routing report</h1><p>Models: {html.escape(', '.join(reports))}. Numbers: "
            f"<a href='report.json'>report.json</a>.</p>{items}</body></html>\n")
    atomic_write_text(out / "index.html", page)
    written.append(out / "index.html")
    return written


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name).strip("_") or "model"
