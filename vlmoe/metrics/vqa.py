"""VQA accuracy as the official evaluator computes it (the rules: :mod:`vlmoe.protocols.vqa`):
:class:`VQAEvaluator` over an evaluation set, and EvalAI's submission format."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlmoe.io import atomic_write_json
from vlmoe.protocols.vqa import (
    ARTICLES,
    CONTRACTIONS,
    NUMBER_WORDS,
    PUNCTUATION,
    answer_scores,
    clean_whitespace,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    soft_score,
    vqa_accuracy,
)

from .base import Evaluator

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "VQAEvaluator",
    "answer_scores",
    "clean_whitespace",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "read_vqa_ground_truth",
    "soft_score",
    "vqa_accuracy",
    "write_vqa_submission",
]


# ---------------------------------------------------------------------------------------------- evaluator


def read_vqa_ground_truth(annotations: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """``{question_id: {"answers": [10 strings], "answer_type", "question_type"}}`` of a VQAv2
    ``*_annotations.json`` file."""
    path = Path(annotations)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"VQA annotations {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: not a VQA annotation file (no top-level 'annotations' list)")
    gt = {}
    for i, a in enumerate(data["annotations"]):
        try:
            gt[int(a["question_id"])] = {
                "answers": [x["answer"] for x in a["answers"]],
                "answer_type": a.get("answer_type", "other"),
                "question_type": a.get("question_type", ""),
            }
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: annotations[{i}] lacks {e}") from None
    return gt


class VQAEvaluator(Evaluator):
    """The official VQA accuracy over an evaluation set: overall and per answer type (``yes/no``,
    ``number``, ``other``), as the official evaluator reports it.

    Records: ``{"question_id": int, "answer": str}`` (one per question; padding duplicates ignored).

    Args:
        ground_truth: :func:`read_vqa_ground_truth` output, or the annotations file; None for test
            splits (no scores, only :meth:`submission`).
        source: the annotations' name for messages.
    """

    id_key = "question_id"

    def __init__(self, ground_truth: dict[int, dict[str, Any]] | str | os.PathLike | None = None,
                 source: str = "") -> None:
        if isinstance(ground_truth, str | os.PathLike):
            source = source or str(ground_truth)
            ground_truth = read_vqa_ground_truth(ground_truth)
        self.ground_truth = ground_truth
        self.source = source or "the ground truth"
        super().__init__()

    def key(self, record: dict[str, Any]) -> int:
        return int(super().key(record))

    def check(self, record: dict[str, Any]) -> None:
        qid = record["question_id"]
        if not isinstance(record.get("answer"), str):
            got = record.get("answer")
            raise ValueError(f"VQA record for question_id {qid}: 'answer' must be a string, got {got!r}")
        if self.ground_truth is not None and int(qid) not in self.ground_truth:
            raise ValueError(f"question_id {qid} is not in {self.source} (predictions of another split?)")

    def compute(self) -> dict[str, float]:
        """``accuracy`` (0..1; the official figure is ``round(100 * accuracy, 2)``), ``accuracy/<type>``
        per answer type, ``num_questions`` and ``coverage`` (the share of the ground truth scored)."""
        if self.ground_truth is None:
            raise ValueError("this VQA split has no annotations: write the submission file instead")
        records = self.records
        if not records:
            raise ValueError("no VQA predictions to score")
        by_type: dict[str, list[float]] = {}
        accs = []
        for r in records:
            gt = self.ground_truth[int(r["question_id"])]
            acc = vqa_accuracy(r["answer"], gt["answers"])
            accs.append(acc)
            by_type.setdefault(gt["answer_type"], []).append(acc)
        out = {"accuracy": sum(accs) / len(accs)}
        for t, values in sorted(by_type.items()):
            out[f"accuracy/{t}"] = sum(values) / len(values)
        out["num_questions"] = float(len(records))
        out["coverage"] = len(records) / len(self.ground_truth)
        return out

    def per_question_type(self) -> dict[str, float]:
        """Accuracy per question type (the official evaluator's third breakdown)."""
        groups: dict[str, list[float]] = {}
        for r in self.records:
            gt = self.ground_truth[int(r["question_id"])]
            groups.setdefault(gt["question_type"], []).append(vqa_accuracy(r["answer"], gt["answers"]))
        return {t: sum(v) / len(v) for t, v in sorted(groups.items())}

    def submission(self) -> list[dict[str, Any]]:
        """The EvalAI results list ``[{"question_id", "answer"}]``, one per question, in id order."""
        return [{"question_id": int(r["question_id"]), "answer": r["answer"]} for r in self.records]


def write_vqa_submission(
    records: Iterable[dict[str, Any]], path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write an EvalAI VQA results file (``[{"question_id", "answer"}]``) atomically."""
    rows = [{"question_id": int(r["question_id"]), "answer": str(r["answer"])} for r in records]
    return atomic_write_json(path, rows, overwrite=overwrite)
