"""The model configuration: one dataclass, named presets, keyword overrides, YAML / JSON round trip.

    cfg = VLMoEConfig.from_name("base_xmoe8", img_size=384, moe={"top_k": 1})
    cfg.to_yaml("my_model.yaml");  VLMoEConfig.from_file("my_model.yaml") == cfg

Every field is a plain scalar, string or list (the MoE settings a nested :class:`vlmoe.moe.MoEConfig`
stored as a mapping), so a config serialises to YAML / JSON and back unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlmoe.io import atomic_write_text
from vlmoe.moe import MoEConfig

MOE_MULTIWAY = ("per_modality", "shared")
MODALITIES = ("vision", "text")
_FLOAT_FIELDS = ("layernorm_eps", "drop_path_rate", "dropout", "attn_drop", "init_std")
LEGACY_HEAD_FIELDS = ("heads", "codebook_size")
"""Fields of configs written before heads moved out of the backbone (read by the export loader)."""


@dataclass
class VLMoEConfig:
    """Configuration of the multiway (MoE) transformer. Defaults are BEiT-3 base as released.

    MoE FFNs replace the dense FFNs of :attr:`moe_layer_indices`; how they meet multiway is
    ``moe_multiway``: ``per_modality`` gives the vision and the language FFN each its own expert pool
    (``moe`` for vision, ``moe_text`` or else ``moe`` for language); ``shared`` gives one pool
    (``moe``) that routes every token by content.
    """

    name: str = "custom"
    """Preset the config came from (informational)."""

    # --- modalities ---
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    """Branches to build: ``["vision", "text"]`` (multimodal), ``["vision"]`` (ImageNet, detection:
    no text embedding or text copies at all) or ``["text"]``."""

    # --- embeddings ---
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    max_text_positions: int = 1024
    """Rows of the text position table; positions start at row 2, so texts hold at most this - 2 tokens."""

    # --- transformer ---
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    subln: bool = True
    """Magneto sub-LN: LayerNorm inside attention (before the output projection) and inside the FFN."""
    layernorm_eps: float = 1e-5
    final_norm: bool = True
    """Final per-modality LayerNorm (BEiT-3 ``normalize_output``; its VQA / ImageNet models turn it off)."""
    drop_path_rate: float = 0.0
    """Stochastic depth, increasing linearly from 0 at the first block to this at the last."""
    dropout: float = 0.0
    attn_drop: float = 0.0
    init_std: float = 0.02
    magneto_init: bool = False
    """Magneto init for training from scratch: fc1/fc2/out-proj/v-proj weights x sqrt(log(2 depth))."""

    # --- multiway ---
    share_attention: bool = False
    """Paper variant: one attention (and its LayerNorms) for both modalities. Released BEiT-3: False."""
    vl_ffn_layers: int = 0
    """Paper variant: the top n blocks get a VL-FFN that image+text inputs use for all tokens."""

    # --- mixture of experts ---
    moe: MoEConfig | None = None
    """MoE layer config (vision pool, or the shared pool). None: a dense model."""
    moe_text: MoEConfig | None = None
    """``per_modality`` only: the language pool's config; None = same as ``moe``."""
    moe_layers: list[int] | None = None
    """Explicit MoE block indices (0-based); None uses ``moe_every``."""
    moe_every: int = 2
    """Every n-th block is MoE (blocks n-1, 2n-1, ... as torchscale's ``moe_freq``); 0 = none."""
    moe_multiway: str = "per_modality"

    # --- runtime ---
    grad_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory, costs one more forward)."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if isinstance(self.moe_text, dict):
            self.moe_text = MoEConfig.from_dict(self.moe_text)
        if self.moe_layers is not None:
            self.moe_layers = sorted(int(i) for i in self.moe_layers)
        mods = list(self.modalities) if isinstance(self.modalities, list | tuple) else [self.modalities]
        if not mods or any(m not in MODALITIES for m in mods) or len(set(mods)) != len(mods):
            raise ValueError(f"VLMoEConfig.modalities={self.modalities!r}: choose a non-empty subset of {MODALITIES}")
        self.modalities = [m for m in MODALITIES if m in mods]
        for name in _FLOAT_FIELDS:
            # YAML 1.1 reads `1e-5` (no dot) as a string; accept it as the number it means
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ValueError(f"VLMoEConfig.{name}={value!r}: not a number") from None

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"VLMoEConfig.{name}={getattr(self, name)!r}: {why}")

        for name in (
            "img_size",
            "patch_size",
            "in_chans",
            "vocab_size",
            "dim",
            "depth",
            "num_heads",
            "mlp_dim",
        ):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.dim % self.num_heads:
            raise bad("num_heads", f"must divide dim={self.dim}")
        if self.img_size % self.patch_size:
            raise bad("img_size", f"must be a multiple of patch_size={self.patch_size}")
        if self.max_text_positions < 3:
            raise bad("max_text_positions", "must be >= 3 (positions start at row 2)")
        if not 0 <= self.vl_ffn_layers <= self.depth:
            raise bad("vl_ffn_layers", f"must be in [0, depth={self.depth}]")
        if self.moe_multiway not in MOE_MULTIWAY:
            raise bad("moe_multiway", f"choose from {MOE_MULTIWAY}")
        if self.moe_every < 0:
            raise bad("moe_every", "must be >= 0")
        if self.moe_layers is not None:
            if len(set(self.moe_layers)) != len(self.moe_layers):
                raise bad("moe_layers", "has duplicates")
            out = [i for i in self.moe_layers if not 0 <= i < self.depth]
            if out:
                raise bad("moe_layers", f"indices {out} outside [0, depth={self.depth})")
        if self.moe_text is not None and self.moe_multiway != "per_modality":
            raise bad("moe_text", "only used with moe_multiway='per_modality'")
        for name in ("moe", "moe_text"):
            c = getattr(self, name)
            if c is not None and self.dim % c.heads:
                raise bad(name, f"MoE heads={c.heads} must divide dim={self.dim}")
        if len(self.modalities) < 2 and (self.vl_ffn_layers or self.moe_multiway == "shared" or self.moe_text):
            raise bad("modalities", "a single-modality model has no VL-FFN, shared pool or language pool")
        for name in ("drop_path_rate", "dropout", "attn_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad(name, "must be in [0, 1)")

    # ------------------------------------------------------------------ derived
    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def max_text_len(self) -> int:
        """Longest text the position table can embed."""
        return self.max_text_positions - 2

    @property
    def moe_layer_indices(self) -> list[int]:
        """Blocks whose FFNs are MoE layers (empty for a dense model)."""
        if self.moe is None:
            return []
        if self.moe_layers is not None:
            return list(self.moe_layers)
        if self.moe_every == 0:
            return []
        return [i for i in range(self.depth) if (i + 1) % self.moe_every == 0]

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layer_indices)

    @property
    def has_vision(self) -> bool:
        return "vision" in self.modalities

    @property
    def has_text(self) -> bool:
        return "text" in self.modalities

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VLMoEConfig:
        """A named preset with keyword overrides.

        A mapping given for ``moe`` / ``moe_text`` updates the preset's MoE config field by field
        (``moe={"top_k": 1}``); a :class:`MoEConfig` or ``None`` replaces it.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[name]).replace(**overrides)

    def replace(self, **changes: Any) -> VLMoEConfig:
        """A copy with some fields changed (validated again); dicts for ``moe*`` update field by field."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown VLMoEConfig field(s) {unknown}; known fields: {sorted(known)}")
        for key in ("moe", "moe_text"):
            value = changes.get(key)
            if isinstance(value, dict):
                base = getattr(self, key) or (self.moe if key == "moe_text" else None)
                changes[key] = base.replace(**value) if base is not None else MoEConfig.from_dict(value)
        return dataclasses.replace(self, **changes)

    def to_dict(self, full_moe: bool = True) -> dict[str, Any]:
        """Plain-data form. ``full_moe=False`` keeps only the expert shape and the MoE fields that
        differ from :class:`MoEConfig`'s defaults (compact preset files)."""
        d = dataclasses.asdict(self)
        if not full_moe:
            default = MoEConfig().to_dict()
            for key in ("moe", "moe_text"):
                if d[key] is not None:
                    keep = ("num_experts", "top_k", "ffn_dim")  # the shape, always spelled out
                    d[key] = {k: v for k, v in d[key].items() if k in keep or v != default.get(k)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMoEConfig:
        """A config from :meth:`to_dict` output (configs written before heads left the backbone may
        carry ``heads`` / ``codebook_size``; they describe a task model and are ignored here)."""
        d = {k: v for k, v in d.items() if k not in LEGACY_HEAD_FIELDS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VLMoEConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def to_yaml(self, path: str | Path | None = None, full_moe: bool = True) -> str:
        """The config as YAML; also written to ``path`` when given (see :meth:`to_dict`)."""
        text = yaml.safe_dump(self.to_dict(full_moe), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_file(cls, path: str | Path) -> VLMoEConfig:
        """Read a YAML or JSON config (a bare mapping, or ``{model: mapping, ...}`` as exports write)."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML/JSON: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            data = data["model"]
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of VLMoEConfig fields, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------- presets
def _moe(**kw: Any) -> MoEConfig:
    # BEiT-3 FFNs have a sub-LN; experts keep it so that a dense FFN copies into them exactly.
    return MoEConfig(**{"ffn_layernorm": True, **kw})


_TINY = VLMoEConfig(
    name="tiny",
    img_size=32,
    patch_size=8,
    vocab_size=128,
    max_text_positions=66,
    dim=64,
    depth=2,
    num_heads=2,
    mlp_dim=128,
)
_DEMO = _TINY.replace(name="demo", img_size=64, num_heads=8, init_std=0.125)
# the small MoE layers of the tiny and demo families: 4 experts per modality, top-2, in every block
_SMALL_MOE = _moe(num_experts=4, top_k=2, ffn_dim=128)
_SMALL_MHMOE = _moe(num_experts=4, top_k=2, ffn_dim=96, heads=2, router="xmoe")
_BASE = VLMoEConfig(name="base")
_LARGE = VLMoEConfig(name="large", dim=1024, depth=24, num_heads=16, mlp_dim=4096)

PRESETS: dict[str, VLMoEConfig] = {
    # tests: 32 px images, 4x4 patches of 8 px, vocabulary 128, 2 blocks of width 64
    "tiny": _TINY,
    "tiny_moe": _TINY.replace(name="tiny_moe", moe=_SMALL_MOE, moe_every=1),
    "tiny_mhmoe": _TINY.replace(name="tiny_mhmoe", moe=_SMALL_MHMOE, moe_every=1),
    # the demo models (easy-vqa's 64 px images at their own size, 8x8 patches of 8 px): tiny's 2 blocks
    # of width 64 with 8 heads, initialised at std dim ** -0.5 = 0.125. BEiT-3's 0.02 is calibrated for
    # width 768; at width 64 it leaves the attention logits ~40x smaller (q.k scales with std^2 * dim)
    # and the image-question interaction without a gradient for hundreds of steps (BENCHMARKS.md,
    # "Why the demo models did not look at the image")
    "demo": _DEMO,
    "demo_xmoe": _DEMO.replace(name="demo_xmoe", moe=_SMALL_MOE.replace(router="xmoe"), moe_every=1),
    "demo_mhmoe": _DEMO.replace(name="demo_mhmoe", moe=_SMALL_MHMOE, moe_every=1),
    # BEiT-3 as released (torchscale EncoderConfig of unilm beit3 modeling_utils)
    "base": _BASE,
    "large": _LARGE,
    # the BEiT-3 paper's layout: shared attention, VL-FFN in the top 3 blocks
    "base_paper": _BASE.replace(name="base_paper", share_attention=True, vl_ffn_layers=3),
    # MoE in every second block (blocks 1, 3, ..., 11), 8 experts per modality, top-2
    "base_moe8": _BASE.replace(name="base_moe8", moe=_moe(num_experts=8, top_k=2, ffn_dim=3072)),
    "base_xmoe8": _BASE.replace(name="base_xmoe8", moe=_moe(num_experts=8, top_k=2, ffn_dim=3072, router="xmoe")),
    # MH-MoE h=4 on the X-MoE router; expert width 3072 - 768/2 = 2688 gives the same FLOPs per token
    # as base_xmoe8 (head + merge projections included; arXiv 2411.16205 eq. 8). Its experts' hidden layer
    # (h x k sub-token rows of 2688 per token, 3.5x a top-2 layer's) is recomputed in backward, not kept:
    # -38 % peak memory for +5 % step time (BENCHMARKS.md, "MoE backbones against their FLOP ideal")
    "base_mhmoe8": _BASE.replace(
        name="base_mhmoe8",
        moe=_moe(num_experts=8, top_k=2, ffn_dim=2688, heads=4, router="xmoe", recompute_experts=True),
    ),
    "base_moe8_shared": _BASE.replace(
        name="base_moe8_shared", moe=_moe(num_experts=16, top_k=2, ffn_dim=3072), moe_multiway="shared"
    ),
    "large_xmoe8": _LARGE.replace(name="large_xmoe8", moe=_moe(num_experts=8, top_k=2, ffn_dim=4096, router="xmoe")),
}


def preset_yaml(name: str) -> str:
    """The text of ``configs/model/<name>.yaml``: the preset as YAML (compact MoE fields), written from
    :data:`PRESETS` (``tools/write_configs.py``), so the preset has one source."""
    config = PRESETS[name]
    head = f'# model preset `{name}`: vlmoe.models.create_model("{name}") builds the same model.\n'
    if config.moe is not None or config.moe_text is not None:
        head += "# MoE fields left out take the vlmoe.moe.MoEConfig defaults.\n"
    return head + config.to_yaml(full_moe=False)


def list_presets() -> list[str]:
    return sorted(PRESETS)
