"""The VQA protocol: answer normalisation, the accuracy rule and the soft scores, as the official
evaluator computes them.

The official VQA evaluation tools (``vqaEval.py`` in the VQA API, BSD licence, (c) 2014 Aishwarya
Agrawal) are Python 2 code that cannot be imported today, so this module re-implements their answer
processing rule by rule, quirks included, so that scores computed here equal the official ones:

- :func:`process_punctuation`: each punctuation mark in ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``
  is deleted when it touches a space in the *original* text (or when the text contains a digit-comma-
  digit group anywhere), otherwise replaced by a space. Periods not followed by a digit are then
  removed with the official pattern ``(?!<=\\d)(\\.)(?!\\d)``: its intended look-behind is written as
  a look-ahead (so a period after a digit is removed too), and ``re.UNICODE`` is passed where
  ``re.sub`` expects ``count``, so at most 32 periods are removed.
- :func:`process_digit_article`: lower-case, number words ``none``/``zero`` .. ``ten`` to digits,
  articles ``a an the`` dropped, contractions restored from a fixed table (whose capitalised keys
  can never match after lower-casing, another quirk kept).
- :func:`vqa_accuracy`: the prediction and the ground-truth answers are stripped of newlines, tabs
  and surrounding spaces; *only if the ground-truth answers are not all identical* are both sides
  normalised. The accuracy is ``min(1, #matches among the other answers / 3)`` averaged over leaving
  out each ground-truth answer in turn.

With 10 answers, k of them equal to the prediction gives exactly 0, 0.3, 0.6, 0.9 and 1.0 for
k = 0, 1, 2, 3, >= 4 (:func:`soft_score`); training uses these as soft BCE targets over an answer
vocabulary (:func:`answer_scores`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

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

# The official punctuation list, in its order (the order matters: replacements are sequential).
PUNCTUATION: tuple[str, ...] = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)

NUMBER_WORDS: Mapping[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Contraction table of the official evaluator (a fact table, needed verbatim for identical scores;
# note the reversed entry "somebody'd" -> "somebodyd" and the capitalised keys, both kept).
CONTRACTIONS: Mapping[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

# Written as the official code writes it: "(?!<=\d)" is a negative look-ahead for the literal "<=\d"
# (always true before a "."), not the intended look-behind, so "2." loses its period too.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official call passes re.UNICODE (== 32) positionally, where re.sub expects `count`.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def clean_whitespace(text: str) -> str:
    """Replace newlines and tabs by spaces and strip, as the evaluator does before anything else."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: delete or space out punctuation, strip periods.

    Args:
        text: an answer string.

    Returns:
        The processed string (not stripped; spaces may be doubled, as in the original).
    """
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        # The test looks at the *original* text while the replacement acts on the running output.
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, drop articles,
    restore contractions, re-join with single spaces.

    Args:
        text: an answer string (usually the output of :func:`process_punctuation`).
    """
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Whitespace cleaning, :func:`process_punctuation` then :func:`process_digit_article`.

    This is the normalisation the official evaluator applies when the ground-truth answers of a
    question disagree; the answer vocabulary and soft training targets use it for every answer.
    """
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def _leave_one_out(matches: int, total: int) -> float:
    """Mean over the ``total`` answers of ``min(1, matches among the other answers / 3)``."""
    if total <= 0:
        return 0.0
    # The `matches` answers equal to the prediction see matches - 1 others; the rest see matches.
    hit = min(1.0, (matches - 1) / 3) if matches > 0 else 0.0
    miss = min(1.0, matches / 3)
    return (matches * hit + (total - matches) * miss) / total


def soft_score(count: int, num_answers: int = 10) -> float:
    """The VQA accuracy of an answer given by ``count`` of ``num_answers`` annotators.

    With 10 answers: 0, 0.3, 0.6, 0.9, 1.0 for count 0, 1, 2, 3, >= 4 (rounded to 10 decimals so the
    values are exactly those numbers).

    Args:
        count: how many ground-truth answers equal the answer.
        num_answers: how many ground-truth answers the question has.
    """
    if not 0 <= count <= num_answers:
        raise ValueError(f"count must be in [0, {num_answers}], got {count}")
    return round(_leave_one_out(count, num_answers), 10)


def answer_scores(answers: Sequence[str], normalize: bool = True) -> dict[str, float]:
    """Soft scores of every distinct (normalised) ground-truth answer of one question.

    Args:
        answers: the ground-truth answers (10 in VQAv2).
        normalize: apply :func:`normalize_answer` to each answer first.

    Returns:
        ``{answer: soft_score(count)}`` for each distinct answer.
    """
    keys = [normalize_answer(a) if normalize else clean_whitespace(a) for a in answers]
    counts = Counter(keys)
    return {a: soft_score(c, len(keys)) for a, c in counts.items()}


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official per-question VQA accuracy of ``prediction`` against the ground-truth answers.

    Args:
        prediction: the predicted answer string.
        answers: the ground-truth answers (10 in VQAv2).

    Returns:
        A value in [0, 1]; the official report multiplies the mean by 100 and rounds to 2 decimals.
    """
    pred = clean_whitespace(prediction)
    gts = [clean_whitespace(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    if not gts:
        return 0.0
    # Summed in the evaluator's order so the float result is bit-identical to it.
    matches = sum(g == pred for g in gts)
    accs = [min(1.0, (matches - (g == pred)) / 3) for g in gts]
    return float(sum(accs)) / len(accs)
