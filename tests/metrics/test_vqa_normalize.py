"""Golden cases for the official VQA answer processing and the soft-score rule."""

from __future__ import annotations

import itertools

import pytest

from vlmoe.metrics.vqa import (
    answer_scores,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    soft_score,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes", "yes"),
        ("red, white", "red white"),  # "," touches a space: deleted
        ("red,white", "red white"),  # not touching a space: replaced by a space
        ("1,000", "1000"),  # digit-comma-digit anywhere: every mark is deleted
        ("t-shirt", "t shirt"),
        ("t - shirt", "t  shirt"),  # deleted, the spaces around stay (split() later collapses them)
        ("what?", "what "),
        ("hello.", "hello"),  # period not followed by a digit: stripped
        ("3.5", "3.5"),  # followed by a digit: kept
        ("2.", "2"),  # the look-behind typo: a period after a digit goes too
        ("don't", "don't"),  # the apostrophe is not in the list
        ("a:b", "a:b"),  # nor is the colon
    ],
)
def test_process_punctuation(text: str, expected: str) -> None:
    assert process_punctuation(text) == expected


def test_period_strip_count_quirk() -> None:
    # re.UNICODE (32) lands in `count`: only the first 32 strippable periods go.
    text = "a." * 40
    out = process_punctuation(text)
    assert out.count(".") == 8


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("the dog", "dog"),
        ("a an the", ""),
        ("dont know", "don't know"),
        ("whats up", "what's up"),
        ("Im here", "im here"),  # capitalised table keys never match after lower-casing
        ("somebody'd", "somebodyd"),  # the table's reversed entry
        ("  ten   cats ", "10 cats"),
    ],
)
def test_process_digit_article(text: str, expected: str) -> None:
    assert process_digit_article(text) == expected


def test_normalize_answer_chains_both_steps() -> None:
    assert normalize_answer(" The Two dogs!\n") == "2 dogs"
    assert normalize_answer("Yes.") == "yes"


@pytest.mark.parametrize(
    ("k", "score"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)]
)
def test_soft_score_values(k: int, score: float) -> None:
    assert soft_score(k) == score


def test_soft_score_matches_leave_one_out_definition() -> None:
    # Mean over the 10 choose 9 subsets of min(1, matches / 3), computed by brute force.
    for k in range(11):
        gts = ["x"] * k + ["y"] * (10 - k)
        subsets = itertools.combinations(range(10), 9)
        brute = sum(min(1.0, sum(gts[i] == "x" for i in s) / 3) for s in subsets) / 10
        assert soft_score(k) == pytest.approx(brute, abs=1e-12)


def test_answer_scores_normalise_then_count() -> None:
    answers = ["Two", "2", "two.", "3", "three", "3", "4", "a dog", "the dog", "Dog"]
    assert answer_scores(answers) == {"2": 0.9, "3": 0.9, "4": 0.3, "dog": 0.9}


def test_vqa_accuracy_hand_computed() -> None:
    gts = ["2"] * 2 + ["3"] * 8
    assert vqa_accuracy("2", gts) == pytest.approx(0.6)
    assert vqa_accuracy("two", gts) == pytest.approx(0.6)  # answers disagree: both sides normalised
    assert vqa_accuracy("3", gts) == pytest.approx(1.0)
    assert vqa_accuracy("5", gts) == 0.0
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_identical_answers_skip_normalisation() -> None:
    # All 10 ground-truth answers equal: the official code compares the raw stripped strings.
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes\n", ["yes"] * 10) == 1.0  # whitespace cleaning still applies
