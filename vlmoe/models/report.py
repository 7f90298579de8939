"""The report of a checkpoint load: what was loaded, resized, upcycled, missing or unused."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["LoadReport"]


def _collapse(keys: list[str]) -> list[str]:
    """Group keys that differ only in the block index: ``blocks.*.attn.qkv.text.weight (x12)``."""
    groups: dict[str, int] = defaultdict(int)
    for k in keys:
        groups[re.sub(r"(^|\.)(blocks|layers)\.\d+\.", r"\1\2.*.", k)] += 1
    return [g if n == 1 else f"{g} (x{n})" for g, n in groups.items()]


@dataclass
class LoadReport:
    """What loading a checkpoint did.

    Attributes:
        source: where the weights came from.
        format: ``beit3``, ``timm`` or ``vlmoe``.
        missing: model parameters the checkpoint did not provide (left at their initialisation).
        unexpected: checkpoint keys (source names) with no place in the model.
        fresh: parameters initialised fresh by design (routers, MH-MoE projections) when upcycling.
        upcycled: MoE layers filled from a dense FFN, with a note.
        resized: position tables resized or truncated, with a note.
        skipped: model parameters this checkpoint format cannot hold (the text branch for a timm
            ViT), left at their initialisation and not counted against the load.
        branch_skipped: checkpoint keys of the branch a single-modality model does not build.
        head_mismatch: head tensors of another shape than the model's (left at init).
        loaded_numel / expected_numel: parameter elements loaded / that the checkpoint was expected
            to provide (every parameter that is neither fresh by design nor skipped).
    """

    source: str
    format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    upcycled: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    branch_skipped: list[str] = field(default_factory=list)
    head_mismatch: list[str] = field(default_factory=list)
    loaded_numel: int = 0
    expected_numel: int = 0

    @property
    def share(self) -> float:
        """Fraction of the expected parameter elements the checkpoint provided (1.0 if none expected)."""
        return self.loaded_numel / self.expected_numel if self.expected_numel else 1.0

    @property
    def complete(self) -> bool:
        """Every parameter loaded (or fresh by design) and every checkpoint key used."""
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        lines = [f"loaded {self.format} checkpoint {self.source}: {self.share:.1%} of the expected weights"]
        for title, items in (
            ("resized", self.resized),
            ("upcycled (dense FFN -> experts)", self.upcycled),
            ("initialised fresh by design", _collapse(self.fresh)),
            ("missing from the checkpoint (left at init)", _collapse(self.missing)),
            ("unused checkpoint keys", _collapse(self.unexpected)),
            (f"not in a {self.format} checkpoint (left at init)", _collapse(self.skipped)),
            ("keys of a branch this single-modality model does not have (skipped)", _collapse(self.branch_skipped)),
            ("head tensors of another shape", self.head_mismatch),
        ):
            if items:
                lines.append(f"  {title}: {len(items)}")
                lines += [f"    {x}" for x in items]
        if self.complete:
            lines.append("  every parameter loaded")
        return "\n".join(lines)


