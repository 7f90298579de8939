"""`vlmoe.load` and `vlmoe predict`: an exported model of each task answers on the user's own images
(paths, PIL images of any mode and size, tensors, lists), batched results equal one-at-a-time ones, a
method of another task names the model's task, unreadable images are skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlmoe
from tests.utils import TOK
from tests.utils import export_tiny_model as _export


def _images(tmp_path: Path) -> list:
    rgb = tmp_path / "a.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(rgb)
    gray = Image.new("L", (20, 30), 128)  # another mode and size
    tensor = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    return [rgb, gray, tensor]


def test_vqa_answers_batched_like_one_at_a_time(tmp_path) -> None:
    model = vlmoe.load(_export(tmp_path, "vqa"), batch_size=2)
    imgs = _images(tmp_path)
    batched = model.answer(imgs, "what colour is it?", topk=2)
    single = [model.answer([i], "what colour is it?", topk=2)[0] for i in imgs]
    assert len(batched) == 3 and all(len(r) == 2 and r[0]["answer"] in model.model.answers for r in batched)
    for a, b in zip(batched, single):
        assert [x["answer"] for x in a] == [x["answer"] for x in b]
        assert [x["score"] for x in a] == pytest.approx([x["score"] for x in b], abs=1e-5)
    with pytest.raises(ValueError, match="this model's task is 'vqa'; this method needs a captioning model"):
        model.caption(imgs)


def test_caption_equals_the_models_own_generate_on_the_preprocessed_image(tmp_path) -> None:
    model = vlmoe.load(_export(tmp_path, "caption"))
    img = _images(tmp_path)[0]
    text = model.caption(img, beam=2, max_len=8)
    ids = model.model.generate(model.images([img]), max_len=8, num_beams=2).tokens[0]
    assert len(text) == 1 and text[0] == " ".join(TOK.decode(ids).split()).replace(" .", ".")


def test_classify_detect_verify_and_match(tmp_path) -> None:
    imgs = _images(tmp_path)
    cls = vlmoe.load(_export(tmp_path, "classify")).classify(imgs, topk=2)
    assert [len(r) for r in cls] == [2, 2, 2] and cls[0][0]["label"] in ("circle", "square", "triangle")
    assert sum(x["score"] for x in cls[0]) <= 1.0 + 1e-6
    det = vlmoe.load(_export(tmp_path, "detect")).detect(imgs, score_threshold=0.0)
    assert len(det) == 3
    for rows, (w, h) in zip(det, [(50, 40), (20, 30), (24, 24)]):
        for r in rows:  # boxes and masks in the original image's pixels
            assert r["label"] in ("circle", "square") and 0 <= r["box"][0] <= r["box"][2] <= w
            assert r["mask"].shape == (h, w)
    ver = vlmoe.load(_export(tmp_path, "nlvr2")).verify(imgs[:2], imgs[1:], "the left one is red")
    assert len(ver) == 2 and all(0 <= v["score"] <= 1 for v in ver)
    ret = vlmoe.load(_export(tmp_path, "retrieval"))
    sims = ret.match(imgs, ["a red image", "a grey image"])
    assert sims.shape == (3, 2) and torch.all(sims.abs() <= 1 + 1e-5)
    assert torch.allclose(ret.embed_texts("a red image").norm(dim=-1), torch.ones(1), atol=1e-5)


def test_load_refuses_what_is_not_a_model(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        vlmoe.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        vlmoe.load(tmp_path / "empty")
    (tmp_path / "x.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        vlmoe.load(tmp_path / "x.ckpt")
    folder = _export(tmp_path, "caption")  # a model folder whose task description was lost
    config = json.loads((folder / "config.json").read_text())
    del config["task"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no 'task' block, but the weights hold task heads \(mlm_head"):
        vlmoe.load(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        vlmoe.load(folder)


def test_predict_command_on_a_folder_skips_unreadable_images(tmp_path, capsys) -> None:
    from vlmoe.cli import main

    model = _export(tmp_path, "caption")
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (30, 30), (0, 0, 255)).save(folder / "blue.jpg")
    Image.new("RGBA", (30, 20), (0, 255, 0, 128)).save(folder / "sub" / "green.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.jsonl"
    main(["predict", "caption", "--model", str(model), str(folder), "--beam", "1", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in rows) == ["blue.jpg", "green.png"]
    assert all(isinstance(r["caption"], str) for r in rows)
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.jpg" in err and "2 of 3 images, 1 skipped" in err
    with pytest.raises(SystemExit) as e:  # the user's file is not overwritten
        main(["predict", "caption", "--model", str(model), str(folder), "--out", str(out)])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["predict", "answer", "--model", str(model), str(folder)])
    assert e.value.code == 2 and "needs --question" in capsys.readouterr().err
