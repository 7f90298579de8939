"""COCO detection and instance segmentation: ViTDet's recipe (window attention, simple feature pyramid)
on torchvision's Mask R-CNN with the vision branch of a vlmoe backbone (:mod:`vlmoe.models.detection`).

Training takes COCO ``instances_*.json`` (crowd annotations and images without objects are left out of
training, as torchvision's references do), with large-scale jitter from torchvision transforms v2
(random flip, scale jitter, a fixed-size crop padded where the image is smaller, boxes and masks kept
consistent, degenerate boxes dropped). The loss is Mask R-CNN's sum (RPN objectness + box, ROI class +
box + mask) plus the MoE auxiliary terms of the backbone, with routing statistics as in every task.

Evaluation predicts every image of the split, writes ``<stage>_detections.json`` in the COCO results
format (``[x, y, w, h]`` boxes in original pixels, the dataset's category ids, RLE masks, scores) and
scores it with pycocotools' COCOeval (:mod:`vlmoe.metrics.coco`: the 12 stats of ``bbox`` and
``segm``, logged as ``val/bbox_AP``, ...); images seen twice under DDP count once. The best checkpoint
is kept by box AP. ``vlmoe evaluate coco`` on that file gives the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlmoe.data.coco import COCOInstances
from vlmoe.data.collate import collate_detection
from vlmoe.data.images import fit_within, open_image, original_size
from vlmoe.data.inputs import as_list
from vlmoe.data.transforms import resolve_mean_std
from vlmoe.io import atomic_write_json
from vlmoe.metrics.coco import COCOEvaluator
from vlmoe.models import VLMoE
from vlmoe.models.detection import VLMoEForDetection

from ..registry import Input, Prediction, TaskSpec, register_task
from .base import DEMO, FinetuneDataModule, FinetuneTask, demo_recipe

__all__ = ["DetectionDataModule", "DetectionTask", "DetectionTransform", "to_coco_results"]


def to_coco_results(output: dict[str, Tensor], image_id: int, label_to_category: dict[int, int],
                    masks: bool = True, mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """One image's torchvision detections -> COCO results (xywh boxes, category ids, RLE masks)."""
    from pycocotools import mask as mask_utils

    boxes = output["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    labels, scores = output["labels"].tolist(), output["scores"].detach().float().cpu().tolist()
    rles = []
    if masks and "masks" in output:
        binary = (output["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)  # (N, H, W)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
    out = []
    for i, (box, label, score) in enumerate(zip(xywh, labels, scores)):
        r = {"image_id": int(image_id), "category_id": int(label_to_category[int(label)]),
             "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)}
        if len(rles):
            r["segmentation"] = {"size": [int(s) for s in rles[i]["size"]], "counts": rles[i]["counts"].decode("ascii")}
        out.append(r)
    return out


class DetectionTransform:
    """``(PIL image, COCOInstances target) -> (float image in [0, 1], target)``; training adds large-scale
    jitter (flip, scale jitter of the ``size`` square by ``scale_range``, a ``size`` crop padded with
    zeros where needed, degenerate boxes removed with their labels and masks)."""

    def __init__(self, train: bool, size: int, scale_range: tuple[float, float] = (0.1, 2.0), hflip: float = 0.5):
        from torchvision.transforms import v2

        self.train = train
        steps: list[Any] = [v2.ToImage()]
        if train:
            steps += [v2.RandomHorizontalFlip(hflip), v2.ScaleJitter((size, size), scale_range=tuple(scale_range)),
                      v2.RandomCrop(size, pad_if_needed=True), v2.SanitizeBoundingBoxes()]
        steps.append(v2.ToDtype(torch.float32, scale=True))
        self.t = v2.Compose(steps)

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        from torchvision import tv_tensors

        w, h = image.size
        if not self.train:
            img, _ = self.t(image, {})
            return img, target
        t = {"boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w)),
             "labels": target["labels"], "image_id": target["image_id"]}
        if "masks" in target:
            t["masks"] = tv_tensors.Mask(target["masks"])
        img, t = self.t(image, t)
        t["boxes"] = t["boxes"].as_subclass(Tensor)
        if "masks" in t:
            t["masks"] = t["masks"].as_subclass(Tensor)
        return img, t


class DetectionTask(FinetuneTask):
    """Detection finetuning (see the module docstring).

    Args:
        class_names: object classes in label order (linked from the data module).
        category_ids: the dataset's category id of each label 1..K (linked from the data module).
        mean_std: the images' normalisation inside the detector (linked from the data module).
        window_size: window attention side in patches (0: global everywhere).
        global_blocks: blocks with global attention (default: the last of each quarter).
        out_channels / head_channels / fc_dim: pyramid, head conv and box-head fc widths.
        masks: instance masks (Mask R-CNN) or boxes only.
        detector_options: further torchvision ``MaskRCNN`` arguments (``box_batch_size_per_image``, ...).
        **kwargs: :class:`~vlmoe.tasks.finetune.FinetuneTask` options (``image_size``: the detector's
            input side, 1024 in ViTDet).
    """

    default_overrides = {"final_norm": False, "modalities": ["vision"]}
    metric_key = "bbox_AP"

    def __init__(
        self,
        class_names: list[str] | None = None,
        category_ids: list[int] | None = None,
        mean_std: Any = "inception",
        window_size: int = 14,
        global_blocks: list[int] | None = None,
        out_channels: int = 256,
        head_channels: int = 256,
        fc_dim: int = 1024,
        masks: bool = True,
        detector_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not class_names:
            raise ValueError("model.class_names is empty: the detection data module links them from its categories")
        self.class_names = list(class_names)
        ids = list(category_ids) if category_ids is not None else list(range(1, len(self.class_names) + 1))
        if len(ids) != len(self.class_names):
            raise ValueError(f"{len(ids)} category ids for {len(self.class_names)} class names")
        self.label_to_category = {i + 1: c for i, c in enumerate(ids)}
        self.mean, self.std = resolve_mean_std(mean_std)
        self.det_options = dict(window_size=window_size, global_blocks=global_blocks, out_channels=out_channels,
                                masks=masks, detector_options={"head_channels": head_channels, "fc_dim": fc_dim,
                                                               **(detector_options or {})})
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_model(self, backbone: VLMoE) -> VLMoEForDetection:
        return VLMoEForDetection(backbone, self.class_names, image_size=backbone.config.img_size, mean=self.mean,
                                 std=self.std, **self.det_options)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.model(batch["image"], batch["targets"])
        loss = sum(losses.values())
        self.log_dict({f"loss/{k}": v.detach() for k, v in losses.items()}, on_step=True, on_epoch=False)
        return self.loss_with_aux(loss, self.model.aux)

    def batch_size_and_tokens(self, batch: dict[str, Any]) -> tuple[int, int]:
        """Images of a detection batch (a list) and their patches at the detector's input size."""
        n, side = len(batch["image"]), self.model.image_size // self.config.patch_size
        return n, n * side * side

    def make_evaluator(self, stage: str) -> COCOEvaluator:
        dm = self.trainer.datamodule
        gt = dm.ground_truth(stage) if dm is not None and hasattr(dm, "ground_truth") else None
        if gt is None:
            raise ValueError(f"no ground truth for the {stage} split (data.{stage}_annotations)")
        return COCOEvaluator(gt, ("bbox", "segm") if self.det_options["masks"] else ("bbox",))

    def eval_step(self, batch: dict[str, Any]) -> tuple[Tensor | None, list[dict[str, Any]]]:
        outputs = self.model(batch["image"])
        records = []
        for out, target in zip(outputs, batch["targets"]):
            image_id = int(target["image_id"])
            dets = to_coco_results(out, image_id, self.label_to_category, self.det_options["masks"])
            records.append({"image_id": image_id, "detections": dets})
        return None, records

    def write_outputs(self, stage: str, evaluator: COCOEvaluator, metrics: dict[str, float]) -> None:
        out = Path(self.output_dir)
        atomic_write_json(out / f"{stage}_detections.json", evaluator.results())
        if metrics:
            atomic_write_json(out / f"{stage}_metrics.json", {"step": self.evaluated_step, **metrics}, indent=1)


class DetectionDataModule(FinetuneDataModule):
    """COCO instances files and image folders; ``demo``: the demo's easy-vqa shapes (3 classes, boxes and
    masks measured from the pixels).

    Args:
        train_annotations / train_images: ``instances_train*.json`` and its image folder.
        val_annotations / val_images: the evaluation split.
        test_annotations / test_images: an optional test split.
        scale_range: large-scale jitter range of training images (ViTDet: 0.1 - 2.0).
        masks: decode instance masks (Mask R-CNN) or not (boxes only).
        **kwargs: :class:`~vlmoe.tasks.finetune.FinetuneDataModule` options (``image_size``: the
            training crop, the model's input size).
    """

    def __init__(
        self,
        train_annotations: str | None = DEMO,
        train_images: str | None = DEMO,
        val_annotations: str | None = DEMO,
        val_images: str | None = DEMO,
        test_annotations: str | None = None,
        test_images: str | None = None,
        scale_range: tuple[float, float] = (0.1, 2.0),
        masks: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("tokenizer", None)
        super().__init__(**kwargs)
        self.files = {"train_annotations": train_annotations, "train_images": train_images,
                      "val_annotations": val_annotations, "val_images": val_images,
                      "test_annotations": test_annotations, "test_images": test_images}
        self.scale_range, self.masks = tuple(scale_range), masks
        self._categories: tuple[list[str], list[int]] | None = None

    def demo_files(self, d: Any) -> dict[str, Any]:
        return {"train_annotations": d.coco_instances_train, "train_images": d.coco_images / "train2014",
                "val_annotations": d.coco_instances_val, "val_images": d.coco_images / "val2014"}

    def _read_categories(self) -> tuple[list[str], list[int]]:
        if self._categories is None:
            from vlmoe.data._io import load_json

            f = self.resolve()
            path = f["train_annotations"] or f["val_annotations"]
            if not path:
                raise ValueError("data.train_annotations / data.val_annotations: give a COCO instances file")
            cats = sorted(load_json(path).get("categories", []), key=lambda c: c["id"])
            if not cats:
                raise ValueError(f"{path}: no 'categories'")
            self._categories = ([c["name"] for c in cats], [int(c["id"]) for c in cats])
        return self._categories

    @property
    def class_names(self) -> list[str]:
        return self._read_categories()[0]

    @property
    def category_ids(self) -> list[int]:
        return self._read_categories()[1]

    @property
    def mean_std_values(self) -> Any:
        return self._mean_std

    def ground_truth(self, stage: str) -> str | None:
        return self.resolve().get(f"{stage}_annotations")

    def _dataset(self, split: str, train: bool) -> COCOInstances:
        f = self.resolve()
        size = self.resolved_image_size()
        data = COCOInstances(f[f"{split}_annotations"], f[f"{split}_images"], masks=self.masks,
                             transforms=DetectionTransform(train, size, self.scale_range, self.hflip))
        if tuple(self.category_ids) != tuple(sorted(data.coco.cats)):
            raise ValueError(f"{f[f'{split}_annotations']}: categories {sorted(data.coco.cats)} differ from the "
                             f"training file's {self.category_ids}")
        if train:  # images without (non-crowd) objects teach nothing here, as in torchvision's references
            data.ids = [i for i in data.ids if any(not a.get("iscrowd", 0) for a in data.coco.imgToAnns.get(i, []))]
        if not data.ids:
            raise ValueError(f"{f[f'{split}_annotations']}: no {'annotated ' if train else ''}images")
        return data

    def setup(self, stage: str | None = None) -> None:
        f = self.resolve()
        if stage in ("fit", None) and "train" not in self.datasets and f["train_annotations"]:
            self.datasets["train"] = self._dataset("train", True)
        if stage in ("fit", "validate", None) and "val" not in self.datasets and f["val_annotations"]:
            self.datasets["val"] = self._dataset("val", False)
        if stage in ("test", "predict", None) and "test" not in self.datasets:
            if f["test_annotations"]:
                self.datasets["test"] = self._dataset("test", False)
            elif stage == "test":
                raise ValueError("data.test_annotations is not set")

    def collator(self) -> Any:
        return collate_detection


# ---------------------------------------------------------------------- use on one's own images
DRAW_SIZE = 1024  # the longer side of the picture the web page draws detections on (a page shows no more)


def detect(predictor: Any, images: Any, score_threshold: float = 0.5, masks: bool = True,
           mask_threshold: float = 0.5) -> list[list[dict[str, Any]]]:
    """Detection: per image ``{"label", "score", "box": [x0, y0, x1, y1]}`` (original pixels) above
    ``score_threshold``, with ``"mask"`` (bool ``(H, W)`` tensor) when the model has masks and ``masks``
    is True (each mask is scaled up to the original size only then). The detector gets each image at
    its own input size (the longer side ``model.image_size``), so its masks are pasted at that size."""
    from torch.nn.functional import interpolate
    from torchvision.transforms.functional import pil_to_tensor

    model, imgs, out = predictor.model, as_list(images), []
    for s in predictor.batches(len(imgs)):
        opened = predictor.open_all(imgs[s], s.start)
        inputs = [fit_within(im, model.image_size) for im in opened]
        batch = [pil_to_tensor(im).to(predictor.device, dtype=predictor.dtype or torch.float32) / 255.0
                 for im in inputs]
        for im, x, det in zip(opened, inputs, model(batch)):
            w, h = original_size(im)
            sx, sy = w / x.width, h / x.height
            keep = det["scores"] >= score_threshold
            rows = []
            for j in keep.nonzero().flatten().tolist():
                x0, y0, x1, y1 = det["boxes"][j].tolist()
                r = {"label": model.class_names[int(det["labels"][j]) - 1], "score": float(det["scores"][j]),
                     "box": [round(min(v, lim), 2) for v, lim in ((x0 * sx, w), (y0 * sy, h), (x1 * sx, w),
                                                                 (y1 * sy, h))]}
                if masks and "masks" in det:
                    m = det["masks"][j : j + 1].float()  # (1, 1, h', w') probabilities
                    if m.shape[-2:] != (h, w):
                        m = interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                    r["mask"] = (m[0, 0] > mask_threshold).cpu()
                rows.append(r)
            out.append(rows)
    return out


def draw_detections(image: Any, dets: list[dict[str, Any]]) -> Any:
    """``image`` (PIL) with the boxes, labels and scores drawn, and the masks tinted when every detection
    has one."""
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


def detection_page(predictor: Any, image: Any, score_threshold: float = 0.5) -> tuple[str, Any]:
    """The web page's answer: the detections of the upload scaled to at most :data:`DRAW_SIZE` pixels a
    side (so the masks come at that size, not the upload's), drawn on it; the listed boxes are in the
    upload's pixels."""
    upload = open_image(image)
    picture = fit_within(upload, DRAW_SIZE)
    dets = detect(predictor, picture, score_threshold=score_threshold)[0]
    (w, h), (pw, ph) = upload.size, picture.size
    scale = [w / pw, h / ph] * 2  # picture -> upload pixels, per box coordinate
    text = "\n".join(f"{d['label']} {d['score']:.2f} {[round(v * f, 2) for v, f in zip(d['box'], scale)]}"
                     for d in dets) or "no detections"
    return text, draw_detections(picture, dets)


register_task(TaskSpec(
    name="detection", task=DetectionTask, data=DetectionDataModule, model=VLMoEForDetection, metric="bbox_AP",
    links=(("data.class_names", "model.class_names"), ("data.category_ids", "model.category_ids"),
           ("data.mean_std_values", "model.mean_std")),
    demo=demo_recipe({
        # the tiny demo model (patch 8) at 128 px: a 16 x 16 patch grid, 8 x 8 windows in block 0,
        # global attention in block 1; narrow pyramid and heads for a CPU
        "model.image_size": 128,
        "model.window_size": 8,
        "model.out_channels": 64,
        "model.head_channels": 64,
        "model.fc_dim": 256,
        # one object per image: far fewer proposals and sampled ROIs than COCO needs (2x faster)
        "model.detector_options": {
            "box_batch_size_per_image": 64, "rpn_batch_size_per_image": 64,
            "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 300,
            "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100, "box_detections_per_img": 20,
        },
        "model.lr": 3.0e-4,
        "model.warmup_steps": 100,
        "model.weight_decay": 0.1,
        "data.scale_range": [0.8, 1.25],
        "data.batch_size": 8,
        "data.val_batch_size": 25,
        "data.hflip": 0.5,
    }),
    trainer={"max_epochs": -1, "max_steps": 800, "val_check_interval": 800, "check_val_every_n_epoch": None},
    description="COCO detection / instance segmentation: ViTDet on torchvision's Mask R-CNN (box and mask AP).",
    demo_notes=(
        "  vlmoe pretrain && vlmoe finetune detection\n"
        "\n"
        "Starts from the demo pretraining checkpoint (the demo X-MoE model, vision branch only: its text weights are\n"
        "skipped), builds torchvision's Mask R-CNN on it with window attention (8 x 8 windows in block 0, global\n"
        "attention in block 1) and a 64-channel simple feature pyramid at 128 px (the demo's 64 px images are\n"
        "upscaled), trains 800 steps on the demo's COCO-format instances of easy-vqa's train images (one shape\n"
        "per image, three classes, boxes and masks measured from the pixels) and reports COCOeval box and mask\n"
        "AP on its 1,000 val images."
    ),
    predict=Prediction(
        "detect", detect, help="the objects in every image: boxes, labels, scores (masks: vlmoe.load(...).detect)",
        inputs=(Input("score_threshold", "float", "score threshold", default=0.5, minimum=0.0, maximum=1.0),),
        cli_kwargs={"masks": False},
        page=detection_page, draws=True,
    ),
    study_metrics=("bbox_AP", "bbox_AP50", "segm_AP"),
    study_budgets={
        "demo": ["--trainer.max_steps=150", "--trainer.val_check_interval=150", "--trainer.limit_val_batches=4",
                 "--model.warmup_steps=20"],
        "smoke": ["--trainer.max_steps=2", "--data.limit_train_samples=16", "--trainer.val_check_interval=2",
                  "--trainer.limit_val_batches=1", "--data.batch_size=4"],
    },
))
