"""Building blocks of the multiway backbone (pure torch + timm).

- :mod:`.embeddings` - patch embedding with CLS / MIM mask token, text embedding, BEiT-3 position
  tables (positions from row 2), bicubic resize of the vision positions;
- :mod:`.attention` - multiway self-attention (fused q/k/v per modality, SDPA, sub-LN) and masks;
- :mod:`.kv_cache` - the key / value cache of incremental decoding;
- :mod:`.multiway` - :class:`Multiway` / :class:`Shared` wrappers over (vision, text) streams, the
  FFN slot :class:`MultiwayFFN` (dense or MoE per modality, or one shared expert pool);
- :mod:`.ffn` - the dense BEiT-3 FFN (timm ``Mlp`` with sub-LN, GELU in float32).
"""

from .attention import MultiwayAttention, build_attention_mask
from .embeddings import (
    POSITION_OFFSET,
    PositionEmbedding,
    TextEmbedding,
    VisionEmbedding,
    resample_vision_positions,
)
from .ffn import FeedForward, GELUFp32
from .kv_cache import KVCache, LayerKV
from .multiway import MODALITIES, Multiway, MultiwayDropPath, MultiwayFFN, Shared, Stream, check_modalities

__all__ = [
    "KVCache",
    "LayerKV",
    "MODALITIES",
    "POSITION_OFFSET",
    "FeedForward",
    "GELUFp32",
    "Multiway",
    "MultiwayAttention",
    "MultiwayDropPath",
    "MultiwayFFN",
    "PositionEmbedding",
    "Shared",
    "Stream",
    "TextEmbedding",
    "VisionEmbedding",
    "build_attention_mask",
    "check_modalities",
    "resample_vision_positions",
]
