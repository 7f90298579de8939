"""Recipe experiments on the VQA demo data with a plain training loop (no Lightning, no checkpoints).

    python tools/vqa_probe.py --preset demo --steps 1200                       # from scratch
    python tools/vqa_probe.py --preset demo_xmoe --init runs/pretrain/demo/checkpoints/last.ckpt
    python tools/vqa_probe.py --preset tiny --over '{"init_std": 0.125}' --loss bce

Trains ``VLMoEForVQA`` on the demo's VQAv2-format train questions (easy-vqa) exactly as
``vlmoe finetune vqav2`` batches them (same data module, transforms and collator), with AdamW, linear
warm-up and cosine decay, and every ``--eval_every`` steps scores a fixed sample of the test questions:
the VQA score overall, on the yes/no and on the "other" questions, and the yes/no and "other" scores with
the images shuffled within each evaluation batch (the shuffled-image control). It exists to compare
recipes quickly (init scale, heads, depth, loss, pooling, pretrained vs scratch) on the curve rather than
on a final number; the figures it produced are in BENCHMARKS.md, "Why the demo models did not look at
the image". Its numbers are on ``--eval_n`` questions (default 2,048), not the whole split.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch

from vlmoe.models import VLMoEForVQA, create_model, load_checkpoint
from vlmoe.tasks.finetune.vqa import VQADataModule, vqa_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", help="model preset")
    p.add_argument("--over", default="{}", help="JSON config overrides, e.g. '{\"num_heads\": 8}'")
    p.add_argument("--size", type=int, default=64, help="image side (px)")
    p.add_argument("--init", default=None, help="checkpoint to start from (default: random init)")
    p.add_argument("--allow_partial", action="store_true", help="accept a checkpoint with under half the weights")
    p.add_argument("--format", default="auto", help="checkpoint layout (auto, vlmoe, beit3, timm)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--head_lr", type=float, default=10.0, help="lr multiplier of the pooler and head")
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--eval_every", type=int, default=300)
    p.add_argument("--eval_n", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loss", default="soft_ce", choices=("bce", "soft_ce"))
    p.add_argument("--filter", default="", help="keep only the questions containing this text")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    dm = VQADataModule(
        image_size=a.size,
        batch_size=a.bs,
        val_batch_size=256,
        randaug="",
        scale=(1.0, 1.0),
        hflip=0.0,
        max_len=24,
        num_workers=1,
    )
    dm.setup("fit")
    if a.filter:
        for split in ("train", "val"):
            d = dm.datasets[split]
            d.records = [r for r in d.records if a.filter in r["question"]]
    over = json.loads(a.over)
    over.setdefault("final_norm", False)  # BEiT-3's VQA model, as VQATask builds it
    model = VLMoEForVQA(create_model(a.preset, img_size=a.size, vocab_size=dm.vocab_size, **over), dm.answers)
    if a.init:
        print(load_checkpoint(model, a.init, allow_partial=a.allow_partial, format=a.format))

    with open(dm.resolve()["val_annotations"]) as f:
        types = {x["question_id"]: x["answer_type"] for x in json.load(f)["annotations"]}
    val = dm.datasets["val"]
    sample = random.Random(0).sample(range(len(val)), min(a.eval_n, len(val)))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val, sample), batch_size=256, collate_fn=dm.collator(), num_workers=1
    )
    head = [q for n, q in model.named_parameters() if n.startswith(("head.", "pooler."))]
    rest = [q for n, q in model.named_parameters() if not n.startswith(("head.", "pooler."))]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": a.lr}, {"params": head, "lr": a.lr * a.head_lr}], weight_decay=a.wd, betas=(0.9, 0.98)
    )
    base_lrs = [g["lr"] for g in opt.param_groups]

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        score = {"yes/no": [0.0, 0.0, 0], "other": [0.0, 0.0, 0]}  # true image, shuffled, count
        g = torch.Generator().manual_seed(1)
        for b in loader:
            perm = torch.randperm(b["image"].shape[0], generator=g)
            for k, img in enumerate((b["image"], b["image"][perm])):
                logits = model(img, b["text_ids"], b["text_padding_mask"])
                s = b["vqa_targets"].gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
                for q, v in zip(b["question_id"].tolist(), s.tolist()):
                    score[types[q]][k] += v
                    score[types[q]][2] += k == 0
        model.train()
        n = {t: max(1, v[2]) for t, v in score.items()}
        return {
            "all": (score["yes/no"][0] + score["other"][0]) / sum(n.values()),
            "yes/no": score["yes/no"][0] / n["yes/no"],
            "other": score["other"][0] / n["other"],
            "yes/no shuffled": score["yes/no"][1] / n["yes/no"],
            "other shuffled": score["other"][1] / n["other"],
        }

    t0, step = time.time(), 0
    model.train()
    while step < a.steps:
        for b in dm.train_dataloader():
            if step < a.warmup:
                f = (step + 1) / a.warmup
            else:
                f = 0.5 * (1 + math.cos(math.pi * (step - a.warmup) / max(1, a.steps - a.warmup)))
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * f
            logits, aux = model(b["image"], b["text_ids"], b["text_padding_mask"], return_aux=True)
            loss = vqa_loss(logits, b["vqa_targets"], a.loss) + aux.loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
            opt.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
            if step % a.eval_every == 0 or step == a.steps:
                r = {k: round(100 * v, 2) for k, v in evaluate().items()}
                print(f"EVAL step {step} t={time.time() - t0:.0f}s", r, flush=True)
            if step >= a.steps:
                break


if __name__ == "__main__":
    main()
