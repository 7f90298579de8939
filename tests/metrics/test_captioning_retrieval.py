"""Caption metrics against the COCO caption toolkit called directly, their bad-input errors, the
pure-Python tokenisation; retrieval recall on crafted similarity matrices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vlmoe.metrics.captioning import (
    CaptionEvaluator,
    check_caption_results,
    python_ptb_tokenize,
    read_caption_ground_truth,
    score_captions,
)
from vlmoe.metrics.retrieval import RetrievalEvaluator, retrieval_recall

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "coco_val2014_100" / "instances_val2014_100.json"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO caption toolkit's tokenizer needs java")

# hand-written references and candidates (the candidates range from exact to wrong)
REFS = [
    ["a man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
     "a person surfing on a big wave"],
    ["Two dogs playing with a frisbee in the park.", "two dogs chase a red frisbee on the grass",
     "A pair of dogs play in a grassy field."],
    ["a plate of food with broccoli and rice", "A white plate topped with rice, broccoli and meat.",
     "a dinner plate holding chicken, rice and vegetables"],
    ["A kitchen with wooden cabinets and a stove.", "an empty kitchen with a stove and cabinets",
     "the kitchen has wood cabinets, a sink and an oven"],
]
CANDS = ["a man riding a wave on top of a surfboard.", "two dogs playing with a frisbee on the grass",
         "a plate of rice and broccoli", "a cat sleeping on a couch"]


@pytest.fixture
def caption_files(tmp_path: Path) -> tuple[Path, Path, list[int]]:
    """COCO-format ground truth on four image ids of the shared COCO fixture, and results."""
    ids = [41888, 16502, 232489, 190756]
    if FIXTURE.exists():
        ids = [im["id"] for im in json.loads(FIXTURE.read_text())["images"][:4]]
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in ids]
    anns = [{"image_id": i, "id": 10 * n + j, "caption": c} for n, (i, caps) in enumerate(zip(ids, REFS))
            for j, c in enumerate(caps)]
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns, "type": "captions", "info": {}, "licenses": []}))
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in zip(ids, CANDS)]))
    return gt, res, ids


@needs_java
def test_scores_equal_cocoevalcap_called_directly(caption_files, monkeypatch) -> None:
    """``COCOEvalCap(coco, coco.loadRes(res)).evaluate()`` on the same files, with only SPICE (which
    downloads CoreNLP) replaced by a stub, gives the same BLEU / METEOR / ROUGE-L / CIDEr."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    gt, res, _ = caption_files
    coco = COCO(str(gt))
    ev = coco_eval.COCOEvalCap(coco, coco.loadRes(str(res)))
    ev.params["image_id"] = ev.cocoRes.getImgIds()
    ev.evaluate()
    ours = CaptionEvaluator.score_file(res, gt)
    for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert ours[k] == pytest.approx(ev.eval[k], abs=1e-12), k
    assert ours["official"] == 1.0 and ours["coverage"] == 1.0
    assert 0.0 < ours["Bleu_4"] < 1.0 and ours["CIDEr"] > 0.5


@needs_java
def test_python_tokenisation_matches_the_ptb_tokenizer_on_these_captions() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = {i: refs + [c] for i, (refs, c) in enumerate(zip(REFS, CANDS))}
    caps[9] = ["A man's dog isn't here, (really)!", "Two light-blue cars... parked -- on 3.5 \"streets\"; yes?"]
    official = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in caps.items()})
    assert python_ptb_tokenize(caps) == official


def test_without_java_the_fallback_is_labelled_unofficial(caption_files, monkeypatch) -> None:
    import vlmoe.metrics.captioning as mc

    gt, res, _ = caption_files
    monkeypatch.setattr(mc.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="java is not on the PATH"):
        out = CaptionEvaluator.score_file(res, gt)
    assert out["official"] == 0.0 and "METEOR" not in out and out["CIDEr"] > 0.5
    with pytest.raises(RuntimeError, match="need java"):
        score_captions(read_caption_ground_truth(gt), {k: "a cat" for k in read_caption_ground_truth(gt)}, "ptb")


