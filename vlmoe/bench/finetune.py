"""``vlmoe bench finetune``: a training step of each finetuning task model against its backbone alone.

For each task (VQA, NLVR2, ImageNet) the same inputs go through (a) the backbone alone, its output
reduced to a scalar, and (b) the task model with its head and loss (BCE over the answers,
cross-entropy), forward + backward, interleaved repeats, median: the head's cost is the difference.
NLVR2 runs the backbone on both images (as its task model does); ImageNet uses a vision-only backbone.

    vlmoe bench finetune --model base --batch 4 --image 224 --text 32 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlmoe.models import VLMoE, VLMoEConfig, VLMoEForImageClassification, VLMoEForNLVR2, VLMoEForVQA

__all__ = ["main"]


def _time(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn().backward()
    return time.perf_counter() - start


def _cases(args: argparse.Namespace) -> list[tuple[str, Callable, Callable]]:
    B, S, L = args.batch, args.image, args.text
    cfg = VLMoEConfig.from_name(args.model, img_size=S)
    img, img2 = torch.randn(B, 3, S, S), torch.randn(B, 3, S, S)
    ids = torch.randint(0, cfg.vocab_size, (B, L))
    cases = []

    vqa = VLMoEForVQA(VLMoE(cfg.replace(final_norm=False)), [f"a{i}" for i in range(args.answers)]).train()
    targets = torch.rand(B, args.answers)
    cases.append((f"VQA ({args.answers} answers)",
                  lambda: vqa.backbone(image=img, text_ids=ids).hidden_states.float().mean(),
                  lambda: F.binary_cross_entropy_with_logits(vqa(img, ids), targets) * args.answers))

    nlvr2 = VLMoEForNLVR2(VLMoE(cfg)).train()
    labels = torch.randint(0, 2, (B,))
    both, ids2 = torch.cat([img, img2]), torch.cat([ids, ids])
    cases.append(("NLVR2 (two images)",
                  lambda: nlvr2.backbone(image=both, text_ids=ids2).hidden_states.float().mean(),
                  lambda: F.cross_entropy(nlvr2(img, img2, ids), labels)))

    cls = VLMoEForImageClassification(VLMoE(cfg.replace(final_norm=False, modalities=["vision"])), args.classes).train()
    y = torch.randint(0, args.classes, (B,))
    cases.append((f"ImageNet ({args.classes} classes, vision only)",
                  lambda: cls.backbone(image=img).hidden_states.float().mean(),
                  lambda: F.cross_entropy(cls(img), y)))
    return cases


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmoe bench finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", help="backbone preset")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--image", type=int, default=224, help="image side")
    p.add_argument("--text", type=int, default=32, help="text tokens")
    p.add_argument("--answers", type=int, default=3129)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: keep)")
    return p


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = (f"model={args.model}, batch={args.batch}, image={args.image}px, text={args.text} tokens, fwd+bwd, "
              f"median of {args.repeats}, torch={torch.__version__}, threads={torch.get_num_threads()}")
    lines = [header, "", "| task | backbone alone (samples/s) | task model (samples/s) | head + loss overhead |",
             "|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for name, backbone, task in _cases(args):
        _time(backbone), _time(task)  # untimed: allocations, lazy init
        tb, tt = [], []
        for _ in range(args.repeats):  # interleaved
            tb.append(_time(backbone))
            tt.append(_time(task))
        b, t = statistics.median(tb), statistics.median(tt)
        line = f"| {name} | {args.batch / b:.2f} | {args.batch / t:.2f} | {100 * (t / b - 1):+.1f} % |"
        lines.append(line)
        print(line, flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
