"""COCO detection evaluation: the shared fixture's published COCOeval.stats reproduced exactly (through the
function and `vlmoe evaluate coco`), per-category AP, deduplication by image, and the inputs pycocotools
would crash or mis-score on, each refused naming the file and the id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmoe.metrics.coco import STAT_NAMES, COCOEvaluator, evaluate_coco

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "coco_val2014_100"
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"the shared COCO fixture is not at {FIXTURE}")
GT = FIXTURE / "instances_val2014_100.json"
BBOX = FIXTURE / "instances_val2014_fakebbox100_results.json"
SEGM = FIXTURE / "instances_val2014_fakesegm100_results.json"

# the fixture README's expected COCOeval.stats (pycocotools 2.0.11)
WANT = {
    "bbox": [0.5045806987249628, 0.6969727247299577, 0.5729816669904824, 0.5856257209410443, 0.5193996948036719,
             0.5013978986347466, 0.38681277964578054, 0.5936795762842003, 0.595352982877607, 0.6398109626113442,
             0.5664205978994309, 0.5642905982905982],
    "segm": [0.3195452758576433, 0.5622883972521636, 0.29892653412086784, 0.3873740315997838, 0.31018272403369485,
             0.3269339071005138, 0.2682297225711534, 0.41544868114906375, 0.4168394992198818, 0.4694498622754236,
             0.37675922666197265, 0.3814715099715099],
}


@pytest.mark.parametrize(("iou", "results"), [("bbox", BBOX), ("segm", SEGM)])
def test_reproduces_the_published_stats_exactly(iou: str, results: Path) -> None:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = evaluate_coco(GT, results, [iou])[iou]
    got = [out["stats"][k] for k in STAT_NAMES]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools called directly, in this environment
        gt = COCO(str(GT))
        ev = COCOeval(gt, gt.loadRes(str(results)), iou)
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert got == [float(x) for x in ev.stats]  # bit-identical
    # the README's figures; the last digit of one segm stat moves with the numpy build (1 ulp)
    assert got == pytest.approx(WANT[iou], abs=1e-15)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out["summary"]
    assert len(out["per_category"]) == 80 and "person" in out["per_category"]


def test_the_command_prints_the_summary_and_writes_the_numbers(tmp_path, capsys) -> None:
    from vlmoe.cli import main

    out = tmp_path / "scores.json"
    main(["evaluate", "coco", "--annotations", str(GT), "--results", str(BBOX), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "== bbox ==" in printed and "| person |" in printed and "= 0.505" in printed
    assert list(json.loads(out.read_text())["bbox"]["stats"].values()) == pytest.approx(WANT["bbox"], abs=1e-15)
    with pytest.raises(SystemExit) as e:  # never overwrites what the user has
        main(["evaluate", "coco", "--annotations", str(GT), "--results", str(BBOX), "--json", str(out)])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err


def test_evaluator_counts_each_image_once() -> None:
    dets = json.loads(BBOX.read_text())
    by_image: dict[int, list] = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    gt = json.loads(GT.read_text())
    ev = COCOEvaluator(GT, ["bbox"])
    records = [{"image_id": im["id"], "detections": by_image.get(im["id"], [])} for im in gt["images"]]
    ev.update(records)
    ev.update(records[:10])  # a distributed sampler's padding duplicates
    out = ev.compute()
    assert ev.duplicates == 10 and [out[f"bbox_{k}"] for k in STAT_NAMES] == pytest.approx(WANT["bbox"], abs=1e-15)


def _bad(tmp_path: Path, results=None, gt=None) -> str:
    res = tmp_path / "res.json"
    res.write_text(json.dumps(results if results is not None else json.loads(BBOX.read_text())[:5]))
    ann = GT
    if gt is not None:
        ann = tmp_path / "gt.json"
        ann.write_text(json.dumps(gt))
    with pytest.raises(ValueError) as e:
        evaluate_coco(ann, res, ["bbox"])
    return str(e.value)


def test_bad_input_is_refused_naming_the_file_and_id(tmp_path) -> None:
    good = json.loads(BBOX.read_text())[0]
    assert "res.json: no detections" in _bad(tmp_path, [])
    msg = _bad(tmp_path, [{**good, "image_id": 999999999}])
    assert "res.json: detection 0 (image 999999999): the image is not in the ground truth" in msg
    assert "category 9999 is not in the ground truth" in _bad(tmp_path, [{**good, "category_id": 9999}])
    assert "negative size" in _bad(tmp_path, [{**good, "bbox": [1.0, 2.0, -3.0, 4.0]}])
    assert "score" in _bad(tmp_path, [{k: v for k, v in good.items() if k != "score"}])
    gt = json.loads(GT.read_text())
    gt["annotations"][3]["id"] = 0
    assert "gt.json: annotations[3] has id 0; COCOeval needs ids >= 1" in _bad(tmp_path, gt=gt)
    gt = json.loads(GT.read_text())
    del gt["annotations"][0]["area"]
    assert f"gt.json: annotation {gt['annotations'][0]['id']} has no 'area'" in _bad(tmp_path, gt=gt)


def test_images_without_annotations_stay_in_the_evaluation(tmp_path) -> None:
    """A detection on an image with no ground-truth object is a false positive, not skipped."""
    gt = json.loads(GT.read_text())
    empty = {"id": 123, "file_name": "empty.jpg", "height": 100, "width": 100}
    gt["images"].append(empty)
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt))
    dets = json.loads(BBOX.read_text())
    base = evaluate_coco(ann, dets, ["bbox"])["bbox"]["stats"]["AP"]
    fp = [{"image_id": 123, "category_id": d["category_id"], "bbox": [0, 0, 50, 50], "score": 1.0} for d in dets[:50]]
    worse = evaluate_coco(ann, dets + fp, ["bbox"])["bbox"]["stats"]["AP"]
    assert worse < base
