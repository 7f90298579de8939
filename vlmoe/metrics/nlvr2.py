"""NLVR2 accuracy and consistency (lil-lab/nlvr ``nlvr2/eval/metrics.py``).

Consistency: the share of sentences (consistency groups, :func:`vlmoe.protocols.nlvr2.consistency_group`)
whose every example is predicted right.
"""

from __future__ import annotations

from typing import Any

from vlmoe.protocols.nlvr2 import consistency_group

from .base import Evaluator

__all__ = ["NLVR2Evaluator"]


class NLVR2Evaluator(Evaluator):
    """Records: ``{"identifier": "dev-850-0-1", "prediction": 0 | 1, "label": 0 | 1}`` (1 = True)."""

    id_key = "identifier"

    def check(self, record: dict[str, Any]) -> None:
        ident = record["identifier"]
        for field in ("prediction", "label"):
            if record.get(field) not in (0, 1, True, False):
                raise ValueError(f"NLVR2 record {ident}: {field!r} must be 0/1 (False/True), got {record.get(field)!r}")
        consistency_group(str(ident))  # raises, naming the identifier, when it is not NLVR2's form

    def compute(self) -> dict[str, float]:
        records = self.records
        if not records:
            raise ValueError("no NLVR2 predictions to score")
        right = [int(r["prediction"]) == int(r["label"]) for r in records]
        groups: dict[str, bool] = {}
        for r, ok in zip(records, right):
            g = consistency_group(str(r["identifier"]))
            groups[g] = groups.get(g, True) and ok
        return {
            "accuracy": sum(right) / len(right),
            "consistency": sum(groups.values()) / len(groups),
            "num_examples": float(len(records)),
        }
