"""Shared fixtures: real images from the easy-vqa package, the tokenizer, the demo build."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from vlmoe.data import build_demo
from vlmoe.data.tokenizers import ClipBPETokenizer


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


@pytest.fixture(scope="session")
def tokenizer() -> ClipBPETokenizer:
    return ClipBPETokenizer()


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """One demo build shared by the whole session."""
    return build_demo(tmp_path_factory.mktemp("demo") / "demo")
