"""Dense -> MoE upcycling (a dense FFN in the checkpoint, an MoE layer in the model)
-------------------------------------------------------------------------------------
Every expert of the layer's pool receives a copy of the dense FFN (``fc1``, sub-LN, ``fc2``), plus
optional Gaussian noise on ``w1``/``w2`` (``upcycle_noise``) to break the symmetry; routers keep their
fresh initialisation. What then holds:

- **top-1 with** ``normalize_gates=True``: every gate is exactly 1 and every expert is the dense
  FFN, so each MoE layer - and the model - computes the dense model's function (equal up to float
  rounding of the grouped kernels; tested at 1e-5). The default top-1 gate (Switch) instead scales
  the output by the raw router probability (about 1/E at init), which does *not* preserve it.
- **top-k > 1** with normalised gates (the default for k > 1): the k gates sum to 1 and the experts
  are equal, so the output is again the dense FFN's (up to rounding of the weighted sum).
- everywhere, *text padding* positions differ: an MoE layer never routes padding (its output there
  is 0) while a dense FFN computes it; real tokens never attend to padding, so they are unaffected.
- **per-modality pools** take the vision FFN (``A``) into the vision pool and the language FFN
  (``B``) into the language pool; the equalities above hold per modality.
- **a shared pool** (``moe_multiway="shared"``) gets the vision FFN in its first ceil(E/2) experts
  and the language FFN in the rest; tokens are routed by content, so the dense function is *not*
  preserved (a token may reach the other modality's copy).
- **MH-MoE** (``heads = h > 1``): experts act on d/h-wide sub-tokens, so a d-wide dense FFN cannot be
  copied into them; the head and merge projections are set to the identity (the layer is then
  exactly "split into h sub-tokens -> experts -> concatenate"), the experts keep their fresh
  initialisation, and the dense function is not preserved.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from vlmoe.moe import GroupedExperts, MoE

from .backbone import VLMoE
from .report import LoadReport

__all__: list[str] = []


def _moe_target(model: VLMoE, layer: int, way: str) -> tuple[MoE, list[int] | None] | None:
    """The MoE (and expert subset) a dense FFN ``blocks.layer.mlp.way`` upcycles into, if any."""
    if layer >= len(model.blocks):
        return None
    ffn = model.blocks[layer].mlp
    if isinstance(ffn.shared, MoE):
        if way == "vl":
            return None
        E = ffn.shared.num_experts
        half = (E + 1) // 2
        return ffn.shared, (list(range(half)) if way == "vision" else list(range(half, E)) or [E - 1])
    target = getattr(ffn, way, None)
    return (target, None) if isinstance(target, MoE) else None


@torch.no_grad()
def _upcycle(
    model: VLMoE,
    layer: int,
    way: str,
    parts: dict[str, Tensor],
    noise: float,
    report: LoadReport,
    source: str,
) -> set[str]:
    moe, experts = _moe_target(model, layer, way)
    prefix = f"blocks.{layer}.mlp.{'shared' if isinstance(model.blocks[layer].mlp.shared, MoE) else way}"
    needed = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    if not needed <= set(parts):
        raise ValueError(
            f"{source}: the dense FFN blocks.{layer}.mlp.{way} is incomplete (has {sorted(parts)}); cannot upcycle"
        )
    ex = moe.experts
    if not isinstance(ex, GroupedExperts):
        raise ValueError(
            f"{source}: cannot upcycle blocks.{layer}.mlp.{way} into heterogeneous experts "
            "(MoEConfig.expert_sizes): their widths differ from the dense FFN's"
        )
    # routers (and Stratified MoE pass norms) start fresh; experts and projections are set below
    for name, _ in moe.named_parameters():
        if not name.startswith(("experts.", "head_proj.", "merge_proj.")) and f"{prefix}.{name}" not in report.fresh:
            report.fresh.append(f"{prefix}.{name}")
    covered = set()
    if moe.head_proj is not None:
        # identity projections make "split into h sub-tokens -> experts -> concatenate" exact
        eye = torch.eye(moe.dim, dtype=moe.head_proj.weight.dtype, device=moe.head_proj.weight.device)
        for pname in ("head_proj", "merge_proj"):
            proj = getattr(moe, pname)
            proj.weight.copy_(eye)
            proj.bias.zero_()
            covered |= {f"{prefix}.{pname}.weight", f"{prefix}.{pname}.bias"}
    if moe.config.heads > 1:
        # MH-MoE: experts see d/h-wide sub-tokens; the d-wide dense FFN does not fit into them.
        report.upcycled.append(
            f"{prefix}: MH-MoE (h={moe.config.heads}) head/merge projections set to identity; experts keep "
            "their initialisation (d/h-wide experts cannot hold the d-wide dense FFN)"
        )
        report.fresh += [
            f"{prefix}.experts.{n}" for n, _ in ex.named_parameters() if f"{prefix}.experts.{n}" not in report.fresh
        ]
        return covered
    has_ln = "norm.weight" in parts
    if has_ln != (ex.ln_weight is not None):
        raise ValueError(
            f"{source}: cannot upcycle blocks.{layer}.mlp.{way}: the dense FFN "
            f"{'has' if has_ln else 'has no'} sub-LN but the experts "
            f"{'have' if ex.ln_weight is not None else 'have no'}"
            " (set MoEConfig.ffn_layernorm to match VLMoEConfig.subln)"
        )
    if parts["fc1.weight"].shape != (ex.ffn_dim, ex.dim):
        raise ValueError(
            f"{source}: cannot upcycle blocks.{layer}.mlp.{way}: dense fc1.weight has shape "
            f"{tuple(parts['fc1.weight'].shape)} but the experts are {ex.dim} -> {ex.ffn_dim} "
            "(MoEConfig.ffn_dim)"
        )
    fc1 = SimpleNamespace(weight=parts["fc1.weight"], bias=parts["fc1.bias"])
    fc2 = SimpleNamespace(weight=parts["fc2.weight"], bias=parts["fc2.bias"])
    ln = SimpleNamespace(weight=parts["norm.weight"], bias=parts["norm.bias"]) if has_ln else None
    ex.load_dense(fc1, fc2, ln, experts=experts, noise_std=noise)
    n = ex.num_experts if experts is None else len(experts)
    which = "" if experts is None else f" (experts {experts[0]}-{experts[-1]})"
    note = f", noise std {noise}" if noise else ""
    report.upcycled.append(f"{prefix}{which}: {n} expert(s) <- dense {way} FFN{note}")
    return covered | {f"{prefix}.experts.{n}" for n, _ in ex.named_parameters()}
