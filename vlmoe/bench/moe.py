"""MoE layer benchmark: vlmoe vs the ideal vs peers, side by side in one process.

Run ``vlmoe bench moe --help``. For every case it times forward + backward (interleaved repeats,
medians) of:

- ``ideal``: k x a dense FFN of the same shapes (dim -> ffn -> dim) on the same tokens: the compute
  a perfectly efficient top-k layer cannot avoid;
- ``vlmoe``: :class:`vlmoe.moe.MoE` (router, sort-based dropless dispatch, grouped experts, combine);
- ``naive``: sort + a Python loop over experts indexing a stacked (E, d, h) weight (``w[e]``), the
  common pattern whose backward materialises a full-size weight gradient per expert;
- ``torchscale``: torchscale's X-MoE ``MOELayer`` + ``Top2Gate(use_xmoe=True)`` when installed
  (``pip install --no-deps torchscale fairscale``), capacity factor 1 in training as its default.

Each implementation is timed in its own steady state, right after one untimed step of itself (which
refills vlmoe's workspace, :mod:`vlmoe.moe.workspace`, the cache of its large CPU buffers); every
other implementation runs after that cache has been released, so none of them runs with memory vlmoe
holds between steps.

Peak memory is the peak of live tensor bytes allocated during one forward + backward (allocator
events recorded by the torch profiler on CPU, ``max_memory_allocated`` on CUDA). Two references:
``× dense mem`` divides by one dense FFN over the k x T rows that any top-k layer must hold;
``× ideal mem`` adds to that the gradients of the other E-1 experts' weights, which any layer with E
experts must also hold (a dense FFN has one weight set). The workspace is emptied before each memory
run, so every buffer vlmoe uses in the step is allocated - and counted - within it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmoe.moe import MoE, MoEConfig, hmoe_expert_sizes, mhmoe_flop_parity, moe_flops_per_token, workspace
from vlmoe.moe.gemm import Linear, cpu_gemm_backend, cpu_vendor
from vlmoe.runtime import huge_pages_requested, reuse_freed_memory


# ---------------------------------------------------------------------------------------------- impls
class DenseFFN(nn.Module):
    def __init__(self, dim: int, ffn: int, sub_ln: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, ffn), Linear(ffn, dim)  # the experts' GEMM backend
        self.ln = nn.LayerNorm(ffn) if sub_ln else nn.Identity()  # BEiT-3 / Magneto's ffn_layernorm

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.ln(F.gelu(self.fc1(x))))


class NaiveLoopMoE(nn.Module):
    """Sort + per-expert loop over a stacked weight: ``x_e @ w1[e]`` (the pitfall, for reference)."""

    def __init__(self, dim: int, ffn: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.k, self.E = top_k, num_experts
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, ffn) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(num_experts, ffn))
        self.w2 = nn.Parameter(torch.randn(num_experts, ffn, dim) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))

    def forward(self, x: Tensor) -> Tensor:
        probs = self.gate(x).softmax(-1)
        w, idx = probs.topk(self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = idx.reshape(-1)  # (T, k) -> (T*k,)
        order = flat.argsort(stable=True)
        tok = order // self.k
        counts = torch.bincount(flat, minlength=self.E).tolist()
        xs = x[tok]
        outs, s = [], 0
        for e, n in enumerate(counts):
            h = F.gelu(xs[s : s + n] @ self.w1[e] + self.b1[e])
            outs.append(h @ self.w2[e] + self.b2[e])
            s += n
        ys = torch.cat(outs) * w.reshape(-1)[order, None]  # w (T, k) -> (T*k,) -> sorted (T*k, 1)
        return torch.zeros_like(x).index_add_(0, tok, ys)


def _torchscale_layer(dim: int, ffn: int, num_experts: int, top_k: int, tokens: int):
    """torchscale X-MoE MOELayer (needs a process group; we start a 1-process gloo group)."""
    try:
        from torchscale.architecture.config import EncoderConfig
        from torchscale.component.feedforward_network import make_experts
        from torchscale.component.xmoe.moe_layer import MOELayer
        from torchscale.component.xmoe.routing import Top1Gate, Top2Gate
    except Exception:  # not installed (it is an optional peer)
        return None
    _ensure_process_group()
    _patch_histc()
    args = EncoderConfig(
        encoder_embed_dim=dim, encoder_ffn_embed_dim=ffn, moe_freq=1, moe_expert_count=num_experts,
        use_xmoe=True, moe_gating_use_fp32=True,
    )
    args.ddp_rank = 0
    if top_k == 1:
        gate = Top1Gate(dim, num_experts, use_xmoe=True, use_fp32=True)
    else:
        gate = Top2Gate(dim, num_experts, use_xmoe=True, use_fp32=True,
                        normalize_gate_prob_before_dropping=True, second_expert_policy="random")
    experts = make_experts(args, dim, ffn)
    layer = MOELayer(gate, experts, args)

    def run(x: Tensor) -> Tensor:
        y, l_aux = layer(x.unsqueeze(0))
        return y.squeeze(0) + 0 * l_aux

    return layer, run


_OWN_PROCESS_GROUP = False


def _release_process_group() -> None:
    """Destroy the 1-process group started for the torchscale peer (callers may run more code after)."""
    global _OWN_PROCESS_GROUP
    if _OWN_PROCESS_GROUP:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _OWN_PROCESS_GROUP = False


def _ensure_process_group() -> None:
    import os

    import torch.distributed as dist

    global _OWN_PROCESS_GROUP
    if not dist.is_initialized():
        _OWN_PROCESS_GROUP = True
        # a file rendezvous: no TCP port that another process might hold
        import tempfile

        init = os.path.join(tempfile.mkdtemp(prefix="vlmoe-bench-"), "init")
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)


def _patch_histc() -> None:
    # torchscale's CPU path calls torch.histc on int64 tensors, which CPU histc does not support.
    if getattr(torch.histc, "_vlmoe_patched", False):
        return
    orig = torch.histc

    def histc(input, *a, **kw):
        return orig(input.float() if not input.is_floating_point() else input, *a, **kw)

    histc._vlmoe_patched = True
    torch.histc = histc


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Result:
    name: str
    times: list[float]
    peak_bytes: int | None = None
    extra_bytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _fwd_bwd(fn: Callable[[Tensor], Tensor], x: Tensor, g: Tensor) -> None:
    out = fn(x)
    if isinstance(out, tuple):  # vlmoe MoE returns (y, aux)
        y, aux = out
        torch.autograd.backward([y, aux.loss], [g, torch.ones_like(aux.loss)])
    else:
        out.backward(g)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn: Callable[[Tensor], Tensor], x: Tensor, g: Tensor) -> int:
    """Peak live tensor bytes allocated during one forward + backward (beyond what existed before)."""
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _fwd_bwd(fn, x, g)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with contextlib.redirect_stdout(io.StringIO()), profile(
        activities=[ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        _fwd_bwd(fn, x, g)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


def _zero_grads(*mods: nn.Module) -> None:
    for m in mods:
        for p in m.parameters():
            p.grad = None


@dataclass
class Case:
    name: str
    num_experts: int
    tokens: int
    heads: int = 1
    compare_to_plain: bool = False  # MH-MoE: also time the plain layer it is matched to
    schedule: str | None = None  # HMoE expert-size schedule (sizes sum to E x ffn)


class PerExpertDense(nn.Module):
    """The HMoE ideal: each expert's dense FFN (its own width) on exactly the rows routed to it."""

    def __init__(self, dim: int, sizes: list[int], counts: list[int]) -> None:
        super().__init__()
        self.ffns = nn.ModuleList(DenseFFN(dim, f) for f in sizes)
        self.counts = counts

    def forward(self, x: Tensor) -> Tensor:
        # rows: for every expert, its routed rows (k x T rows in total, one dense FFN each)
        outs, s = [], 0
        for ffn, n in zip(self.ffns, self.counts):
            if n:
                outs.append(ffn(x[s : s + n]))
            s += n
        return torch.cat(outs)


