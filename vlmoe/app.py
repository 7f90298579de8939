"""A local web page for one model: ``vlmoe app --model DIR`` (Gradio, the optional extra ``vlmoe[app]``).

Upload an image and, depending on the model's task, ask a question (VQA), get a caption, the top
classes or the detections (boxes and masks drawn on the image scaled down to at most :data:`DRAW_SIZE`
pixels a side, which is what the detector is run on; the boxes listed are in the upload's pixels), or
check a sentence against a second image (NLVR2), or score texts against it (retrieval). Next to the
answer the page shows the routing map of that image: every patch coloured by its first-choice expert
in each vision MoE layer (one panel per MH-MoE sub-token head), computed by
:func:`vlmoe.analysis.patch_expert_maps` on the image exactly as the model saw it. The server binds to
127.0.0.1 unless told otherwise.

    from vlmoe.app import build_app
    app = build_app(vlmoe.load("out/vqa"))
    app.launch(server_name="127.0.0.1", server_port=7860)
"""

from __future__ import annotations

import io
from typing import Any

import torch

from vlmoe.inference import Predictor, fit_within, open_image

__all__ = ["DRAW_SIZE", "MissingExtraError", "build_app", "respond", "routing_picture"]

TITLE = "vlmoe"
DRAW_SIZE = 1024  # the longer side of the picture the detections are drawn on (a page shows no more)


class MissingExtraError(ImportError):
    """An optional dependency is not installed (the message says which extra to install)."""


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError as e:  # an optional extra
        raise MissingExtraError("the web demo needs Gradio: pip install 'vlmoe[app]'") from e
    return gr


def _figure_to_image(fig: Any) -> Any:
    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def routing_picture(predictor: Predictor, image: Any) -> tuple[Any, str]:
    """``(PIL image or None, caption)``: the patch -> first-choice expert map of one image, per vision MoE
    layer, on the image as the model's preprocessing gives it (the caption says why there is none)."""
    from vlmoe.analysis import patch_expert_maps, plot_patch_maps
    from vlmoe.moe import MoE

    bb = getattr(predictor.model, "backbone", predictor.model)
    moes = [m for m in bb.modules() if isinstance(m, MoE) and m.stats_name.endswith(".vision")]
    if not moes:
        return None, "this model has no vision MoE layers: every patch goes through the same dense FFN"
    x = predictor.images([image])
    if x.shape[-1] != bb.config.img_size:  # e.g. a detector evaluated at another size
        x = torch.nn.functional.interpolate(x, size=(bb.config.img_size,) * 2, mode="bilinear", antialias=True)
    maps = patch_expert_maps(bb, x)
    if not maps:
        return None, "this model's vision MoE layers record no per-patch choice (Stratified MoE)"
    pre = predictor.preprocess
    mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    experts = {m.stats_name: m.config.num_experts for m in moes}
    fig = plot_patch_maps((x * std + mean).float().cpu(), maps, experts, "first-choice expert per image patch")
    heads = max(m.shape[1] for m in maps.values())
    caption = (f"{len(maps)} vision MoE layers" + (f", {heads} sub-token heads each" if heads > 1 else "")
               + "; colour = expert")
    return _figure_to_image(fig), caption


def _draw_detections(image: Any, dets: list[dict[str, Any]]) -> Any:
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    img = pil_to_tensor(open_image(image))
    if not dets:
        return to_pil_image(img)
    if all("mask" in d for d in dets):
        img = draw_segmentation_masks(img, torch.stack([d["mask"] for d in dets]), alpha=0.4)
    boxes = torch.tensor([d["box"] for d in dets], dtype=torch.float)
    labels = [f"{d['label']} {d['score']:.2f}" for d in dets]
    return to_pil_image(draw_bounding_boxes(img, boxes, labels, colors="red", width=2))


