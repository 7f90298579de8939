"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) with the COCO caption toolkit
(pycocoevalcap 1.2, the package ``COCOEvalCap`` lives in).

``COCOEvalCap.evaluate()`` cannot run offline: after tokenising it builds SPICE, which downloads
Stanford CoreNLP on first use (and fails on Java 17). :func:`score_captions` therefore runs the
same steps itself: the same ``PTBTokenizer`` (Java) on references and candidates, then the same
scorers ``Bleu(4)``, ``Meteor()`` (Java), ``Rouge()``, ``Cider()`` on the tokenised captions - so its
numbers are ``COCOEvalCap``'s (a test checks it, with SPICE stubbed out of ``COCOEvalCap``). SPICE is
reported as unavailable.

Without ``java`` on the PATH it says so and falls back to :func:`python_ptb_tokenize`, a pure-Python
approximation of the PTB tokenizer (lower case, punctuation split off and dropped, ``n't`` / ``'s``
contractions split) with BLEU / ROUGE-L / CIDEr only; the result then carries ``official = 0``.
CIDEr's document frequencies come from the evaluated references, so scores of a subset differ from
the whole split's (the evaluator reports ``coverage``).

Files: ground truth in the COCO caption format (``images`` + ``annotations: [{"image_id",
"caption"}]``: the Karpathy ``coco_karpathy_{val,test}_gt.json``, NoCaps' files), results in the COCO
results format ``[{"image_id": int, "caption": str}]``. :func:`check_caption_results` rejects
results pycocotools would assert on (or silently mis-score) with a message naming the file.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import warnings
from collections.abc import Iterable
from typing import Any

from .base import Evaluator

__all__ = [
    "CaptionEvaluator",
    "check_caption_results",
    "java_available",
    "python_ptb_tokenize",
    "read_caption_ground_truth",
    "results_list",
    "score_captions",
]

# pycocoevalcap's PTBTokenizer drops these tokens after tokenising
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                ";"}
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def read_caption_ground_truth(path: str | os.PathLike) -> dict[int, list[str]]:
    """``{image_id: [reference captions]}`` of a COCO-format caption file (every image listed, even
    one without captions, which is an error)."""
    from vlmoe.io import DataFormatError, load_json

    data = load_json(path)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise DataFormatError(f"{path}: not a COCO caption file (needs 'images' and 'annotations')")
    gts: dict[int, list[str]] = {int(im["id"]): [] for im in data["images"]}
    for i, a in enumerate(data["annotations"]):
        if "image_id" not in a or "caption" not in a:
            raise DataFormatError(f"{path}: annotations[{i}] needs 'image_id' and 'caption'; it has {sorted(a)}")
        if int(a["image_id"]) not in gts:
            raise DataFormatError(
                f"{path}: annotations[{i}] is for image {a['image_id']}, which 'images' does not list"
            )
        gts[int(a["image_id"])].append(str(a["caption"]))
    empty = [k for k, v in gts.items() if not v]
    if empty:
        raise DataFormatError(f"{path}: {len(empty)} images have no reference caption (e.g. image {empty[0]})")
    return gts


def check_caption_results(
    results: Any, gts: dict[int, list[str]], source: str = "caption results"
) -> dict[int, str]:
    """``{image_id: caption}`` of a COCO results list, or a ``ValueError`` naming ``source`` and the
    entry: not a list of ``{"image_id", "caption"}``, an image id not in the ground truth, an empty
    caption, an image id given twice."""
    if not isinstance(results, list):
        raise ValueError(f"{source}: expected a list of {{'image_id', 'caption'}}, got {type(results).__name__}")
    out: dict[int, str] = {}
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "image_id" not in r or "caption" not in r:
            raise ValueError(f"{source}: entry {i} is not {{'image_id': int, 'caption': str}}: {str(r)[:80]}")
        try:
            image_id = int(r["image_id"])
        except (TypeError, ValueError):
            raise ValueError(f"{source}: entry {i} has image_id {r['image_id']!r}, not an integer") from None
        if image_id not in gts:
            raise ValueError(f"{source}: entry {i}: image {image_id} is not in the ground truth "
                             f"({len(gts)} images); results of another split?")
        cap = r["caption"]
        if not isinstance(cap, str) or not cap.strip():
            raise ValueError(f"{source}: entry {i}: image {image_id} has an empty caption")
        if image_id in out:
            raise ValueError(f"{source}: entry {i}: image {image_id} has a second caption (one per image)")
        out[image_id] = cap
    if not out:
        raise ValueError(f"{source}: no captions to score")
    return out


_PY_TOKEN = re.compile(
    r"[a-z0-9]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\.\.\.|--|[a-z0-9]+(?:[-.][a-z0-9]+)*|\S"
)
_PY_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}