def run_case(case: Case, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    d, f, k, T = args.dim, args.ffn, args.top_k, case.tokens
    base = MoEConfig(num_experts=case.num_experts, top_k=k, ffn_dim=f, check_finite=False,
                     ffn_layernorm=args.sub_ln and not case.schedule)
    cfg = mhmoe_flop_parity(d, base, case.heads) if case.heads > 1 else base
    if case.schedule:
        sizes = hmoe_expert_sizes(case.schedule, case.num_experts, total=case.num_experts * f)
        cfg = base.replace(expert_sizes=sizes)
    impls: dict[str, tuple[nn.Module, Callable]] = {}
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T, d, device=device, dtype=dtype)
    ours = MoE(d, cfg).to(device, dtype)
    if case.schedule:
        with torch.no_grad():
            counts = ours(x)[1].tokens_per_expert.tolist()
        ideal = PerExpertDense(d, cfg.sizes, counts).to(device, dtype)
        x_ideal = torch.randn(k * T, d, device=device, dtype=dtype, requires_grad=True)
        g_ideal = torch.randn(k * T, d, device=device, dtype=dtype)
    else:
        ideal = DenseFFN(d, f, sub_ln=args.sub_ln).to(device, dtype)
        x_ideal, g_ideal = x, g
    if args.compile:  # both sides compiled, so the comparison stays like for like
        impls["ideal"] = (ideal, torch.compile(ideal))
        impls["vlmoe"] = (ours, torch.compile(ours))
    else:
        impls["ideal"] = (ideal, ideal)
        impls["vlmoe"] = (ours, ours)
    if args.recompute_experts:  # the same layer (same weights), its experts' hidden layer recomputed in backward
        rec = MoE(d, cfg.replace(recompute_experts=True)).to(device, dtype)
        rec.load_state_dict(ours.state_dict())
        impls["vlmoe recompute"] = (rec, torch.compile(rec) if args.compile else rec)
    if case.compare_to_plain:
        plain = MoE(d, base).to(device, dtype)
        impls["vlmoe plain"] = (plain, plain)
    if case.heads == 1 and not case.schedule and not args.no_peers:
        if args.naive:
            naive = NaiveLoopMoE(d, f, case.num_experts, k).to(device, dtype)
            impls["naive loop"] = (naive, naive)
        ts = _torchscale_layer(d, f, case.num_experts, k, T) if args.torchscale else None
        if ts is not None:
            layer, run = ts
            impls["torchscale"] = (layer.to(device, dtype), run)

    xk = torch.randn(k * T, d, device=device, dtype=dtype, requires_grad=True)  # ideal memory
    gk = torch.randn(k * T, d, device=device, dtype=dtype)

    inputs = {name: (x_ideal, g_ideal) if name == "ideal" else (x, g) for name in impls}
    for name, (mod, fn) in list(impls.items()):  # warm-up; a peer that runs out of memory is reported
        try:
            _fwd_bwd(fn, *inputs[name])
        except torch.OutOfMemoryError:
            if name in ("ideal", "vlmoe"):
                raise
            print(f"{case.name}: {name} ran out of memory", flush=True)
            del impls[name]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _zero_grads(mod)
    results = {name: Result(name, []) for name in impls}
    for _ in range(args.repeats):
        for name, (mod, fn) in impls.items():
            if not name.startswith("vlmoe"):
                workspace.release()  # nobody else runs with our cached buffers held
            # steady state: one untimed step first (refills vlmoe's workspace; and page-fault costs on
            # a VM depend on what ran just before, e.g. the peers' multi-GB temporaries)
            _fwd_bwd(fn, *inputs[name])
            _zero_grads(mod)
            x.grad = x_ideal.grad = None
            _sync(device)
            t0 = time.perf_counter()
            _fwd_bwd(fn, *inputs[name])
            _sync(device)
            results[name].times.append(time.perf_counter() - t0)
            _zero_grads(mod)
    if not case.schedule:  # the HMoE ideal already runs every routed row once
        results["ideal"].times = [k * t for t in results["ideal"].times]
    if args.memory:
        for name, (mod, fn) in impls.items():
            workspace.release()  # every buffer the step uses is allocated (and counted) within it
            if name == "ideal" and case.schedule:
                results[name].peak_bytes = peak_memory(fn, x_ideal, g_ideal)
            elif name == "ideal":
                results[name].peak_bytes = peak_memory(fn, xk, gk)
            else:
                results[name].peak_bytes = peak_memory(fn, x, g)
            _zero_grads(mod)
            x.grad = xk.grad = None
    # Memory any top-k layer must hold beyond a dense FFN over the k*T rows: gradients for the other
    # E-1 experts' weights (a dense FFN has one set). Reported as the "ideal" memory.
    dense_param_bytes = sum(p.numel() * p.element_size() for p in ideal.parameters())
    results["ideal"].extra_bytes = (
        (case.num_experts - 1) * dense_param_bytes if args.memory and not case.schedule else 0
    )
    plain_flops = T * moe_flops_per_token(d, base)
    fwd_flops = {name: plain_flops for name in impls}
    if case.schedule:  # routed rows x their expert's FFN
        fwd_flops = {name: 2 * 2 * d * sum(n * fe for n, fe in zip(counts, cfg.sizes)) for name in impls}
    else:
        fwd_flops["vlmoe"] = T * moe_flops_per_token(d, cfg)
    if "vlmoe recompute" in fwd_flops:  # the model FLOPs (the recomputed fc1 is overhead, not work)
        fwd_flops["vlmoe recompute"] = fwd_flops["vlmoe"]
    return {"case": case, "config": cfg, "results": results, "fwd_flops": fwd_flops}


