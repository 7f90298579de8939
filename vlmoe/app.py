"""A local web page for one model: ``vlmoe app --model DIR`` (Gradio, the optional extra ``vlmoe[app]``).

Upload an image and give what the model's task asks for (its page inputs in the task registry,
:mod:`vlmoe.tasks.registry`): a question (VQA), nothing (a caption, the top classes), a score threshold
(the detections, boxes and masks drawn on the image scaled down to at most
:data:`vlmoe.tasks.finetune.detection.DRAW_SIZE` pixels a side, which is what the detector is run on;
the boxes listed are in the upload's pixels), a second image and a sentence (NLVR2), or texts to rank
against it (retrieval). Next to the
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

from vlmoe.inference import Predictor

__all__ = ["MissingExtraError", "build_app", "respond", "routing_picture"]

TITLE = "vlmoe"


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
    mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)  # (3,) -> (3, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype, device=x.device).view(3, 1, 1)  # (3,) -> (3, 1, 1)
    experts = {m.stats_name: m.config.num_experts for m in moes}
    fig = plot_patch_maps((x * std + mean).float().cpu(), maps, experts, "first-choice expert per image patch")
    heads = max(m.shape[1] for m in maps.values())
    caption = (f"{len(maps)} vision MoE layers" + (f", {heads} sub-token heads each" if heads > 1 else "")
               + "; colour = expert")
    return _figure_to_image(fig), caption


def respond(predictor: Predictor, img: Any, *rest: Any) -> tuple[str, Any, Any, str]:
    """The page's answer to one image: ``(text, drawn image or None, routing map, its caption)``.
    ``rest``: the values of the page inputs of the model's task (:class:`vlmoe.tasks.registry.Input`
    with ``page``, in order: the question of VQA, the right image and the sentence of NLVR2, the texts
    of retrieval one per line, the score threshold of detection). Missing input is a ValueError."""
    if img is None:
        raise ValueError("upload an image first")
    spec = predictor.spec()
    if spec is None or spec.predict is None:
        raise ValueError(f"this model's task is {predictor.task!r}: the page answers for finetuned models only")
    fields = [i for i in spec.predict.inputs if i.page]
    values = {i.name: (v.splitlines() if i.kind == "texts" and isinstance(v, str) else v)
              for i, v in zip(fields, rest)}
    text, shown = spec.predict.respond(predictor, img, values)
    picture, note = routing_picture(predictor, img)
    return text, shown, picture, note


def _component(gr: Any, i: Any) -> Any:
    """The Gradio input of one page input of a task (:class:`vlmoe.tasks.registry.Input`)."""
    eid = "image2" if i.kind == "image" else "text" if i.kind in ("text", "texts") else i.name
    if i.kind == "image":
        return gr.Image(type="pil", label=i.help, elem_id=eid)
    if i.kind in ("text", "texts"):
        return gr.Textbox(label=i.help, elem_id=eid, lines=3 if i.kind == "texts" else 1)
    if i.minimum is not None and i.maximum is not None:
        step = 1 if i.kind == "int" else (i.maximum - i.minimum) / 20
        return gr.Slider(i.minimum, i.maximum, value=i.default, step=step, label=i.help, elem_id=eid)
    return gr.Number(value=i.default, label=i.help, precision=0 if i.kind == "int" else None, elem_id=eid)


def build_app(predictor: Predictor, title: str | None = None) -> Any:
    """A ``gradio.Blocks`` page for the predictor's task (see the module docstring)."""
    gr = _gradio()
    task = predictor.task
    spec = predictor.spec()
    pred = spec.predict if spec is not None else None
    with gr.Blocks(title=title or TITLE) as app:
        gr.Markdown(f"## {title or TITLE}: a {task} model\n"
                    "Upload an image; the routing map shows which expert each patch of it chose.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", elem_id="image")
                inputs = [image] + [_component(gr, i) for i in (pred.inputs if pred else ()) if i.page]
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                answer = gr.Textbox(label="answer", elem_id="answer", lines=4)
                drawn = gr.Image(label="detections", visible=bool(pred and pred.draws), elem_id="detections")
                routing = gr.Image(label="routing map", elem_id="routing")
                routing_note = gr.Markdown(elem_id="routing_note")

        def predict(img: Any, *rest: Any) -> tuple[str, Any, Any, str]:
            try:
                return respond(predictor, img, *rest)
            except ValueError as e:  # what the user can fix, shown on the page
                raise gr.Error(str(e)) from None

        run.click(predict, inputs=inputs, outputs=[answer, drawn, routing, routing_note])
    return app
