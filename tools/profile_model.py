"""Profile forward + backward (optionally + the AdamW step) of whole backbones and print, side by side,
the operators' self time per model: where an MoE backbone spends the time its FLOPs do not explain.

    python tools/profile_model.py --models base,base_moe8 --batch 8 --rows 25
    python tools/profile_model.py --models base,base_moe8,base_mhmoe8 --train-step --device cuda --dtype bf16

The inputs are those of ``vlmoe bench model`` (images at the preset's size, 64 text tokens with the
last quarter padded in every second sample). Gradients are set to None between steps, as
``optimizer.zero_grad()`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from vlmoe.models import VLMoE, VLMoEConfig
from vlmoe.tasks.optim import adamw


def profile_one(name: str, args: argparse.Namespace, device: torch.device) -> tuple[dict[str, float], float]:
    """Self time per operator (ms) of one profiled step of preset ``name``, and the step's wall time."""
    torch.manual_seed(0)
    cfg = VLMoEConfig.from_name(name)
    model = VLMoE(cfg).to(device).train()
    opt = adamw(model.parameters(), lr=1e-4) if args.train_step else None  # the tasks' optimizer
    g = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, cfg.img_size, cfg.img_size, generator=g).to(device)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.text_len), generator=g).to(device)
    pad = torch.zeros(args.batch, args.text_len, dtype=torch.bool)
    pad[1::2, args.text_len - args.text_len // 4:] = True
    pad = pad.to(device)

    def step() -> None:
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
               else contextlib.nullcontext())
        with amp:
            out = model(image=image, text_ids=ids, text_padding_mask=pad)
        loss = out.hidden_states.float().square().mean() + out.aux.loss
        loss.backward()
        if opt is not None:
            opt.step()
        for q in model.parameters():
            q.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
    wall = time.perf_counter() - t0
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        table[e.key] += getattr(e, key) / 1e3  # ms
    return table, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="base,base_moe8")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--train-step", action="store_true", help="include AdamW's step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tables, walls = {}, {}
    for name in args.models.split(","):
        tables[name], walls[name] = profile_one(name, args, device)
    names = list(tables)
    ops = sorted({k for t in tables.values() for k in t}, key=lambda k: -max(t.get(k, 0.0) for t in tables.values()))
    print("self time per operator (ms), one step; step wall time under the profiler: "
          + ", ".join(f"{n} {walls[n]:.2f} s" for n in names))
    print("| operator | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for k in ops[: args.rows]:
        print(f"| `{k}` | " + " | ".join(f"{tables[n].get(k, 0.0):,.0f}" for n in names) + " |")
    print("| total | " + " | ".join(f"{sum(tables[n].values()):,.0f}" for n in names) + " |")


if __name__ == "__main__":
    main()
