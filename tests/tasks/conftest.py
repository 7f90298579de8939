"""Fixtures for the task tests: tiny shards of real easy-vqa images, a trainer factory, MoE variants."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from vlmoe.data.shards import ShardWriter
from vlmoe.data.tokenizers import ClipBPETokenizer
from vlmoe.tasks import PretrainDataModule, PretrainTask

SHAPES = ("circle", "rectangle", "triangle")

# Every MoE family the backbone supports, as model overrides of the `tiny` preset (2 blocks, width 64).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("tiny", {}),
    "topk": ("tiny_moe", {}),
    "xmoe": ("tiny_moe", {"moe": {"router": "xmoe"}}),
    "mhmoe": ("tiny_mhmoe", {}),
    "hmoe": (
        "tiny_moe",
        {"moe": {"expert_sizes": [32, 64, 96, 128], "top_p": 0.6, "balance_loss": "p_penalty",
                 "entropy_coef": 0.01, "ffn_layernorm": False}},
    ),
    "stratified": ("tiny_moe", {"moe": {"num_experts": 4, "top_k": 1, "strata": [2, 2]}}),
}


def _jpeg(png: bytes, size: int) -> bytes:
    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB").resize((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


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
                    jpg = _jpeg(Path(paths[i]).read_bytes(), 32)
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

    def make(variant: str = "mhmoe", **kw: Any) -> PretrainTask:
        preset, overrides = VARIANTS.get(variant, (variant, {}))
        kw.setdefault("vocab_size", tokenizer.vocab_size)
        kw.setdefault("warmup_steps", 2)
        kw.setdefault("stats_every", 2)
        kw.setdefault("model_overrides", overrides)
        return PretrainTask(preset, **kw)

    return make


def trainer(tmp_path: Path, **kw: Any) -> pl.Trainer:
    """A quiet CPU trainer writing CSV logs under ``tmp_path``."""
    from lightning.pytorch.loggers import CSVLogger

    from vlmoe.tasks import AtomicCheckpointIO

    args: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        plugins=[AtomicCheckpointIO()],
    )
    args.update(kw)
    return pl.Trainer(**args)


@pytest.fixture(autouse=True)
def _threads():
    # tests share two cores with everything else: one thread avoids oversubscription stalls
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
