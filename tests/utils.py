"""Helpers shared by the tests: MoE variants of the tiny model, a quiet trainer, easy-vqa images."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from PIL import Image

from vlmoe.data import build_tokenizer, preprocess_dict

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

TOK = build_tokenizer("clip")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def easy_vqa_pngs(n: int, split: str = "train") -> list[bytes]:
    """The first ``n`` real easy-vqa images (PNG bytes), in id order."""
    import easy_vqa

    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    return [Path(paths[i]).read_bytes() for i in sorted(paths)[:n]]


def to_jpeg(png: bytes, size: int | None = None) -> bytes:
    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        if size:
            im = im.resize((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        return buf.getvalue()


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




def export_tiny_model(tmp_path: Path, kind: str) -> Path:
    """A random tiny model of one task (``vqa``, ``caption``, ``classify``, ``detect``, ``nlvr2``,
    ``retrieval``) exported to ``tmp_path / kind``: 32-pixel images, the CLIP tokenizer."""
    import torch

    from vlmoe.models import (
        VLMoEForCaptioning,
        VLMoEForDetection,
        VLMoEForImageClassification,
        VLMoEForNLVR2,
        VLMoEForRetrieval,
        VLMoEForVQA,
        create_model,
        save_pretrained,
    )

    torch.manual_seed(0)
    vision_only = kind in ("classify", "detect")
    bb = create_model("tiny_moe", vocab_size=TOK.vocab_size, img_size=32,
                      **({"modalities": ["vision"], "final_norm": False} if vision_only else {}))
    model = {
        "vqa": lambda: VLMoEForVQA(bb, ["red", "blue", "yes", "no"]),
        "caption": lambda: VLMoEForCaptioning(bb, TOK.bos_id, TOK.eos_id, TOK.mask_id),
        "classify": lambda: VLMoEForImageClassification(bb, class_names=["circle", "square", "triangle"]),
        "detect": lambda: VLMoEForDetection(bb, ["circle", "square"], image_size=32, window_size=2, out_channels=16,
                                            detector_options={"head_channels": 16, "fc_dim": 32}),
        "nlvr2": lambda: VLMoEForNLVR2(bb),
        "retrieval": lambda: VLMoEForRetrieval(bb),
    }[kind]()
    out = tmp_path / kind
    save_pretrained(model, out, preprocess=preprocess_dict(32, "inception", None if vision_only else "clip", 16))
    return out
