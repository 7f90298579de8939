"""vlmoe: multimodal Mixture-of-Experts transformers.

    import vlmoe
    model = vlmoe.create_model("base_xmoe8")          # presets: vlmoe.list_models()
    predictor = vlmoe.load("out/vqa")                 # an exported (finetuned) model: .answer / .caption / ...
    layer = vlmoe.MoE(768, vlmoe.MoEConfig(num_experts=8, top_k=2))

The names below are imported on first use, so ``import vlmoe`` (and the ``vlmoe`` command) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "MoE": "vlmoe.moe",
    "MoEConfig": "vlmoe.moe",
    "MoEAux": "vlmoe.moe",
    "VLMoE": "vlmoe.models",
    "VLMoEConfig": "vlmoe.models",
    "create_model": "vlmoe.models",
    "list_models": "vlmoe.models",
    "load_beit3": "vlmoe.models",
    "load_pretrained": "vlmoe.models",
    "save_pretrained": "vlmoe.models",
    "build_demo": "vlmoe.data",
    "build_tokenizer": "vlmoe.data",
    "load": "vlmoe.inference",
    "Predictor": "vlmoe.inference",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmoe' has no attribute {name!r}")
