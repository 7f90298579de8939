"""Top-k classification accuracy (ImageNet's top-1 / top-5)."""

from __future__ import annotations

from typing import Any

from .base import Evaluator

__all__ = ["ClassificationEvaluator"]


class ClassificationEvaluator(Evaluator):
    """Records: ``{"index": sample index, "label": int, "topk": [best class, second, ...]}``.

    Args:
        ks: the k of each reported ``top<k>`` (a record's ``topk`` must hold at least ``max(ks)``
            classes; with fewer classes than k every prediction is a top-k hit).
        num_classes: classes of the task (for checking labels), or None.
    """

    id_key = "index"

    def __init__(self, ks: tuple[int, ...] = (1, 5), num_classes: int | None = None) -> None:
        self.ks, self.num_classes = tuple(ks), num_classes
        super().__init__()

    def check(self, record: dict[str, Any]) -> None:
        label = record.get("label")
        if self.num_classes is not None and not (isinstance(label, int) and 0 <= label < self.num_classes):
            raise ValueError(f"sample {record['index']}: label {label!r} outside 0..{self.num_classes - 1} "
                             "(labels of another dataset?)")

    def compute(self) -> dict[str, float]:
        records = self.records
        if not records:
            raise ValueError("no predictions to score")
        out = {}
        for k in self.ks:
            hits = [r["label"] in list(r["topk"])[:k] for r in records]
            out[f"top{k}"] = sum(hits) / len(hits)
        out["num_samples"] = float(len(records))
        return out
