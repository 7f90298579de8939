"""VQA accuracy as the official evaluator computes it (the rules: :mod:`vlmoe.protocols.vqa`)."""

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

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "answer_scores",
    "clean_whitespace",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "soft_score",
    "vqa_accuracy",
]
