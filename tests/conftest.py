"""Fixtures shared by every test folder: tiny shards of real easy-vqa images, the tokenizer, small
pretraining data modules and tasks of every MoE variant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.utils import VARIANTS, easy_vqa_pngs, to_jpeg
from vlmoe.data.shards import ShardWriter
from vlmoe.data.tokenizers import ClipBPETokenizer


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Train (2 shards x 12) and val (1 shard x 12) shards per stream from real easy-vqa images."""
    import easy_vqa

    root = tmp_path_factory.mktemp("shards")
    paths = easy_vqa.get_train_image_paths()
    questions, answers, image_ids = easy_vqa.get_train_questions()
    qa: dict[int, list[str]] = {}
    for q, a, i in zip(questions, answers, image_ids):
        qa.setdefault(i, []).append(f"{q} {a}.")
    ids = sorted(paths)[:36]
    out = {}
    for split, chunk, per_shard in (("train", ids[:24], 12), ("val", ids[24:], 12)):
        for stream in ("pairs", "images", "texts"):
            with ShardWriter(root / split / stream / f"{stream}-%06d.tar", maxcount=per_shard) as sink:
                for n, i in enumerate(chunk):
                    jpg = to_jpeg(Path(paths[i]).read_bytes(), 32)
                    words = qa.get(i, ["a shape."])
                    key = f"{n:09d}"
                    if stream == "pairs":
                        sink.write({"__key__": key, "jpg": jpg, "txt": words[0]})
                    elif stream == "images":
                        sink.write({"__key__": key, "jpg": jpg, "cls": n % 3})
                    else:
                        sink.write({"__key__": key, "txt": " ".join(words[:3])})
            count = len(sink.paths)
            names = f"{{000000..{count - 1:06d}}}" if count > 1 else "000000"
            out[f"{split}_{stream}"] = str(root / split / stream / f"{stream}-{names}.tar")
    return out


@pytest.fixture(scope="session")
def tokenizer() -> ClipBPETokenizer:
    return ClipBPETokenizer()


@pytest.fixture
def make_data(shards, tokenizer):
    """``make_data(**overrides)`` -> a small PretrainDataModule over the tiny shards (6 samples a step)."""
    from vlmoe.tasks import PretrainDataModule

    def make(**kw: Any) -> PretrainDataModule:
        args = dict(
            pair_shards=shards["train_pairs"],
            image_shards=shards["train_images"],
            text_shards=shards["train_texts"],
            val_pair_shards=shards["val_pairs"],
            val_image_shards=shards["val_images"],
            val_text_shards=shards["val_texts"],
            batch_size=6,
            max_len=16,
            num_workers=0,
            shuffle=0,
            samples_per_epoch=24,
            val_samples=12,
        )
        args.update(kw)
        dm = PretrainDataModule(**args)
        dm.tokenizer = tokenizer  # share the session's tokenizer (building one costs seconds)
        return dm

    return make


@pytest.fixture
def make_task(tokenizer):
    """``make_task(variant_or_preset, **kwargs)`` -> a PretrainTask sized for the CLIP vocabulary."""
    from vlmoe.tasks import PretrainTask

    def make(variant: str = "mhmoe", **kw: Any) -> PretrainTask:
        preset, overrides = VARIANTS.get(variant, (variant, {}))
        kw.setdefault("vocab_size", tokenizer.vocab_size)
        kw.setdefault("warmup_steps", 2)
        kw.setdefault("stats_every", 2)
        kw.setdefault("model_overrides", overrides)
        return PretrainTask(preset, **kw)

    return make


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """One demo build (every format, from the easy-vqa package) shared by the whole session."""
    from vlmoe.data import build_demo

    return build_demo(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture
def perturb():
    """Give every parameter a random value (norms and biases are 1 / 0 at init and would hide swaps)."""
    import torch

    @torch.no_grad()
    def _perturb(model, scale: float = 0.1):
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        return model

    return _perturb


@pytest.fixture
def tiny_batch():
    """Inputs for the ``tiny`` presets: 2 images 32x32, 2 texts of 7 tokens, the second padded after 4."""
    import torch

    image = torch.randn(2, 3, 32, 32)
    ids = torch.randint(0, 128, (2, 7))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    return image, ids, pad


@pytest.fixture(scope="session")
def pngs() -> list[bytes]:
    """Twelve real easy-vqa images (PNG bytes)."""
    return easy_vqa_pngs(12)
