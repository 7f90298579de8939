"""`vlmoe app`: the routing picture of one image, and the page itself in a real headless browser
(Debian's chromium + chromedriver driven by Selenium; skipped with the reason when either is missing).
The browser test uploads an image, asks a question, and waits for the answer and the routing map; its
screenshot is kept in ``build/test-artifacts/app.png``."""

from __future__ import annotations

import ast
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlmoe
from tests.utils import easy_vqa_pngs, free_port
from tests.utils import export_tiny_model as _export

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("VLMOE_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))


def test_routing_picture_shows_every_vision_moe_layer_and_head(tmp_path) -> None:
    from vlmoe.analysis import patch_expert_maps
    from vlmoe.app import routing_picture

    model = vlmoe.load(_export(tmp_path, "vqa"))
    img = Image.new("RGB", (70, 50), (10, 200, 30))
    picture, caption = routing_picture(model, img)
    maps = patch_expert_maps(model.model, model.images([img]))
    assert picture is not None and picture.size[0] > 100 and picture.size[1] > 50
    assert caption.startswith(f"{len(maps)} vision MoE layers")
    assert len(maps) >= 1 and all(m.shape[-2:] == model.model.backbone.vision_embed.grid_size for m in maps.values())


def test_routing_picture_of_a_dense_model_says_why_there_is_none(tmp_path) -> None:
    from vlmoe.app import routing_picture
    from vlmoe.data import preprocess_dict
    from vlmoe.models import VLMoEForVQA, create_model, save_pretrained

    save_pretrained(VLMoEForVQA(create_model("tiny", vocab_size=49408, img_size=32), ["yes", "no"]), tmp_path / "d",
                    preprocess=preprocess_dict(32, "inception", "clip", 16))
    picture, caption = routing_picture(vlmoe.load(tmp_path / "d"), Image.new("RGB", (32, 32)))
    assert picture is None and "no vision MoE layers" in caption


def test_detections_are_drawn_on_the_original_image() -> None:
    from vlmoe.tasks.finetune.detection import draw_detections as _draw_detections

    img = Image.new("RGB", (60, 40), (255, 255, 255))
    mask = torch.zeros(40, 60, dtype=torch.bool)
    mask[10:20, 10:30] = True
    drawn = _draw_detections(img, [{"label": "circle", "score": 0.9, "box": [10, 10, 30, 20], "mask": mask}])
    assert drawn.size == (60, 40)
    px = torch.tensor(list(drawn.getdata())).view(40, 60, 3)
    assert (px[15, 20] != 255).any() and (px[35, 55] == 255).all()  # the mask is tinted, the rest untouched


@pytest.mark.parametrize("kind", ["vqa", "caption", "classify", "detect", "nlvr2", "retrieval"])
def test_page_answers_as_the_predictor_does_for_every_task(kind, tmp_path) -> None:
    from vlmoe.app import respond

    model = vlmoe.load(_export(tmp_path, kind))
    img = Image.new("RGB", (40, 30), (200, 20, 20))
    rest = {"vqa": ("what colour is it?",), "detect": (0.0,), "nlvr2": (Image.new("L", (20, 20)), "two red shapes"),
            "retrieval": ("a red square\na blue circle",)}.get(kind, ())
    text, drawn, picture, note = respond(model, img, *rest)
    expect = {
        "vqa": lambda: model.answer(img, rest[0], 5)[0][0]["answer"],
        "caption": lambda: model.caption(img)[0],
        "classify": lambda: model.classify(img, 5)[0][0]["label"],
        "detect": lambda: f"{len(model.detect(img, score_threshold=0.0)[0])} lines",
        "nlvr2": lambda: "true" if model.verify(img, rest[0], rest[1])[0]["true"] else "false",
        "retrieval": lambda: ["a red square", "a blue circle"][int(model.match(img, rest[0].splitlines())[0].argmax())],
    }[kind]()
    if kind == "detect":
        assert drawn is not None and drawn.size == (40, 30)
        dets = model.detect(img, score_threshold=0.0)[0]
        assert text == "no detections" if not dets else len(text.splitlines()) == len(dets)
    else:
        assert drawn is None
        assert text.splitlines()[0].split("  ")[-1 if kind == "retrieval" else 0] == expect or text == expect
    assert picture is not None and "vision MoE layers" in note  # every tiny model here is an MoE model
    if kind == "vqa":
        with pytest.raises(ValueError, match="ask a question"):
            respond(model, img, "  ")
    with pytest.raises(ValueError, match="upload an image"):
        respond(model, None, *rest)


def test_page_draws_detections_of_a_large_upload_on_a_picture_of_at_most_1024_pixels(tmp_path) -> None:
    from vlmoe.app import respond

    model = vlmoe.load(_export(tmp_path, "detect"))
    img = Image.new("RGB", (1600, 1200), (200, 20, 20))
    text, drawn, _, _ = respond(model, img, 0.0)
    assert drawn.size == (1024, 768)  # detection.DRAW_SIZE: the masks come at this size, not the upload's
    boxes = [ast.literal_eval(line.split(" ", 2)[2]) for line in text.splitlines()]  # in the upload's pixels
    assert boxes and all(0 <= x0 <= x1 <= 1600 and 0 <= y0 <= y1 <= 1200 for x0, y0, x1, y1 in boxes)
    assert max(b[2] for b in boxes) > 1024


def test_app_without_gradio_names_the_extra(monkeypatch) -> None:
    import sys

    from vlmoe.app import MissingExtraError, _gradio

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'vlmoe\[app\]'"):
        _gradio()


def _browser() -> tuple[str, str]:
    pytest.importorskip("gradio", reason="the web demo needs Gradio: pip install 'vlmoe[app]'")
    pytest.importorskip("selenium", reason="the browser test needs selenium (the test extra)")
    chrome = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver")
    return chrome, driver


@pytest.mark.browser
def test_page_answers_an_uploaded_image_and_shows_its_routing_map(tmp_path, monkeypatch) -> None:
    chrome, chromedriver = _browser()
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from vlmoe.app import build_app

    model = vlmoe.load(_export(tmp_path, "vqa"))
    image = tmp_path / "shape.png"
    image.write_bytes(easy_vqa_pngs(1, "test")[0])
    expected = model.answer(image, "what shape is in the image?", topk=5)[0][0]["answer"]
    app = build_app(model)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 90)
        upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))[0]
        upload.send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))  # the upload is shown
        driver.find_element(By.CSS_SELECTOR, "#text textarea, #text input").send_keys("what shape is in the image?")
        driver.find_element(By.CSS_SELECTOR, "#run").click()

        def answered(d: webdriver.Chrome) -> str:
            box = d.find_elements(By.CSS_SELECTOR, "#answer textarea")
            return box[0].get_attribute("value") if box else ""

        text = wait.until(answered)
        routing = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#routing img"))[0]
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", routing))
        time.sleep(0.5)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "app.png"))
        assert text.splitlines()[0].split("  (")[0] == expected  # the page gives the model's own answer
        assert len(text.splitlines()) == min(5, len(model.model.answers))
        assert driver.execute_script("return arguments[0].naturalWidth", routing) > 100
        assert "vision MoE layers" in driver.find_element(By.CSS_SELECTOR, "#routing_note").text
    finally:
        driver.quit()
        app.close()
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000
