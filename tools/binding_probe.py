"""Does a pretrained model read a caption's colour and shape words off the image?

For each caption of the demo's Karpathy ``test`` split (easy-vqa's test images), the first colour word
(or shape word) is replaced by ``[MASK]`` and the pretraining model's MLM head picks among the colour
(shape) words; accuracy with the caption's own image and with another image's (the batch rolled by 5,
the captions per image, so that no caption keeps its image). Chance: 1 / 8 for colours, 1 / 2 for the
shapes the tokenizer keeps in one token (circle, triangle).

    vlmoe export runs/pretrain/demo/checkpoints/last.ckpt /tmp/pre
    python tools/binding_probe.py /tmp/pre [--captions 1000]
"""

from __future__ import annotations

import argparse

import torch

from vlmoe.data import build_demo, build_tokenizer, build_transform
from vlmoe.data.coco import KarpathyCaptions
from vlmoe.models import load_pretrained

WORDS = {
    "colour": ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"],
    "shape": ["circle", "rectangle", "triangle"],
}


@torch.no_grad()
def word_accuracy(model, tok, images, ids, pad, table: dict[int, str], batch: int = 100) -> tuple[float, int]:
    """Accuracy of the masked first word of ``table`` in each caption (captions without one are left out)."""
    cand = torch.tensor(sorted(table))
    hit = total = 0
    for b in range(0, len(ids), batch):
        t, p = ids[b : b + batch].clone(), pad[b : b + batch]
        found = torch.isin(t, cand)  # (B, L)
        first = found & (found.long().cumsum(1) == 1)  # the first such word of each caption
        if not first.any():
            continue
        target = t[first]
        t[first] = tok.mask_id
        out = model.backbone(image=images[b : b + batch], text_ids=t, text_padding_mask=p)
        logits = model.mlm_logits(out)[first]  # (M, V)
        pred = cand[logits[:, cand].argmax(-1)]
        hit += int((pred == target).sum())
        total += int(first.sum())
    return hit / max(total, 1), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a vlmoe export folder of a pretraining model")
    ap.add_argument("--captions", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model).eval()
    tok = build_tokenizer("clip")
    demo = build_demo()
    data = KarpathyCaptions(demo.coco_karpathy, demo.coco_images, "test",
                            build_transform("eval", model.config.img_size, mean_std="inception"), per_caption=True)
    step = max(1, len(data) // args.captions)
    samples = [data[i] for i in range(0, len(data), step)][: args.captions]
    images = torch.stack([s["image"] for s in samples]).float()
    ids, pad = tok([s["text"] for s in samples], max_len=24)
    for kind, words in WORDS.items():
        table = {tok.encode(w)[0]: w for w in words if len(tok.encode(w)) == 1}
        own, n = word_accuracy(model, tok, images, ids, pad, table)
        other, _ = word_accuracy(model, tok, images.roll(5, 0), ids, pad, table)
        print(f"{kind} words ({', '.join(sorted(table.values()))}; {n} captions): own image {own:.3f}, "
              f"another image {other:.3f}, chance {1 / len(table):.3f}")


if __name__ == "__main__":
    main()