def python_ptb_tokenize(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """A pure-Python approximation of ``PTBTokenizer().tokenize`` (lower case; ``n't`` and ``'s``
    split off; punctuation dropped; brackets become ``-lrb-`` ... as the Java tokenizer writes them in
    lower case, which pycocoevalcap then keeps). Not the official tokenisation."""
    out = {}
    for k, caps in captions.items():
        toks = ([_PY_BRACKETS.get(t, t) for t in _PY_TOKEN.findall(c.lower().replace("\n", " "))] for c in caps)
        out[k] = [" ".join(t for t in line if t not in PUNCTUATIONS) for line in toks]
    return out


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the Java tools' stderr lines ("PTBTokenizer tokenized N tokens ...") at the fd level."""
    try:
        fd = os.dup(2)
    except OSError:  # pragma: no cover - no stderr
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def java_available() -> bool:
    return shutil.which("java") is not None


def score_captions(
    gts: dict[Any, list[str]], res: dict[Any, str], tokenizer: str = "auto", meteor: bool = True
) -> dict[str, float]:
    """COCOEvalCap's metrics of ``res`` (one caption per image) against ``gts`` over the images of ``res``.

    Args:
        gts: ``{image_id: [references]}`` (at least the images of ``res``).
        res: ``{image_id: caption}``.
        tokenizer: ``ptb`` (the official Java PTB tokenizer), ``python`` (:func:`python_ptb_tokenize`)
            or ``auto`` (``ptb`` when ``java`` is on the PATH, else ``python`` with a warning).
        meteor: compute METEOR (Java; only with the ``ptb`` path).

    Returns:
        ``Bleu_1..4``, ``METEOR`` (when computed), ``ROUGE_L``, ``CIDEr`` (pycocoevalcap's scale: 1.0 =
        100 in papers' tables), ``official`` (1.0: the COCO toolkit's tokenisation and scorers).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if tokenizer not in ("auto", "ptb", "python"):
        raise ValueError(f"tokenizer must be auto, ptb or python; got {tokenizer!r}")
    missing = [k for k in res if k not in gts]
    if missing:
        raise ValueError(f"{len(missing)} captioned images have no references (e.g. image {missing[0]})")
    if tokenizer == "auto":
        tokenizer = "ptb" if java_available() else "python"
        if tokenizer == "python":
            warnings.warn("java is not on the PATH: caption metrics use a pure-Python tokenisation and no METEOR "
                          "(not the official COCO numbers; install a JRE for those)", stacklevel=2)
    elif tokenizer == "ptb" and not java_available():
        raise RuntimeError("the official caption metrics need java (PTB tokenizer, METEOR): install a JRE "
                           "or use tokenizer='python' (unofficial)")
    ids = list(res)
    g = {k: list(gts[k]) for k in ids}
    r = {k: [res[k]] for k in ids}
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        with _quiet_stderr():
            g = tok.tokenize({k: [{"caption": c} for c in v] for k, v in g.items()})
            r = tok.tokenize({k: [{"caption": c} for c in v] for k, v in r.items()})
    else:
        g, r = python_ptb_tokenize(g), python_ptb_tokenize(r)
    scorers: list[tuple[Any, Any]] = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"])]
    if meteor and tokenizer == "ptb":
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.append((Meteor(), "METEOR"))
    scorers += [(Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    out: dict[str, float] = {}
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its ratio
            score, _ = scorer.compute_score(g, r)
        if isinstance(names, list):
            out.update({n: float(s) for n, s in zip(names, score)})
        else:
            out[names] = float(score)
    out["official"] = 1.0 if tokenizer == "ptb" and "METEOR" in out else 0.0
    return out


class CaptionEvaluator(Evaluator):
    """Records ``{"image_id": int, "caption": str}``; scores with :func:`score_captions` against the
    ground truth (a COCO-format caption file or ``{image_id: [references]}``), over the images
    captioned (``coverage`` = their share of the ground truth's images).

    Args:
        ground_truth: the reference captions.
        tokenizer / meteor: :func:`score_captions` options.
        source: a name for messages (default: the ground-truth file).
    """

    id_key = "image_id"

    def __init__(self, ground_truth: str | os.PathLike | dict[int, list[str]], tokenizer: str = "auto",
                 meteor: bool = True) -> None:
        if isinstance(ground_truth, (str, os.PathLike)):
            self.source = str(ground_truth)
            self.gts = read_caption_ground_truth(ground_truth)
        else:
            self.source, self.gts = "ground truth", {int(k): list(v) for k, v in ground_truth.items()}
        self.tokenizer, self.meteor = tokenizer, meteor
        super().__init__()

    def check(self, record: dict[str, Any]) -> None:
        check_caption_results([record], self.gts, f"caption prediction for image {record.get('image_id')}")

    def compute(self) -> dict[str, float]:
        res = check_caption_results(self.records, self.gts, "caption predictions")
        out = score_captions(self.gts, res, self.tokenizer, self.meteor)
        out["coverage"] = len(res) / len(self.gts)
        out["num_images"] = float(len(res))
        return out

    @classmethod
    def score_file(cls, results: str | os.PathLike, ground_truth: str | os.PathLike, **kwargs: Any) -> dict[str, float]:
        """The metrics of a COCO results file (``[{"image_id", "caption"}]``) against a ground-truth file."""
        from vlmoe.io import load_json

        ev = cls(ground_truth, **kwargs)
        res = check_caption_results(load_json(results), ev.gts, str(results))
        ev.update({"image_id": k, "caption": v} for k, v in res.items())
        return ev.compute()


def results_list(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The COCO results format of caption records (``[{"image_id", "caption"}]``)."""
    return [{"image_id": int(r["image_id"]), "caption": r["caption"]} for r in records]
