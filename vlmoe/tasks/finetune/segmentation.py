"""Semantic segmentation finetuning: BEiT's UperNet recipe on the vision branch (``vlmoe finetune
segmentation``).

- Model: :class:`~vlmoe.models.VLMoEForSegmentation` (four blocks -> BEiT's neck -> UperNet + the
  auxiliary FCN head), the backbone's vision branch without its final norm.
- Loss: pixel cross-entropy with 255 ignored, plus ``aux_weight`` (0.4) x the auxiliary head's, plus
  the MoE auxiliary terms.
- Data: an ADE20K release (``data.root``, reduce-zero-label), any folders of images + label PNGs
  (``data.{train,val}_{images,annotations}`` with ``data.num_classes``), or ``demo``: the label maps of
  the demo's COCO instances (background + the three shapes of easy-vqa).
- Evaluation: every image's logits resized (bilinear) to its label map's original size, argmax, and the
  ADE20K protocol over the whole split (:class:`~vlmoe.metrics.segmentation.SegmentationEvaluator`:
  mIoU, aAcc, mAcc, per-class IoU); the best checkpoint is kept by mIoU.

Not built yet: sliding-window and multi-scale + flip inference (the evaluation resizes the whole image
to the model's side), mmsegmentation's cat_max_ratio re-crop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmoe.data import Collator
from vlmoe.data.inputs import as_list
from vlmoe.data.segmentation import COCOSemantic, SegmentationFolder, SegmentationTransform, ade20k_folders
from vlmoe.metrics.segmentation import SegmentationEvaluator, segmentation_record
from vlmoe.models import VLMoE, VLMoEForSegmentation
from vlmoe.protocols.segmentation import IGNORE_INDEX

from ..registry import Prediction, TaskSpec, register_task
from .base import DEMO, FinetuneDataModule, FinetuneTask, demo_recipe

__all__ = ["SegmentationDataModule", "SegmentationTask", "segment"]


class SegmentationTask(FinetuneTask):
    """Semantic segmentation finetuning.

    Args:
        class_names: the classes in label order (linked from the data module by the CLI).
        out_indices: the four blocks feeding the neck (default: BEiT's for 12 / 24 blocks).
        decoder_channels: UperNet's width (default: the backbone's).
        aux_channels: the auxiliary FCN head's width.
        aux_weight: the auxiliary head's loss weight.
        **kwargs: :class:`~vlmoe.tasks.finetune.FinetuneTask` options.
    """

    default_overrides = {"final_norm": False, "modalities": ["vision"]}
    metric_key = "mIoU"

    def __init__(self, class_names: list[str] | None = None, out_indices: list[int] | None = None,
                 decoder_channels: int | None = None, aux_channels: int = 256, aux_weight: float = 0.4,
                 **kwargs: Any) -> None:
        self.class_names = list(class_names or [])
        if len(self.class_names) < 2:
            raise ValueError("model.class_names: segmentation needs at least two classes (the data module's)")
        self.out_indices, self.decoder_channels, self.aux_channels = out_indices, decoder_channels, aux_channels
        self.aux_weight = aux_weight
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_model(self, backbone: VLMoE) -> VLMoEForSegmentation:
        return VLMoEForSegmentation(backbone, class_names=self.class_names, out_indices=self.out_indices,
                                    decoder_channels=self.decoder_channels, aux_channels=self.aux_channels)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits, aux_logits, aux = self.model(batch["image"], return_aux=True, return_aux_logits=True)
        label = batch["label"]
        loss = F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX)
        loss = loss + self.aux_weight * F.cross_entropy(aux_logits.float(), label, ignore_index=IGNORE_INDEX)
        return self.loss_with_aux(loss, aux)

    def make_evaluator(self, stage: str) -> SegmentationEvaluator:
        return SegmentationEvaluator(len(self.class_names), self.class_names)

    def eval_step(self, batch: dict[str, Any]) -> tuple[Tensor | None, list[dict[str, Any]]]:
        logits = self.model(batch["image"])  # (B, C, S, S)
        records = []
        for i, label in enumerate(batch["label"]):  # each at its own resolution
            up = F.interpolate(logits[i : i + 1].float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
            pred = up.argmax(1)[0]  # (1, C, H, W) -> (H, W)
            records.append(segmentation_record(batch["image_id"][i], pred.cpu().numpy(), label.cpu().numpy(),
                                               len(self.class_names)))
        return None, records


class SegmentationDataModule(FinetuneDataModule):
    """Images with label maps (see the module docstring).

    Args:
        root: an ADE20K release (``ADEChallengeData2016``): its training and validation folders, the zero
            label reduced, 150 classes.
        train_images / train_annotations / val_images / val_annotations: folders of images and label
            PNGs (matched by file name); ``demo``: the demo's COCO instances painted as label maps.
        num_classes: classes of the folders (ADE20K: 150).
        class_names: their names (default: ``class0``, ``class1``, ...).
        reduce_zero_label: the folders use ADE20K's numbering (0 = other, not evaluated).
        short_side / ratio: the training random resize (see :class:`~vlmoe.data.segmentation.SegmentationTransform`).
        photometric: colour jitter in training.
        **kwargs: :class:`~vlmoe.tasks.finetune.FinetuneDataModule` options (``image_size``: the training
            crop and the evaluation side, the model's).
    """

    def __init__(
        self,
        root: str | None = None,
        train_images: str | None = DEMO,
        train_annotations: str | None = DEMO,
        val_images: str | None = DEMO,
        val_annotations: str | None = DEMO,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        reduce_zero_label: bool = False,
        short_side: int | None = None,
        ratio: tuple[float, float] = (0.5, 2.0),
        photometric: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs["tokenizer"] = None
        super().__init__(**kwargs)
        if root is not None:
            (train_images, train_annotations), (val_images, val_annotations) = (
                (str(p) for p in ade20k_folders(root, split)) for split in ("training", "validation"))
            num_classes, reduce_zero_label = num_classes or 150, True
        self.files = {"train_images": train_images, "train_annotations": train_annotations,
                      "val_images": val_images, "val_annotations": val_annotations}
        self.num_classes, self._class_names, self.reduce_zero_label = num_classes, class_names, reduce_zero_label
        self.short_side, self.ratio, self.photometric = short_side, tuple(ratio), photometric

    def demo_files(self, d: Any) -> dict[str, Any]:
        return {"train_images": d.root / "coco" / "train2014", "train_annotations": d.coco_instances_train,
                "val_images": d.root / "coco" / "val2014", "val_annotations": d.coco_instances_val}

    @property
    def class_names(self) -> list[str]:
        """The classes in label order (the demo's: background and the three shapes)."""
        if self._class_names is None:
            f = self.resolve()
            if str(f["train_annotations"]).endswith(".json"):
                self._class_names = COCOSemantic(f["train_annotations"], f["train_images"]).class_names
            elif self.num_classes:
                self._class_names = [f"class{c}" for c in range(self.num_classes)]
            else:
                raise ValueError("data.num_classes (or data.class_names) is needed for folders of label PNGs")
        return self._class_names

    def transform(self, train: bool) -> Any:
        size = self.resolved_image_size()
        return SegmentationTransform(train, size, short_side=self.short_side, ratio=self.ratio,
                                     hflip=self.hflip, photometric=self.photometric)

    def _dataset(self, split: str) -> Any:
        f = self.resolve()
        images, annotations = f[f"{split}_images"], f[f"{split}_annotations"]
        transform = self.transform(split == "train")
        if str(annotations).endswith(".json"):
            return COCOSemantic(annotations, images, transform=transform)
        return SegmentationFolder(images, annotations, len(self.class_names), reduce_zero=self.reduce_zero_label,
                                  transform=transform, class_names=self.class_names)

    def setup(self, stage: str | None = None) -> None:
        f = self.resolve()
        if stage in ("fit", None) and "train" not in self.datasets and f["train_annotations"]:
            self.datasets["train"] = self._dataset("train")
        evaluating = stage in ("fit", "validate", "test", "predict", None)
        if evaluating and "val" not in self.datasets and f["val_annotations"]:
            self.datasets["val"] = self._dataset("val")
            self.datasets.setdefault("test", self.datasets["val"])

    def collator(self) -> Any:
        images = Collator(None, self.max_len, mean_std=self.mean_std)

        def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = images([{"image": s["image"]} for s in samples])
            labels = [s["label"] for s in samples]
            same = all(lab.shape == labels[0].shape for lab in labels)
            batch["label"] = torch.stack(labels) if same else labels
            batch["image_id"] = [s["image_id"] for s in samples]
            return batch

        return collate


# ---------------------------------------------------------------------- use on one's own images
def segment(predictor: Any, images: Any) -> list[dict[str, Any]]:
    """Semantic segmentation: per image ``{"label_map": (H, W) int64 tensor at the original size,
    "classes": {name: share of the image's pixels}}``."""
    from vlmoe.data.images import original_size

    model, imgs, out = predictor.model, as_list(images), []
    names = model.class_names or [str(c) for c in range(model.num_classes)]
    for s in predictor.batches(len(imgs)):
        opened = predictor.open_all(imgs[s], s.start)
        logits = model(predictor.images(opened)).float()
        for im, lg in zip(opened, logits):
            w, h = original_size(im)
            label = F.interpolate(lg[None], size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0].cpu()
            counts = torch.bincount(label.flatten(), minlength=len(names)).tolist()
            out.append({"label_map": label,
                        "classes": {names[c]: round(n / label.numel(), 4) for c, n in enumerate(counts) if n}})
    return out


register_task(TaskSpec(
    name="segmentation", task=SegmentationTask, data=SegmentationDataModule, model=VLMoEForSegmentation,
    metric="mIoU", links=(("data.class_names", "model.class_names"),),
    demo=demo_recipe({
        # the demo's 64 px shapes: an 8 x 8 patch grid, the neck's levels 32 / 16 / 8 / 4; a narrow head
        "model.image_size": 64,
        "model.decoder_channels": 64,
        "model.aux_channels": 64,
        "model.lr": 1.0e-3,
        "model.warmup_steps": 50,
        "model.weight_decay": 0.05,
        "data.batch_size": 32,
        "data.val_batch_size": 100,
        "data.ratio": [0.75, 1.5],
        "data.hflip": 0.5,
    }),
    trainer={"max_epochs": 4, "max_steps": -1},
    description="Semantic segmentation, vision branch only (BEiT's neck + UperNet; mIoU / aAcc / mAcc).",
    demo_notes=(
        "  vlmoe pretrain && vlmoe finetune segmentation\n"
        "\n"
        "Starts from the demo pretraining checkpoint (its vision branch), paints the demo's COCO instances of\n"
        "easy-vqa's images as label maps (background + circle / rectangle / triangle), trains at 64 px with\n"
        "random resize (0.75-1.5), crop, flip and colour jitter, and scores mIoU / aAcc / mAcc on the 1,000\n"
        "val images at their own resolution."
    ),
    predict=Prediction(
        "segment", segment, help="the class of every pixel of every image (share of each class)",
        row=lambda r: {"classes": r["classes"]},
        text=lambda r: "\n".join(f"{n}  {v:.1%}" for n, v in sorted(r["classes"].items(), key=lambda x: -x[1])),
    ),
))
