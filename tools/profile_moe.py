"""Profile one forward + backward of an MoE layer and print the most expensive ops.

    python tools/profile_moe.py --experts 8 --tokens 16384 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from vlmoe.moe import MoE, MoEConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--rows", type=int, default=30)
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, ffn_dim=args.ffn, heads=args.heads,
                    check_finite=False)
    layer = MoE(args.dim, cfg).to(args.device, dtype)
    x = torch.randn(args.tokens, args.dim, device=args.device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)

    def step() -> None:
        for p in layer.parameters():  # as a training loop's zero_grad(set_to_none=True): no accumulation
            p.grad = None
        x.grad = None
        y, aux = layer(x)
        torch.autograd.backward([y, aux.loss], [g, torch.ones_like(aux.loss)])

    for _ in range(3):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    key = "cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