def format_table(rows: list[dict], device: torch.device) -> str:
    lines = [
        "| case | impl | time (ms) | × ideal | tokens/s | TFLOP/s | peak mem (MiB) | × dense mem | × ideal mem |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        case, res = row["case"], row["results"]
        ideal = res["ideal"]
        for name, r in res.items():
            flops = 3 * row["fwd_flops"][name]
            have_mem = r.peak_bytes is not None and bool(ideal.peak_bytes)
            peak = r.peak_bytes + (r.extra_bytes if name == "ideal" else 0) if have_mem else None
            mem = f"{peak / 2**20:.0f}" if have_mem else "-"
            memd = f"{r.peak_bytes / ideal.peak_bytes:.2f}" if have_mem else "-"
            memx = f"{peak / (ideal.peak_bytes + ideal.extra_bytes):.2f}" if have_mem else "-"
            tf = f"{flops / r.median / 1e12:.3f}"
            lines.append(
                f"| {case.name} | {name} | {_ms(r.median)} | {r.median / ideal.median:.2f} | "
                f"{case.tokens / r.median:,.0f} | {tf} | {mem} | {memd} | {memx} |"
            )
        if "vlmoe plain" in res:
            ratio = res["vlmoe"].median / res["vlmoe plain"].median
            lines.append(f"| {case.name} | MH-MoE / plain | {ratio:.2f}× | | | | | | |")
    return "\n".join(lines)


def _ms(t: float) -> str:
    ms = 1e3 * t
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def add_cpu_gemm_argument(p: argparse.ArgumentParser) -> None:
    """``--cpu-gemm``, shared by the bench commands."""
    p.add_argument("--cpu-gemm", choices=["auto", "onednn", "blas"], default=None,
                   help="the fp32 CPU GEMM backend (sets VLMOE_CPU_GEMM; default: the environment's, else auto: "
                        "oneDNN where available); see vlmoe.moe.gemm")


def apply_cpu_gemm_argument(args: argparse.Namespace) -> None:
    """Set ``--cpu-gemm`` for this process and its workers; a bad ``VLMOE_CPU_GEMM`` fails here."""
    if args.cpu_gemm:
        os.environ["VLMOE_CPU_GEMM"] = args.cpu_gemm  # inherited by spawned workers
    cpu_gemm_backend()  # before any model is built


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmoe bench moe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--cases", default="8x4096,32x4096,8x16384,mh4:8x4096",
                   help="comma list of EXPERTSxTOKENS; prefix 'mhH:' for MH-MoE with H heads at FLOP parity, "
                        "'hmoe-SCHEDULE:' for HMoE experts (arithmetic|geometric|hybrid) summing to E x ffn")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    p.add_argument("--no-peers", action="store_true", help="only ideal and vlmoe")
    p.add_argument("--no-naive", dest="naive", action="store_false")
    p.add_argument("--no-torchscale", dest="torchscale", action="store_false")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    add_cpu_gemm_argument(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the ideal and the vlmoe layer")
    p.add_argument("--sub-ln", action="store_true",
                   help="experts (and the ideal's FFN) with BEiT-3's sub-LN on the hidden layer, as the model presets "
                        "have it (not for HMoE cases; use with --no-peers: the peers have none)")
    p.add_argument("--recompute-experts", action="store_true",
                   help="also time the layer with recompute_experts=True (activation checkpointing of the experts)")
    p.add_argument("--malloc-tuning", action="store_true",
                   help="reuse freed memory instead of page-faulting large buffers in every step "
                        "(vlmoe.runtime.reuse_freed_memory; applies to every impl; use with --no-peers: the "
                        "peers' multi-GB temporaries fragment the untrimmed heap)")
    p.add_argument("--world-size", type=int, default=1,
                   help="> 1: expert parallelism over that many CPU processes (gloo); prints the time split "
                        "(routing / exchange / compute) and the all-to-all volume")
    return p


def parse_cases(spec: str) -> list[Case]:
    cases = []
    for item in spec.split(","):
        item = item.strip()
        heads, schedule = 1, None
        if item.startswith("mh"):
            h, item = item[2:].split(":", 1)
            heads = int(h)
        elif item.startswith("hmoe-"):
            schedule, item = item[5:].split(":", 1)
        try:
            e, t = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"bad case {item!r}: expected EXPERTSxTOKENS, e.g. 8x4096") from None
        name = f"E={e}, T={t}" + (f", MH-MoE h={heads} (FLOP parity)" if heads > 1 else "")
        if schedule:
            name += f", HMoE {schedule} sizes"
        cases.append(Case(name, e, t, heads, compare_to_plain=heads > 1, schedule=schedule))
    return cases