def test_a_perfect_caption_scores_bleu_one() -> None:
    gts = {1: ["a red circle on a light background.", "there is one red circle"]}
    out = score_captions(gts, {1: "a red circle on a light background."}, tokenizer="python")
    assert out["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and out["ROUGE_L"] == pytest.approx(1.0)


def test_results_that_do_not_match_the_ground_truth_are_refused(caption_files, tmp_path) -> None:
    gt, _, ids = caption_files
    gts = read_caption_ground_truth(gt)
    bad = tmp_path / "bad.json"
    cases = {
        "is not in the ground truth": [{"image_id": 123456789, "caption": "a cat"}],
        "has an empty caption": [{"image_id": ids[0], "caption": "  "}],
        "has a second caption": [{"image_id": ids[0], "caption": "a cat"}, {"image_id": ids[0], "caption": "a dog"}],
        "is not {'image_id'": [{"image": ids[0], "caption": "a cat"}],
        "expected a list": {"image_id": ids[0], "caption": "a cat"},
    }
    for message, results in cases.items():
        bad.write_text(json.dumps(results))
        with pytest.raises(ValueError, match="bad.json") as e:
            CaptionEvaluator.score_file(bad, gt)
        assert message in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="image 123456789 is not in the ground truth"):
        check_caption_results([{"image_id": 123456789, "caption": "x"}], gts, "mine")


def test_ground_truth_errors_name_the_file(tmp_path) -> None:
    from vlmoe.data._io import DataFormatError

    p = tmp_path / "gt.json"
    p.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 2, "caption": "x"}]}))
    with pytest.raises(DataFormatError, match=r"gt.json: annotations\[0\] is for image 2"):
        read_caption_ground_truth(p)
    p.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(DataFormatError, match="gt.json: 1 images have no reference caption"):
        read_caption_ground_truth(p)


def test_evaluator_counts_each_image_once_and_reports_coverage(caption_files) -> None:
    gt, _, ids = caption_files
    ev = CaptionEvaluator(gt, tokenizer="python")
    ev.update([{"image_id": ids[0], "caption": CANDS[0]}, {"image_id": ids[1], "caption": CANDS[1]}])
    ev.update([{"image_id": ids[0], "caption": "a duplicate of a padded sample"}])
    out = ev.compute()
    assert ev.duplicates == 1 and out["num_images"] == 2 and out["coverage"] == 0.5


# ---------------------------------------------------------------------------------------------- retrieval
def test_recall_on_a_crafted_similarity_matrix() -> None:
    # 3 images, 6 texts (2 per image); text j belongs to image j // 2
    text_image = torch.tensor([0, 0, 1, 1, 2, 2])
    s = torch.tensor([
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: its text 0 is best -> TR@1
        [0.0, 0.0, 0.1, 0.2, 0.9, 0.8],  # image 1: its texts rank 4th and 3rd -> TR@5 only
        [0.0, 0.0, 0.0, 0.0, 0.5, 0.4],  # image 2: text 4 is best -> TR@1
    ])
    out = retrieval_recall(s, text_image, ks=(1, 5))
    assert out["tr_r1"] == pytest.approx(2 / 3) and out["tr_r5"] == 1.0
    # text -> image: per text the rank of its image in the column
    # t0, t1: img0 best; t2: img0 (.8) > img1 (.1) -> rank 2; t3: img1 best;
    # t4: img1 (.9) > img2; t5: img1 > img2
    assert out["ir_r1"] == pytest.approx(3 / 6) and out["ir_r5"] == 1.0
    assert out["average_score"] == pytest.approx((out["tr_mean"] + out["ir_mean"]) / 2)


def test_retrieval_evaluator_uses_every_embedding_once() -> None:
    e = torch.eye(3)
    ev = RetrievalEvaluator()
    records = [{"key": f"i{i}", "image_id": i, "embedding": e[i].tolist()} for i in range(3)]
    records += [{"key": f"t{i}-0", "image_id": i, "embedding": e[i].tolist()} for i in range(3)]
    ev.update(records)
    ev.update(records[:2])  # padding duplicates
    out = ev.compute()
    assert out["tr_r1"] == out["ir_r1"] == 1.0 and out["num_images"] == 3 and out["num_texts"] == 3
    ev.update([{"key": "t7-0", "image_id": 7, "embedding": [1.0, 0.0, 0.0]}])
    with pytest.raises(ValueError, match="not embedded"):
        ev.compute()
