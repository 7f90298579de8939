"""VQAv2 as published: questions JSON, annotations JSON, COCO image folders.

Files (https://visualqa.org/download.html):

- ``v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json``:
  ``{"data_subtype": "train2014", "questions": [{"image_id", "question", "question_id"}, ...], ...}``
- ``v2_mscoco_{train2014,val2014}_annotations.json``: ``{"annotations": [{"question_id",
  "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers": [{"answer",
  "answer_confidence", "answer_id"} x 10]}, ...], ...}``
- images ``<image_root>/<subtype>/COCO_<subtype>_<image_id:012d>.jpg`` (test-dev2015 questions use
  the ``test2015`` images).

Answer vocabulary (:class:`AnswerVocab`): the official normalisation
(:func:`vlmoe.protocols.vqa.normalize_answer`) of each question's ``multiple_choice_answer`` over the
given annotation files, kept when seen at least ``min_count`` times (9 over train+val gives BEiT-3's
3,129 answers). Targets: every normalised answer among the 10 gets the VQA soft score of its count
(0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4), scattered into a dense ``vqa_targets`` vector.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlmoe.data._io import DataFormatError, load_image, load_json, load_jsonl, require
from vlmoe.io import atomic_write
from vlmoe.protocols.vqa import answer_scores, normalize_answer

__all__ = ["AnswerVocab", "VQAv2Dataset", "coco_image_path"]


def coco_image_path(image_root: str | os.PathLike, subtype: str, image_id: int) -> Path:
    """Path of a COCO image by split subtype and id (``test-dev2015`` lives in ``test2015``)."""
    folder = "test2015" if subtype.startswith("test") else subtype
    return Path(image_root) / folder / f"COCO_{folder}_{int(image_id):012d}.jpg"


class AnswerVocab:
    """The VQA answer vocabulary: normalised answer strings <-> label indices.

    Args:
        answers: the answers, in label order.
        source: the file it was read from (for messages).
    """

    def __init__(self, answers: Sequence[str], source: str | None = None):
        self.answers, self.source = list(answers), source
        self.index = {a: i for i, a in enumerate(self.answers)}
        if len(self.index) != len(self.answers):
            raise ValueError(f"{source or 'answer vocabulary'}: the answers have duplicates")

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: str) -> bool:
        return answer in self.index

    def __repr__(self) -> str:
        return f"AnswerVocab({len(self)} answers: {self.answers[:5]}...)"

    @classmethod
    def build(cls, annotation_files: Iterable[str | os.PathLike], min_count: int = 9) -> AnswerVocab:
        """Answers whose normalised ``multiple_choice_answer`` occurs >= ``min_count`` times.

        Ordered by decreasing count, then alphabetically (deterministic).
        """
        counts: Counter[str] = Counter()
        files = list(annotation_files)
        for f in files:
            for i, ann in enumerate(_annotations(f)):
                require(ann, ["multiple_choice_answer"], f"{f}: annotations[{i}]")
                counts[ann["multiple_choice_answer"]] += 1
        try:
            return cls.from_counts(counts, min_count)
        except ValueError:
            raise ValueError(f"no answer occurs {min_count}+ times in {list(map(str, files))}") from None

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_count: int = 9) -> AnswerVocab:
        """Vocabulary from raw answer counts (normalised here, counts of equal forms added up)."""
        normalised: Counter[str] = Counter()
        for answer, c in counts.items():
            normalised[normalize_answer(answer)] += c
        kept = sorted((a for a, c in normalised.items() if c >= min_count), key=lambda a: (-normalised[a], a))
        if not kept:
            raise ValueError(f"no answer occurs {min_count}+ times")
        return cls(kept)

    def save(self, path: str | os.PathLike) -> None:
        """Write BEiT-3's ``answer2label.txt`` format: one ``{"answer": ..., "label": i}`` per line."""
        with atomic_write(path, "w") as f:
            for i, a in enumerate(self.answers):
                f.write(json.dumps({"answer": a, "label": i}) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnswerVocab:
        """Read an ``answer2label.txt`` (JSON lines) or a JSON list of answers."""
        rows = load_jsonl(path)
        if not rows:
            raise DataFormatError(f"{path}: an empty answer vocabulary")
        if isinstance(rows[0], str):
            return cls(rows, source=str(path))
        answers: dict[int, str] = {}
        for i, r in enumerate(rows):
            require(r, ["answer", "label"], f"{path}: line {i + 1}")
            answers[int(r["label"])] = r["answer"]
        if sorted(answers) != list(range(len(answers))):
            raise DataFormatError(f"{path}: labels are not 0..{len(answers) - 1}")
        return cls([answers[i] for i in range(len(answers))], source=str(path))

    def targets(self, answers: Sequence[str]) -> torch.Tensor:
        """Dense soft-score vector ``(len(self),)`` for one question's ground-truth answers."""
        t = torch.zeros(len(self))
        for a, s in answer_scores(answers).items():
            if a in self.index:
                t[self.index[a]] = s
        return t


def _annotations(path: str | os.PathLike) -> list[dict[str, Any]]:
    data = load_json(path)
    if not isinstance(data, dict) or "annotations" not in data:
        raise DataFormatError(f"{path}: not a VQA annotation file (no top-level 'annotations' list)")
    return data["annotations"]


class VQAv2Dataset(Dataset):
    """One sample per question: image, question text, soft targets.

    Args:
        questions: a ``*_questions.json`` file.
        image_root: the folder holding ``train2014/``, ``val2014/``, ``test2015/``.
        annotations: the matching ``*_annotations.json`` (None for test splits).
        vocab: the answer vocabulary (an :class:`AnswerVocab` or an ``answer2label.txt`` path);
            required with annotations.
        transform: PIL image -> tensor.
        drop_unanswerable: drop questions none of whose answers is in the vocabulary (training).

    Samples: ``{"image", "text", "question_id", "image_id"}`` plus, with annotations,
    ``"vqa_targets"`` (float, ``len(vocab)``) and ``"answers"`` (the 10 raw strings).
    """

    def __init__(
        self,
        questions: str | os.PathLike,
        image_root: str | os.PathLike,
        annotations: str | os.PathLike | None = None,
        vocab: AnswerVocab | str | os.PathLike | None = None,
        transform: Callable[[Any], Any] | None = None,
        drop_unanswerable: bool = False,
    ):
        self.questions_file = Path(questions)
        self.image_root = Path(image_root)
        self.transform = transform
        q = load_json(questions)
        if not isinstance(q, dict) or "questions" not in q:
            raise DataFormatError(f"{questions}: not a VQA questions file (no top-level 'questions' list)")
        self.subtype = q.get("data_subtype", "")
        records = []
        for i, r in enumerate(q["questions"]):
            require(r, ["question_id", "image_id", "question"], f"{questions}: questions[{i}]")
            records.append(r)
        self.vocab = AnswerVocab.load(vocab) if isinstance(vocab, str | os.PathLike) else vocab
        self.annotations: dict[int, dict[str, Any]] | None = None
        if annotations is not None:
            if self.vocab is None:
                raise ValueError("VQAv2Dataset with annotations needs an answer vocabulary (vocab=...)")
            self.annotations = {}
            for i, a in enumerate(_annotations(annotations)):
                require(a, ["question_id", "answers"], f"{annotations}: annotations[{i}]")
                self.annotations[int(a["question_id"])] = a
            missing = [r["question_id"] for r in records if int(r["question_id"]) not in self.annotations]
            if missing:
                raise DataFormatError(
                    f"{annotations}: no annotation for {len(missing)} question(s) of "
                    f"{questions}, e.g. question_id {missing[:3]}"
                )
            if drop_unanswerable:
                kept = [r for r in records if self._answerable(self.annotations[int(r["question_id"])])]
                if records and not kept:
                    source = f" ({self.vocab.source})" if self.vocab.source else ""
                    raise DataFormatError(
                        f"{annotations}: none of the {len(records)} questions has an answer in the answer "
                        f"vocabulary{source} of {len(self.vocab)} answers, e.g. {self.vocab.answers[:3]}: "
                        "is it the vocabulary of another dataset?"
                    )
                records = kept
        self.records = records

    def _answerable(self, ann: dict[str, Any]) -> bool:
        return any(normalize_answer(a["answer"]) in self.vocab for a in ann["answers"])

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, index: int) -> Path:
        """Where the image of question ``index`` should be."""
        return coco_image_path(self.image_root, self.subtype, self.records[index]["image_id"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        where = f"{self.questions_file}: question_id {r['question_id']}"
        img = load_image(self.image_path(index), record=where)
        sample: dict[str, Any] = {
            "image": self.transform(img) if self.transform else img,
            "text": r["question"],
            "question_id": int(r["question_id"]),
            "image_id": int(r["image_id"]),
        }
        if self.annotations is not None:
            ann = self.annotations[int(r["question_id"])]
            answers = [a["answer"] for a in ann["answers"]]
            sample["vqa_targets"] = self.vocab.targets(answers)
            sample["answers"] = answers
        return sample
