"""The VQA, NLVR2 and classification evaluators on crafted predictions with hand-computed scores."""

from __future__ import annotations

import json

import pytest

from vlmoe.metrics.classification import ClassificationEvaluator
from vlmoe.metrics.nlvr2 import NLVR2Evaluator
from vlmoe.metrics.vqa import VQAEvaluator, read_vqa_ground_truth, write_vqa_submission


def _gt():
    # 10 human answers each; scores by the leave-one-out rule: k matching answers -> 0 / .3 / .6 / .9 / 1
    return {
        1: {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is there a"},
        2: {"answers": ["no"] * 7 + ["yes"] * 3, "answer_type": "yes/no", "question_type": "is there a"},
        3: {"answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number", "question_type": "how many"},
        4: {"answers": ["red"] * 1 + ["blue"] * 9, "answer_type": "other", "question_type": "what color"},
        5: {"answers": ["a cat"] * 4 + ["dog"] * 6, "answer_type": "other", "question_type": "what is"},
    }


def test_vqa_accuracy_overall_and_per_answer_type() -> None:
    ev = VQAEvaluator(_gt())
    ev.update([
        {"question_id": 1, "answer": "yes"},   # 1.0
        {"question_id": 2, "answer": "yes"},   # 3 of 10 -> 0.9
        {"question_id": 3, "answer": "two"},   # normalised to "2" (answers disagree): 2 of 10 -> 0.6
        {"question_id": 4, "answer": "red"},   # 1 of 10 -> 0.3
        {"question_id": 5, "answer": "cat"},   # "a cat" -> "cat" after the article rule: 4 -> 1.0
        {"question_id": 2, "answer": "no"},    # a padding duplicate: ignored
    ])
    m = ev.compute()
    assert m["accuracy"] == pytest.approx((1 + 0.9 + 0.6 + 0.3 + 1.0) / 5)
    assert m["accuracy/yes/no"] == pytest.approx(0.95) and m["accuracy/number"] == pytest.approx(0.6)
    assert m["accuracy/other"] == pytest.approx(0.65) and m["num_questions"] == 5 and m["coverage"] == 1.0
    assert ev.per_question_type()["is there a"] == pytest.approx(0.95)


def test_vqa_files_and_bad_records(tmp_path) -> None:
    ann = {"annotations": [{"question_id": q, "answer_type": g["answer_type"], "question_type": g["question_type"],
                            "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(g["answers"])]}
                           for q, g in _gt().items()]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    assert read_vqa_ground_truth(tmp_path / "ann.json") == _gt()
    ev = VQAEvaluator(tmp_path / "ann.json")
    with pytest.raises(ValueError, match=r"question_id 99 is not in .*ann\.json"):
        ev.update([{"question_id": 99, "answer": "x"}])
    with pytest.raises(ValueError, match="'answer' must be a string"):
        ev.update([{"question_id": 1, "answer": 3}])
    ev.update([{"question_id": 3, "answer": "3"}, {"question_id": 1, "answer": "yes"}])
    out = write_vqa_submission(ev.submission(), tmp_path / "sub.json")
    assert json.loads(out.read_text()) == [{"question_id": 1, "answer": "yes"}, {"question_id": 3, "answer": "3"}]
    with pytest.raises(FileExistsError):
        write_vqa_submission(ev.submission(), tmp_path / "sub.json")
    (tmp_path / "bad.json").write_text('{"questions": []}')
    with pytest.raises(ValueError, match="not a VQA annotation file"):
        read_vqa_ground_truth(tmp_path / "bad.json")


def test_nlvr2_accuracy_and_consistency() -> None:
    ev = NLVR2Evaluator()
    rows = [  # sentence 1: all right; sentence 2: one wrong; sentence 3 (one example): right
        ("dev-1-0-0", 1, 1), ("dev-1-1-0", 0, 0), ("dev-1-2-0", 1, 1),
        ("dev-2-0-1", 1, 1), ("dev-2-1-1", 1, 0),
        ("dev-3-0-0", 0, 0),
    ]
    ev.update([{"identifier": i, "prediction": p, "label": y} for i, p, y in rows])
    assert ev.compute() == {"accuracy": 5 / 6, "consistency": 2 / 3, "num_examples": 6.0}
    with pytest.raises(ValueError, match="dev-9-0-0: 'label' must be 0/1"):
        ev.update([{"identifier": "dev-9-0-0", "prediction": 1, "label": "maybe"}])
    with pytest.raises(ValueError, match="4 dash-separated fields"):
        ev.update([{"identifier": "dev-9", "prediction": 1, "label": 1}])


def test_top1_top5() -> None:
    ev = ClassificationEvaluator(ks=(1, 5), num_classes=10)
    ev.update([{"index": 0, "label": 3, "topk": [3, 1, 2, 0, 4]}, {"index": 1, "label": 4, "topk": [3, 1, 2, 0, 4]},
               {"index": 2, "label": 9, "topk": [3, 1, 2, 0, 4]}])
    assert ev.compute() == {"top1": 1 / 3, "top5": 2 / 3, "num_samples": 3.0}
    with pytest.raises(ValueError, match="label 12 outside 0..9"):
        ev.update([{"index": 5, "label": 12, "topk": [0]}])