# ---------------------------------------------------------------------------------------------- expert parallel
def _ep_worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out_file: str) -> None:
    import json

    import torch.distributed as dist

    from vlmoe.moe.parallel import shard_experts

    torch.set_num_threads(max(1, (args.threads or torch.get_num_threads()) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = []
    try:
        for case in parse_cases(args.cases):
            torch.manual_seed(0)
            d, f, k, T = args.dim, args.ffn, args.top_k, case.tokens
            base = MoEConfig(num_experts=case.num_experts, top_k=k, ffn_dim=f, check_finite=False)
            cfg = mhmoe_flop_parity(d, base, case.heads) if case.heads > 1 else base
            if case.schedule:
                cfg = base.replace(expert_sizes=hmoe_expert_sizes(case.schedule, case.num_experts,
                                                                  total=case.num_experts * f))
            layer = MoE(d, cfg)
            shard_experts(layer)
            ep = layer.expert_parallel
            torch.manual_seed(1 + rank)  # every rank routes its own tokens
            x = torch.randn(T, d, requires_grad=True)
            g = torch.randn(T, d)
            _fwd_bwd(layer, x, g)
            totals, splits = [], []
            for _ in range(args.repeats):
                layer.zero_grad(set_to_none=True)
                ep.reset_timings()
                dist.barrier()
                t0 = time.perf_counter()
                _fwd_bwd(layer, x, g)
                totals.append(time.perf_counter() - t0)
                splits.append(dict(ep.timings))
            i = totals.index(statistics.median(totals)) if len(totals) % 2 else 0
            rows.append({"case": case.name, "total": statistics.median(totals), **splits[i]})
        if rank == 0:
            with open(out_file, "w") as fh:
                json.dump(rows, fh)
    finally:
        dist.destroy_process_group()


def run_expert_parallel(args: argparse.Namespace) -> str:
    import json
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_ep_worker, args=(args.world_size, os.path.join(tmp, "init"), args, out),
                 nprocs=args.world_size, join=True)
        with open(out) as fh:
            rows = json.load(fh)
    lines = [
        f"expert parallel: world={args.world_size} (gloo, CPU), tokens per rank as in the case, rank 0 shown; "
        "exchange = all-to-all forward + backward, compute = local experts forward",
        "| case | step (ms) | routing + counts (ms) | exchange (ms) | expert compute fwd (ms) | other (ms) "
        "| all-to-all volume sent (MiB/step) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        other = r["total"] - r.get("routing", 0) - r.get("exchange", 0) - r.get("compute", 0)
        lines.append(
            f"| {r['case']} | {1e3 * r['total']:.0f} | {1e3 * r.get('routing', 0):.1f} | "
            f"{1e3 * r.get('exchange', 0):.1f} | {1e3 * r.get('compute', 0):.0f} | {1e3 * other:.0f} | "
            f"{r.get('exchanged_bytes', 0) / 2**20:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    return table


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    apply_cpu_gemm_argument(args)
    malloc_tuned = args.malloc_tuning and reuse_freed_memory()
    if args.world_size > 1:
        return run_expert_parallel(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    header = (
        f"device={device} ({_device_name(device)}), dtype={args.dtype}, threads={torch.get_num_threads()}, "
        f"torch={torch.__version__}, dim={args.dim}, ffn={args.ffn}, top-{args.top_k}, fwd+bwd, "
        f"median of {args.repeats}, malloc tuning {'on' if malloc_tuned else 'off'}"
        + (", torch.compile" if args.compile else "")
    )
    print(header, flush=True)
    rows: list[dict] = []
    shown = 0
    try:
        for case in parse_cases(args.cases):
            rows.append(run_case(case, args, device, dtype))
            # the table grows as cases finish; each line is printed once
            lines = format_table(rows, device).splitlines()
            print("\n".join(lines[shown:]), flush=True)
            shown = len(lines)
    finally:
        _release_process_group()
    return header + "\n" + format_table(rows, device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    vendor = cpu_vendor()
    return (f"{platform.processor() or platform.machine()}{', ' + vendor if vendor else ''}, "
            f"{torch.get_num_threads()} threads, "
            f"huge pages {'on' if huge_pages_requested() else 'off'}, fp32 GEMMs: {cpu_gemm_backend()}")


if __name__ == "__main__":
    main(sys.argv[1:])
