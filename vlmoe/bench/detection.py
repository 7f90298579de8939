"""``vlmoe bench detection``: the ViTDet backbone with window attention against all-global attention, and
where a Mask R-CNN training step spends its time.

1. Backbone forward + backward at detection resolution (default 1024 px, ``base`` width, batch 1):
   windowed (``--window`` x ``--window`` windows, global attention in the default 4 blocks) vs global
   attention in every block; median time of interleaved repeats and the peak of live tensor bytes
   (parameters excluded, their gradients included). ViTDet's point: most blocks attend within 196
   tokens instead of all 4,096.
2. One Mask R-CNN training step on the same backbone (windowed), forward time split by component with
   forward hooks - backbone (ViT blocks), simple feature pyramid, RPN, ROI heads (box + mask) - and the
   step's forward + backward total.

    vlmoe bench detection --model base --image 1024 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from vlmoe.models import VLMoEConfig, create_model
from vlmoe.models.detection import ViTDetBackbone, VLMoEForDetection

from .moe import peak_memory

__all__ = ["main"]


def _backbone_case(vit, window: int, global_blocks, x: torch.Tensor):
    bb = ViTDetBackbone(vit, window_size=window, global_blocks=global_blocks)

    def fn(inp: torch.Tensor) -> torch.Tensor:
        return bb.forward_features(inp)

    return fn


def _time_fwd_bwd(fn, x: torch.Tensor, g: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x).backward(g)
    return time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmoe bench detection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", help="backbone preset (its vision branch)")
    p.add_argument("--image", type=int, default=1024)
    p.add_argument("--window", type=int, default=14)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-step", action="store_true", help="skip the Mask R-CNN step split")
    p.add_argument("--threads", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = VLMoEConfig.from_name(args.model).replace(modalities=["vision"], final_norm=False, img_size=args.image)
    vit = create_model(cfg).train()
    S, p = args.image, cfg.patch_size
    x = torch.randn(1, 3, S, S)
    g = torch.randn(1, cfg.dim, S // p, S // p)
    cases = [(f"windowed ({args.window}x{args.window}, global blocks {ViTDetBackbone(vit).global_blocks})",
              _backbone_case(vit, args.window, None, x)),
             ("global attention in every block", _backbone_case(vit, 0, None, x))]
    lines = [f"model={args.model} (vision branch), {S} px ({(S // p) ** 2} patches), batch 1, fwd+bwd, fp32, median of "
             f"{args.repeats}, torch={torch.__version__}, threads={torch.get_num_threads()}", "",
             "| backbone | fwd+bwd (s) | x global | peak memory (MiB) | x global |", "|---|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    times: dict[str, list[float]] = {n: [] for n, _ in cases}
    for _ in range(args.repeats):  # interleaved
        for name, fn in cases:
            vit.zero_grad(set_to_none=True)
            times[name].append(_time_fwd_bwd(fn, x, g))
    mem = {}
    for name, fn in cases:
        vit.zero_grad(set_to_none=True)
        mem[name] = 0 if args.no_memory else peak_memory(fn, x, g)
    ref_name = cases[1][0]
    t_ref, m_ref = statistics.median(times[ref_name]), mem[ref_name] or 1
    for name, _ in cases:
        t = statistics.median(times[name])
        line = (f"| {name} | {t:.2f} | **{t / t_ref:.2f}** | {mem[name] / 2**20:,.0f} | "
                f"**{mem[name] / m_ref:.2f}** |")
        lines.append(line)
        print(line, flush=True)
    if not args.no_step:
        lines += ["", _step_split(vit, args)]
        print(lines[-1], flush=True)
    return "\n".join(lines)


def _step_split(vit, args) -> str:
    model = VLMoEForDetection(vit, [f"class{i}" for i in range(80)], image_size=args.image, window_size=args.window)
    model.train()
    S = args.image
    images = [torch.rand(3, S, S)]
    m = torch.zeros(3, S, S, dtype=torch.uint8)
    boxes = torch.tensor([[100.0, 120.0, 400.0, 500.0], [500.0, 300.0, 900.0, 700.0], [50.0, 600.0, 300.0, 1000.0]])
    boxes = boxes * S / 1024
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        m[i, y0:y1, x0:x1] = 1
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "masks": m}]
    det = model.detector
    spent = {"backbone (ViT blocks)": 0.0, "simple feature pyramid": 0.0, "RPN": 0.0, "ROI heads (box + mask)": 0.0,
             "_backbone module": 0.0}
    starts: dict[str, float] = {}

    def hooks(name: str, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(lambda *_: starts.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(
            lambda *_: spent.__setitem__(name, spent[name] + time.perf_counter() - starts[name])
        )

    hooks("RPN", det.rpn)
    hooks("ROI heads (box + mask)", det.roi_heads)
    hooks("_backbone module", det.backbone)  # ViT blocks + pyramid
    pyramid = det.backbone
    orig = pyramid.forward_features

    def timed_features(images: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = orig(images)
        spent["backbone (ViT blocks)"] += time.perf_counter() - t0
        return out

    pyramid.forward_features = timed_features
    totals = []
    for _ in range(2):  # the second run is reported (the first pays for allocations)
        for k in spent:
            spent[k] = 0.0
        t0 = time.perf_counter()
        losses = model(images, targets)
        fwd = time.perf_counter() - t0
        sum(losses.values()).backward()
        totals.append((fwd, time.perf_counter() - t0))
        model.zero_grad(set_to_none=True)
    fwd, total = totals[-1]
    whole = spent.pop("_backbone module")
    spent["simple feature pyramid"] = max(0.0, whole - spent["backbone (ViT blocks)"])
    other = fwd - whole - spent["RPN"] - spent["ROI heads (box + mask)"]
    rows = [f"Mask R-CNN training step ({S} px, 1 image, 3 objects, 80 classes), second of 2 runs: forward "
            f"{fwd:.2f} s, forward + backward {total:.2f} s", "", "| forward part | s | share |", "|---|---:|---:|"]
    for k, v in [*spent.items(), ("transform (resize, normalise, batch)", other)]:
        rows.append(f"| {k} | {v:.2f} | {100 * v / fwd:.0f} % |")
    return "\n".join(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