def respond(predictor: Predictor, img: Any, *rest: Any) -> tuple[str, Any, Any, str]:
    """The page's answer to one image: ``(text, image with the detections drawn or None, routing map,
    its caption)``. ``rest``: the question (VQA), the right image and the sentence (NLVR2), the texts
    one per line (retrieval) or the score threshold (detection). Missing input is a ValueError."""
    task = predictor.task
    if img is None:
        raise ValueError("upload an image first")
    text, shown = "", None
    if task == "vqa":
        question = (rest[0] or "").strip() if rest else ""
        if not question:
            raise ValueError("ask a question about the image")
        text = "\n".join(f"{a['answer']}  ({a['score']:.3f})" for a in predictor.answer(img, question, 5)[0])
    elif task == "captioning":
        text = predictor.caption(img)[0]
    elif task == "image_classification":
        text = "\n".join(f"{c['label']}  ({c['score']:.3f})" for c in predictor.classify(img, 5)[0])
    elif task == "detection":
        # detect on the picture that is shown, so the masks come at its size, not the upload's
        upload = open_image(img)
        picture = fit_within(upload, DRAW_SIZE)
        dets = predictor.detect(picture, score_threshold=float(rest[0]) if rest else 0.5)[0]
        (w, h), (pw, ph) = upload.size, picture.size
        scale = [w / pw, h / ph] * 2  # picture -> upload pixels, per box coordinate
        text = "\n".join(f"{d['label']} {d['score']:.2f} {[round(v * f, 2) for v, f in zip(d['box'], scale)]}"
                         for d in dets) or "no detections"
        shown = _draw_detections(picture, dets)
    elif task == "nlvr2":
        if len(rest) < 2 or rest[0] is None or not (rest[1] or "").strip():
            raise ValueError("upload the right image and write a sentence")
        v = predictor.verify(img, rest[0], rest[1].strip())[0]
        text = f"{'true' if v['true'] else 'false'}  (p(true) = {v['score']:.3f})"
    elif task == "retrieval":
        texts = [t.strip() for t in (rest[0] or "").splitlines() if t.strip()] if rest else []
        if not texts:
            raise ValueError("write one or more texts, one per line")
        sims = predictor.match(img, texts)[0].tolist()
        text = "\n".join(f"{s:.3f}  {t}" for s, t in sorted(zip(sims, texts), reverse=True))
    else:
        raise ValueError(f"this model's task is {task!r}: the page answers for finetuned models only")
    picture, note = routing_picture(predictor, img)
    return text, shown, picture, note


def build_app(predictor: Predictor, title: str | None = None) -> Any:
    """A ``gradio.Blocks`` page for the predictor's task (see the module docstring)."""
    gr = _gradio()
    task = predictor.task
    with gr.Blocks(title=title or TITLE) as app:
        gr.Markdown(f"## {title or TITLE}: a {task} model\n"
                    "Upload an image; the routing map shows which expert each patch of it chose.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", elem_id="image")
                inputs = [image]
                if task == "nlvr2":
                    inputs.append(gr.Image(type="pil", label="right image", elem_id="image2"))
                if task in ("vqa", "nlvr2", "retrieval"):
                    label = {"vqa": "question", "nlvr2": "sentence", "retrieval": "texts (one per line)"}[task]
                    inputs.append(gr.Textbox(label=label, elem_id="text", lines=3 if task == "retrieval" else 1))
                if task == "detection":
                    inputs.append(gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="score threshold"))
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                answer = gr.Textbox(label="answer", elem_id="answer", lines=4)
                drawn = gr.Image(label="detections", visible=task == "detection", elem_id="detections")
                routing = gr.Image(label="routing map", elem_id="routing")
                routing_note = gr.Markdown(elem_id="routing_note")

        def predict(img: Any, *rest: Any) -> tuple[str, Any, Any, str]:
            try:
                return respond(predictor, img, *rest)
            except ValueError as e:  # what the user can fix, shown on the page
                raise gr.Error(str(e)) from None

        run.click(predict, inputs=inputs, outputs=[answer, drawn, routing, routing_note])
    return app
