"""Dense vs X-MoE vs MH-MoE, pretrained for the same steps on the demo data.

    python tools/pretrain_study.py                       # prints the table
    python tools/pretrain_study.py --write BENCHMARKS.md # also (re)writes its section there

The three models share everything but the FFNs of their blocks (the ``tiny`` geometry: width 64,
2 blocks, 2 attention heads, 32 px images in 8 px patches, open_clip BPE text):

- **Dense**: FFN width F = 128.
- **X-MoE**: 8 experts per modality, top-2, cosine router (X-MoE), expert width F / 2 = 64, so a
  token's activated FFN FLOPs equal the dense FFN's.
- **MH-MoE**: the X-MoE layer with h = 2 heads (sub-tokens of width 32 routed independently), 8
  experts, top-2, expert width 64 - 64 / 2 = 32: the FLOP parity of arXiv 2411.16205 eq. 8
  (head + merge projections included) at the same expert count, as the ``base_mhmoe8`` preset.

Every model sees the same batches (same seed, same data order) for the same number of steps with
the same optimizer and schedule. Reported: validation MLM loss (texts and pairs), MIM loss (images
and pairs; normalised-pixel targets), the expert activation ratio and load entropy of every MoE layer
on the validation data (:mod:`vlmoe.moe.stats`; tau = 0.1 of the uniform share), and training
throughput (median samples/s over the steps after warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from vlmoe.moe import MoEConfig, RoutingStatsAccumulator, moe_flops_per_token
from vlmoe.tasks import PretrainDataModule, PretrainTask

SECTION = "## Pretraining study (`tools/pretrain_study.py`)"

DIM, FFN, EXPERTS, TOP_K, HEADS = 64, 128, 8, 2, 2


def variants() -> dict[str, dict[str, Any]]:
    """Model overrides of the ``tiny`` preset for each contender."""
    xmoe = MoEConfig(num_experts=EXPERTS, top_k=TOP_K, ffn_dim=FFN // TOP_K, ffn_layernorm=True, router="xmoe")
    mhmoe = xmoe.replace(heads=HEADS, ffn_dim=FFN // TOP_K - DIM // TOP_K, head_projections=True)
    return {
        "Dense": {"mlp_dim": FFN},
        "X-MoE": {"moe": xmoe.to_dict(), "moe_every": 1},
        "MH-MoE": {"moe": mhmoe.to_dict(), "moe_every": 1},
    }


def ffn_flops(overrides: dict[str, Any]) -> int:
    """Forward FLOPs of one token through one FFN (dense: 2 matmuls of D x F)."""
    if "moe" not in overrides:
        return 2 * 2 * DIM * overrides["mlp_dim"]
    return moe_flops_per_token(DIM, MoEConfig.from_dict(overrides["moe"]))


class _Timer(pl.Callback):
    def __init__(self, skip: int) -> None:
        self.skip, self.rates, self._t = skip, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.skip and self._t is not None:
            samples = sum((b["image"] if "image" in b else b["text_ids"]).shape[0] for b in batch.values())
            self.rates.append(samples / (time.perf_counter() - self._t))


def run(name: str, overrides: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    dm = PretrainDataModule(batch_size=args.batch_size, max_len=40, num_workers=args.num_workers, seed=args.seed,
                            val_samples=args.val_batches * args.batch_size // 3)
    task = PretrainTask("tiny", model_overrides=overrides, vocab_size=dm.vocab_size, lr=args.lr, min_lr=1e-5,
                        warmup_steps=args.steps // 10, stats_every=0)
    timer = _Timer(skip=10)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, gradient_clip_val=3.0,
        callbacks=[timer],
    )
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(task, datamodule=dm)
    train_s = time.perf_counter() - start
    # validation: fixed order, whole images; losses averaged over batches, routing summed over them
    acc = RoutingStatsAccumulator(tau=0.1)
    sums: dict[str, list[float]] = {}
    task.eval()
    with torch.no_grad():
        for i, batch in enumerate(dm.val_dataloader()):
            if i == args.val_batches:
                break
            terms, _, aux, _ = task.forward_streams(batch)
            for k, v in terms.items():
                sums.setdefault(k, []).append(float(v))
            acc.update(aux)
    val = {k: statistics.fmean(v) for k, v in sums.items()}
    params = sum(p.numel() for p in task.model.parameters())
    ffn_params = sum(p.numel() for n, p in task.model.named_parameters() if ".mlp." in n)
    return {
        "name": name,
        "params": params,
        "ffn_params": ffn_params,
        "ffn_flops": ffn_flops(overrides),
        "val": val,
        "routing": acc.per_layer(),
        "samples_per_s": statistics.median(timer.rates) if timer.rates else float("nan"),
        "train_s": train_s,
    }


def _short(layer: str) -> str:
    # blocks.1.mlp.vision -> b1.vision
    m = re.match(r"blocks\.(\d+)\.mlp\.(\w+)", layer)
    return f"b{m.group(1)}.{m.group(2)}" if m else layer


def table(results: list[dict[str, Any]]) -> str:
    head = ("| model | params (FFN) | FFN kFLOP/token | val MLM text | val MLM pair | val MIM image | val MIM pair "
            "| activation ratio per layer | load entropy per layer | samples/s |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in results:
        v = r["val"]
        layers = sorted(r["routing"])
        ratio = ", ".join(f"{_short(n)} {r['routing'][n]['activation_ratio']:.2f}" for n in layers) or "-"
        ent = ", ".join(f"{_short(n)} {r['routing'][n]['load_entropy']:.2f}" for n in layers) or "-"
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M ({r['ffn_params'] / 1e3:.0f}k) | {r['ffn_flops'] / 1e3:.1f} "
            f"| {v.get('mlm_text', 0):.3f} "
            f"| {v.get('mlm_pair', 0):.3f} | {v.get('mim_image', 0):.4f} | {v.get('mim_pair', 0):.4f} | {ratio} "
            f"| {ent} | {r['samples_per_s']:.0f} |"
        )
    return "\n".join(lines)


def section(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    return "\n".join([
        SECTION,
        "",
        "Dense vs X-MoE vs MH-MoE (8 experts per modality, top-2) pretrained on the demo data (easy-vqa) for "
        f"the same {args.steps} steps of {args.batch_size} samples (pairs + images + texts), same seed and data "
        "order, AdamW, cosine schedule; MoE in both blocks of the `tiny` geometry (width 64, 2 blocks). "
        "X-MoE experts are half the dense FFN width, so a token's FFN FLOPs equal the dense model's; MH-MoE "
        "(2 heads) keeps 8 experts and narrows them to 64 − 64/2 = 32 for the same FLOPs (head and merge "
        "projections included). Validation: "
        f"{args.val_batches} batches of the demo val split; MIM targets are normalised patch pixels (MSE). "
        "Parameters: most are the 49,410-token text embedding and MLM head; FFN parameters in brackets. "
        "Activation ratio: share of a layer's experts that receive at least 0.1 × the uniform share of "
        "routed (sub-)token assignments on the validation data; load entropy normalised to 1 = uniform.",
        "",
        f"Machine: {machine} (shared with other jobs: throughput is indicative only).",
        "",
        f"Command: `{command}`",
        "",
        table(results),
        "",
    ])


def write_section(path: Path, text: str) -> None:
    """Replace this study's section in ``path`` (or append it); other sections stay as they are."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + (old[nxt + 1 :] if nxt >= 0 else "")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-batches", type=int, default=20)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="subset of Dense, X-MoE, MH-MoE")
    p.add_argument("--write", type=Path, default=None, help="(re)write the study's section of this markdown file")
    args = p.parse_args(argv)
    results = []
    for name, overrides in variants().items():
        if args.only and name not in args.only:
            continue
        r = run(name, overrides, args)
        print(f"{name}: {r['train_s']:.0f} s, val {r['val']}", file=sys.stderr, flush=True)
        results.append(r)
    cmd = "python tools/pretrain_study.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = section(results, args, cmd)
    print(text)
    if args.write:
        write_section(args.write, text)
    return results


if __name__ == "__main__":
    main()
