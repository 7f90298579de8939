"""``vlmoe bench predict``: VQA inference through ``vlmoe.load`` against the bare model forward.

For each preset (random weights, exported and loaded back as a user would) the same 640 x 480 RGB
images and question go (a) through ``Predictor.answer`` - decoding PIL images, resizing, normalising,
tokenising, batching, the forward, top-k answers - and (b) through the bare task model on tensors
prepared beforehand (the ideal: the forward alone). Interleaved repeats, median; the difference is
what loading-time preprocessing and the API cost.

    vlmoe bench predict --models tiny,base --images 32 --batch-size 16 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmoe bench predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,base")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=0, help="model input side (0: the preset's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> str:
    import numpy as np
    from PIL import Image

    from vlmoe.data import build_tokenizer, preprocess_dict
    from vlmoe.inference import load
    from vlmoe.models import VLMoEConfig, VLMoEForVQA, create_model, save_pretrained

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = build_tokenizer("clip")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(args.images)]
    question = "what color is the shape in the picture?"
    lines = [f"VQA, {args.images} images of 640 x 480, batch {args.batch_size}, fp32, median of {args.repeats}, "
             f"torch={torch.__version__}, threads={torch.get_num_threads()}", "",
             "| model | bare forward (images/s) | vlmoe.load predictor (images/s) | overhead |", "|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        cfg = VLMoEConfig.from_name(name, vocab_size=tok.vocab_size, final_norm=False)
        if args.image_size:
            cfg = cfg.replace(img_size=args.image_size)
        torch.manual_seed(0)
        model = VLMoEForVQA(create_model(cfg), [f"answer{i}" for i in range(3129)])
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, tmp, preprocess=preprocess_dict(cfg.img_size, "inception", "clip", 32))
            pred = load(tmp, batch_size=args.batch_size)
        x = pred.images(images)  # prepared once, for the bare forward
        ids, pad = pred.texts([question] * len(images))
        bs = args.batch_size

        def bare(model=pred.model, x=x, ids=ids, pad=pad, bs=bs) -> None:
            with torch.inference_mode():
                for s in range(0, x.shape[0], bs):
                    model(x[s : s + bs], ids[s : s + bs], pad[s : s + bs]).float().sigmoid().topk(1, dim=1)

        def api(pred=pred) -> None:
            pred.answer(images, question, topk=1)

        bare(), api()  # untimed warm-up
        tb, ta = [], []
        for _ in range(args.repeats):
            for fn, out in ((bare, tb), (api, ta)):
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
        b, a = statistics.median(tb), statistics.median(ta)
        n = len(images)
        line = f"| {name} ({cfg.img_size} px) | {n / b:.1f} | {n / a:.1f} | {100 * (a / b - 1):+.1f} % |"
        lines.append(line)
        print(line, flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
