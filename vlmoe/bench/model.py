"""Backbone benchmark: the multiway model vs torchscale's BEiT3, and MoE variants vs dense.

Run ``vlmoe bench model --help``. Forward + backward of the whole backbone on an image-text batch
(default: 8 images at 224 px, 64 text tokens with the last 16 padded in every second sample), in
one process, with interleaved repeats and medians:

1. ``torchscale BEiT3`` (when installed: ``pip install --no-deps torchscale fairscale``) against
   vlmoe's dense model at the same configuration (``base``: 12 x 768, BEiT-3 as released);
2. each MoE variant (default ``base_moe8``: top-2 of 8 per modality, ``base_xmoe8``: X-MoE router,
   ``base_mhmoe8``: MH-MoE h=4 at the same FLOPs per token) against the dense model.

Next to each model: its FLOP ideal relative to the reference - forward FLOPs per token from the config
(:func:`vlmoe.models.flops.flops_per_token`: attention projections 8 d^2 + scores 4 L d per block, FFN
4 d F, MoE layers router + k experts + MH-MoE projections) divided by the reference's - and the measured
time ratio over that ideal (1.00 = the model costs exactly what its FLOPs say). ``--train-step`` adds
AdamW's step to every timed iteration, as a training step has it (the tasks' optimizer,
:func:`vlmoe.tasks.optim.adamw`: fused where it can be), and then times that step alone per model with
each of torch's three AdamW implementations - fused, foreach and the per-tensor loop - on the same
state, against its ideal: a pass that reads the parameters, gradients and both moments once and
writes three of them back (28 bytes per fp32 parameter) at the bandwidth of an in-place update
(``a.add_(b)``) measured in the same run. ``--compare-recompute``
times each MoE preset a second time with its experts' activation checkpointing flipped
(``MoEConfig.recompute_experts``; ``base_mhmoe8`` has it on).

Peak memory is the peak of live tensor bytes allocated during one forward + backward beyond what
existed before, with the MoE workspace emptied first so that its cached buffers count (parameters
excluded, their gradients included; CPU: allocator events recorded by
the torch profiler, see :func:`vlmoe.bench.moe.peak_memory`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vlmoe.bench.moe import _device_name, add_cpu_gemm_argument, apply_cpu_gemm_argument, peak_memory
from vlmoe.models import VLMoE, VLMoEConfig
from vlmoe.moe import MoE
from vlmoe.runtime import reuse_freed_memory


@dataclass
class Impl:
    name: str
    module: nn.Module
    run: Callable[[Tensor], Tensor | tuple]
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    flops_per_token: float | None = None
    optimizer: torch.optim.Optimizer | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def _torchscale_beit3(cfg: VLMoEConfig) -> nn.Module | None:
    try:
        from torchscale.architecture.config import EncoderConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchscale.model.BEiT3 import BEiT3
    except Exception:  # an optional peer
        return None
    args = EncoderConfig(
        img_size=cfg.img_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size, multiway=True,
        layernorm_embedding=False, normalize_output=True, no_output_layer=True,
        encoder_embed_dim=cfg.dim, encoder_attention_heads=cfg.num_heads,
        encoder_ffn_embed_dim=cfg.mlp_dim, encoder_layers=cfg.depth,
    )  # fmt: skip
    return BEiT3(args)


def _inputs(args: argparse.Namespace, cfg: VLMoEConfig, device: torch.device):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, cfg.img_size, cfg.img_size, generator=g).to(device)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.text_len), generator=g).to(device)
    pad = torch.zeros(args.batch, args.text_len, dtype=torch.bool)
    pad[1::2, args.text_len - args.text_len // 4 :] = True  # every second text: last quarter padded
    return image, ids, pad.to(device)


def _vlmoe_impl(name: str, model: VLMoE, ids: Tensor, pad: Tensor, autocast: Callable,
                train_step: bool = False) -> Impl:
    from vlmoe.models.flops import flops_per_token

    def run(image: Tensor):
        with autocast():
            out = model(image=image, text_ids=ids, text_padding_mask=pad)
        # an MoE model's aux loss is part of the backward (its gradient reaches the routers)
        return (out.hidden_states, out.aux) if out.aux.loss.requires_grad else out.hidden_states

    cfg = model.config
    fpt = flops_per_token(cfg, 1 + cfg.num_patches + ids.shape[1])["total"]
    opt = None
    if train_step:
        from vlmoe.tasks.optim import adamw

        opt = adamw(model.parameters(), lr=1e-4)
    return Impl(name, model, run, flops_per_token=fpt, optimizer=opt)


def _torchscale_impl(model: nn.Module, ids: Tensor, pad: Tensor, autocast: Callable) -> Impl:
    def run(image: Tensor):
        with autocast():
            return model(textual_tokens=ids, visual_tokens=image, text_padding_position=pad)["encoder_out"]

    return Impl("torchscale BEiT3", model, run)


def _fwd_bwd(impl: Impl, x: Tensor, g: Tensor) -> None:
    out = impl.run(x)
    if isinstance(out, tuple):
        y, aux = out
        torch.autograd.backward([y, aux.loss], [g.to(y.dtype), torch.ones_like(aux.loss)])
    else:
        out.backward(g.to(out.dtype))


def _zero(impl: Impl) -> None:
    for p in impl.module.parameters():
        p.grad = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(impl: Impl, x: Tensor, g: Tensor) -> None:
    _fwd_bwd(impl, x, g)
    if impl.optimizer is not None:
        impl.optimizer.step()


def _uses_workspace(impl: Impl) -> bool:
    return any(isinstance(m, MoE) for m in impl.module.modules())


def measure(impls: list[Impl], x: Tensor, g: Tensor, repeats: int, memory: bool, device: torch.device) -> None:
    """Warm up, then time ``repeats`` interleaved rounds; then one peak-memory run each.

    As in ``vlmoe bench moe``, no model runs with buffers another one cached: the MoE workspace is
    emptied before a model without MoE layers runs (its gigabytes held would make the dense model's
    page faults reclaim memory: +50 % on its step on this VM), and an MoE model gets one untimed step
    before each timed one, which refills the workspace (its steady state in training)."""
    from vlmoe.moe import workspace

    for impl in impls:
        _step(impl, x, g)
        _zero(impl)
    for _ in range(repeats):
        for impl in impls:
            if _uses_workspace(impl):
                _step(impl, x, g)  # steady state: the workspace refilled
                _zero(impl)
            else:
                workspace.release()
                gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            _step(impl, x, g)
            _sync(device)
            impl.times.append(time.perf_counter() - t0)
            _zero(impl)
    if memory:
        for impl in impls:
            gc.collect()
            workspace.release()  # every buffer the step uses is allocated (and counted) within it
            impl.peak_bytes = peak_memory(lambda image, impl=impl: impl.run(image), x, g)
            _zero(impl)


OPTIMIZER_HEADER = [
    "| model | params | fused (ms) | foreach (ms) | for-loop (ms) | ideal (ms) | fused × ideal | foreach × fused |"
    " for-loop × fused |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]
ADAMW_IMPLS = {"fused": {"fused": True, "foreach": False}, "foreach": {"fused": False, "foreach": True},
               "for-loop": {"fused": False, "foreach": False}}


def update_bandwidth(device: torch.device, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of an in-place update ``a.add_(b)`` over ``mib`` MiB tensors (two reads and one
    write counted), best of ``repeats``: the access pattern of an optimizer step, which writes back what
    it read (a copy into another tensor would also read its destination first, under-stating the rate)."""
    a = torch.zeros(mib * 2**18, device=device)
    b = torch.ones_like(a)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        a.add_(b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 3 * a.numel() * a.element_size() / best


def optimizer_rows(impls: list[Impl], repeats: int, bandwidth: float, device: torch.device) -> list[str]:
    """Time each model's AdamW step alone with torch's three implementations, interleaved on one state.

    The step reads ``param_groups[i]["fused" | "foreach"]`` at every call, so switching the flags
    switches the implementation over the same parameters, gradients and moments. Gradients are random
    (the step's cost does not depend on their values) and dropped afterwards."""
    from vlmoe.tasks.optim import fused_adamw_takes

    rows = []
    for impl in impls:
        opt = impl.optimizer
        if opt is None:
            continue
        params = [p for g in opt.param_groups for p in g["params"]]
        with torch.no_grad():
            for p in params:
                p.grad = torch.randn_like(p).mul_(1e-3)
        saved = [(g.get("fused"), g.get("foreach")) for g in opt.param_groups]
        kinds = [k for k in ADAMW_IMPLS if k != "fused" or fused_adamw_takes(params)]
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(repeats + 1):
            for kind in kinds:
                for g in opt.param_groups:
                    g.update(ADAMW_IMPLS[kind])
                _sync(device)
                t0 = time.perf_counter()
                opt.step()
                _sync(device)
                if r:  # the first round warms up every implementation
                    times[kind].append(time.perf_counter() - t0)
        for g, (fused, foreach) in zip(opt.param_groups, saved):
            g["fused"], g["foreach"] = fused, foreach
        for p in params:
            p.grad = None
        med = {k: statistics.median(v) for k, v in times.items()}
        nbytes = sum(p.numel() * p.element_size() for p in params)
        ideal = 7 * nbytes / bandwidth  # read param, grad, exp_avg, exp_avg_sq; write three of them
        fused = med.get("fused")
        ms = [f"{1e3 * med[k]:,.1f}" if k in med else "-" for k in ADAMW_IMPLS]
        vs_fused = [f"{med[k] / fused:.2f}" if fused and k in med else "-" for k in ("foreach", "for-loop")]
        rows.append(
            f"| {impl.name} | {impl.params / 1e6:.0f}M | {' | '.join(ms)} | {1e3 * ideal:,.1f} | "
            f"{f'{fused / ideal:.2f}' if fused else '-'} | {' | '.join(vs_fused)} |"
        )
    return rows


def format_rows(impls: list[Impl], ref: Impl, tokens: int) -> list[str]:
    rows = []
    for impl in impls:
        mem = f"{impl.peak_bytes / 2**20:,.0f}" if impl.peak_bytes is not None else "-"
        memx = f"{impl.peak_bytes / ref.peak_bytes:.2f}" if impl.peak_bytes and ref.peak_bytes else "-"
        ideal = (impl.flops_per_token / ref.flops_per_token
                 if impl.flops_per_token and ref.flops_per_token else None)
        rows.append(
            f"| {impl.name} | {impl.params / 1e6:.0f}M | {1e3 * impl.median:,.0f} | "
            f"{impl.median / ref.median:.2f} | " + (f"{ideal:.2f} | {impl.median / ref.median / ideal:.2f}"
                                                     if ideal else "- | -")
            + f" | {tokens / impl.median:,.0f} | {mem} | {memx} |"
        )
    return rows


HEADER = [
    "| model | params | time (ms) | × ref time | FLOP ideal × ref | × ideal | tokens/s | peak mem (MiB) | × ref mem |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmoe bench model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dense", default="base", help="dense preset (compared with torchscale's BEiT3)")
    p.add_argument("--moe", default="base_moe8,base_xmoe8,base_mhmoe8", help="comma list of MoE presets ('' for none)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--img-size", type=int, default=None, help="default: the preset's (224)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    p.add_argument("--no-torchscale", dest="torchscale", action="store_false")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    add_cpu_gemm_argument(p)
    p.add_argument("--compare-recompute", action="store_true",
                   help="also time each MoE preset with its recompute_experts setting flipped (the experts' "
                        "hidden layer recomputed in backward instead of kept, or the reverse), next to the preset")
    p.add_argument("--train-step", action="store_true",
                   help="time forward + backward + AdamW's step (the optimizer over every parameter)")
    p.add_argument("--malloc-tuning", action="store_true",
                   help="reuse freed memory instead of page-faulting large buffers in every step "
                        "(vlmoe.runtime.reuse_freed_memory; applies to every model, the dense reference "
                        "included: the ratios then hold no page faults on either side)")
    return p


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    malloc_tuned = args.malloc_tuning and reuse_freed_memory()
    apply_cpu_gemm_argument(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    def autocast():
        if args.dtype == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    over = {} if args.img_size is None else {"img_size": args.img_size}
    dense_cfg = VLMoEConfig.from_name(args.dense, **over)
    image, ids, pad = _inputs(args, dense_cfg, device)
    tokens = args.batch * (1 + dense_cfg.num_patches + args.text_len)
    x = image.requires_grad_(False)
    g = torch.randn(args.batch, 1 + dense_cfg.num_patches + args.text_len, dense_cfg.dim, device=device)

    header = (
        f"device={device} ({_device_name(device)}), dtype={args.dtype}, torch={torch.__version__}, "
        f"batch={args.batch}, image={dense_cfg.img_size}px ({1 + dense_cfg.num_patches} tokens), "
        f"text={args.text_len} tokens, {'fwd+bwd+AdamW step' if args.train_step else 'fwd+bwd'}, "
        f"median of {args.repeats}, malloc tuning {'on' if malloc_tuned else 'off'}"
    )
    print(header, flush=True)
    dense = _vlmoe_impl(f"vlmoe {args.dense}", VLMoE(dense_cfg).to(device).train(), ids, pad, autocast,
                        args.train_step)
    sections = []

    ts = _torchscale_beit3(dense_cfg) if args.torchscale else None
    if ts is not None:
        peer = _torchscale_impl(ts.to(device).train(), ids, pad, autocast)
        measure([peer, dense], x, g, args.repeats, args.memory, device)
        rows = format_rows([peer, dense], peer, tokens)
        sections.append(["", f"dense vs torchscale (ref = torchscale BEiT3, {args.dense} config)", "", *HEADER, *rows])
        print("\n".join(sections[-1]), flush=True)
        del peer, ts
        gc.collect()
    elif args.torchscale:
        print("torchscale not installed: `pip install --no-deps torchscale fairscale` to compare", flush=True)

    for name in [n.strip() for n in args.moe.split(",") if n.strip()]:
        variants = [(f"vlmoe {name}", {})]
        preset = VLMoEConfig.from_name(name, **over)
        if args.compare_recompute and preset.moe is not None:
            flip = not preset.moe.recompute_experts
            extra = {"moe": {"recompute_experts": flip}}
            if preset.moe_text is not None:
                extra["moe_text"] = {"recompute_experts": flip}
            variants.append((f"vlmoe {name} (recompute_experts={flip})", extra))
        impls = []
        for label, extra in variants:
            torch.manual_seed(0)
            model = VLMoE(VLMoEConfig.from_name(name, **over, **extra)).to(device).train()
            impls.append(_vlmoe_impl(label, model, ids, pad, autocast, args.train_step))
        dense.times, dense.peak_bytes = [], None
        measure([dense, *impls], x, g, args.repeats, args.memory, device)
        rows = format_rows([dense, *impls], dense, tokens)
        sections.append(["", f"{name} vs dense (ref = vlmoe {args.dense})", "", *HEADER, *rows])
        print("\n".join(sections[-1]), flush=True)
        del impls, model
        gc.collect()
    if args.train_step:
        dense.times = []
        bw = update_bandwidth(device)
        rows = optimizer_rows([dense], args.repeats, bw, device)
        for name in [n.strip() for n in args.moe.split(",") if n.strip()]:
            torch.manual_seed(0)
            model = VLMoE(VLMoEConfig.from_name(name, **over)).to(device)
            rows += optimizer_rows([_vlmoe_impl(f"vlmoe {name}", model, ids, pad, autocast, True)],
                                   args.repeats, bw, device)
            del model
            gc.collect()
        sections.append(["", f"AdamW step alone (in-place update bandwidth {bw / 1e9:.1f} GB/s; ideal = 28 bytes "
                         "per fp32 parameter at that rate)", "", *OPTIMIZER_HEADER, *rows])
        print("\n".join(sections[-1]), flush=True)
    # every section was printed as it finished
    return "\n".join([header] + [line for s in sections for line in s])


if __name__ == "__main__":
    main(sys.argv[1:])
