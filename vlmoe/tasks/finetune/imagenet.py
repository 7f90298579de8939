"""ImageNet-1k finetuning as BEiT-3 does it (``BEiT3ForImageClassification``).

The vision branch alone (the text branch is not built, nor counted in parameters and FLOPs), no final
norm; ``fc_norm`` of the mean patch token, a linear head scaled by 1e-3 at init. Training: timm's
RandAugment transform (``rand-m9-mstd0.5-inc1``, colour jitter 0.4, random erasing 0.25) and timm's
Mixup / CutMix with label smoothing (soft-target cross-entropy); ImageNet mean / std. Evaluation: top-1
and top-5 over the validation folder (resize ``size / crop_pct`` and centre crop).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmoe.data import build_transform
from vlmoe.data.imagenet import ImageFolderDataset, class_names
from vlmoe.metrics.classification import ClassificationEvaluator
from vlmoe.models import VLMoE, VLMoEForImageClassification

from .base import DEMO, FinetuneDataModule, FinetuneTask

__all__ = ["ImageNetDataModule", "ImageNetTask"]


class ImageNetTask(FinetuneTask):
    """ImageNet finetuning.

    Args:
        class_names: the classes in label order (linked from the data module by the CLI).
        mixup: Mixup alpha (0: off).
        cutmix: CutMix alpha (0: off).
        mixup_prob: probability of mixing a batch.
        label_smoothing: label smoothing of the (mixed) targets.
        **kwargs: :class:`~vlmoe.tasks.finetune.FinetuneTask` options.
    """

    default_overrides = {"final_norm": False, "modalities": ["vision"]}
    metric_key = "top1"

    def __init__(
        self,
        class_names: list[str] | None = None,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        label_smoothing: float = 0.1,
        **kwargs: Any,
    ) -> None:
        self.class_names = list(class_names or [])
        if not self.class_names:
            raise ValueError("model.class_names: the classification task needs the classes (the data module's)")
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup

            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                                  label_smoothing=label_smoothing, num_classes=len(self.class_names))
        self.label_smoothing = label_smoothing

    def build_model(self, backbone: VLMoE) -> VLMoEForImageClassification:
        return VLMoEForImageClassification(backbone, class_names=self.class_names)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image, label = batch["image"], batch["label"]
        if self.mixup_fn is not None and image.shape[0] % 2 == 0:  # timm's Mixup pairs the batch
            image, target = self.mixup_fn(image, label)
            logits, aux = self.model(image, return_aux=True)
            loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits, aux = self.model(image, return_aux=True)
            loss = F.cross_entropy(logits.float(), label, label_smoothing=self.label_smoothing)
        return self.loss_with_aux(loss, aux)

    def make_evaluator(self, stage: str) -> ClassificationEvaluator:
        return ClassificationEvaluator(ks=(1, 5), num_classes=len(self.class_names))

    def eval_step(self, batch: dict[str, Any]) -> tuple[Tensor | None, list[dict[str, Any]]]:
        logits, aux = self.model(batch["image"], return_aux=True)
        loss = self.loss_with_aux(F.cross_entropy(logits.float(), batch["label"]), aux, stage="val")
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.tolist()
        return loss, [{"index": int(i), "label": int(y), "topk": t}
                      for i, y, t in zip(batch["index"].tolist(), batch["label"].tolist(), top)]


class _Indexed(torch.utils.data.Dataset):
    """Add each sample's index (the evaluator's sample id)."""

    def __init__(self, data: ImageFolderDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.data[i], "index": i}


class ImageNetDataModule(FinetuneDataModule):
    """Image folders by class (``<root>/<class>/<image>``); ``demo``: the demo's shape folders.

    Args:
        train: training folder.
        val: validation folder.
        crop_pct: evaluation resize ``size / crop_pct`` before the centre crop.
        randaug: timm AutoAugment / RandAugment string of training images.
        scale: random resized crop area range of training images (timm's default ``(0.08, 1)``).
        re_prob: random erasing probability of training images (BEiT-3: 0.25).
        **kwargs: :class:`~vlmoe.tasks.finetune.FinetuneDataModule` options (``tokenizer`` is unused).
    """

    def __init__(self, train: str | None = DEMO, val: str | None = DEMO, crop_pct: float = 1.0,
                 randaug: str = "rand-m9-mstd0.5-inc1", scale: tuple[float, float] = (0.08, 1.0),
                 re_prob: float = 0.25, **kwargs: Any) -> None:
        kwargs.setdefault("mean_std", "imagenet")
        kwargs["scale"] = scale
        kwargs["tokenizer"] = None
        super().__init__(randaug=randaug, **kwargs)
        self.files = {"train": train, "val": val}
        self.crop_pct, self.re_prob = crop_pct, re_prob
        self._classes: list[str] | None = None

    def demo_files(self, d: Any) -> dict[str, Any]:
        return {"train": d.imagefolder_shape / "train", "val": d.imagefolder_shape / "val"}

    @property
    def class_names(self) -> list[str]:
        """Readable class names in label order (timm's ImageNet names for synset folders)."""
        if self._classes is None:
            f = self.resolve()
            self._classes = class_names(ImageFolderDataset(f["train"] or f["val"]).classes)
        return self._classes

    def eval_resize(self) -> dict[str, Any]:
        return {"resize": "center_crop", "crop_pct": self.crop_pct}

    def transform(self, train: bool) -> Any:
        size = self.resolved_image_size()
        if train:
            return build_transform("imagenet_train", size, mean_std=self.mean_std, hflip=self.hflip,
                                   randaug=self.randaug, imagenet_scale=self.scale, re_prob=self.re_prob)
        return build_transform("imagenet_eval", size, mean_std=self.mean_std, crop_pct=self.crop_pct)

    def collator(self) -> Any:
        from vlmoe.data import Collator

        return Collator(None, self.max_len)

    def setup(self, stage: str | None = None) -> None:
        f = self.resolve()
        for split in ("train", "val"):
            if split not in self.datasets and f[split] and (split == "val" or stage in ("fit", None)):
                data = ImageFolderDataset(f[split], transform=self.transform(split == "train"))
                if data.classes != ImageFolderDataset(f["train"] or f["val"]).classes:
                    raise ValueError(f"{f[split]}: its class folders differ from {f['train']}'s")
                self.datasets[split] = _Indexed(data)
        if "val" in self.datasets:
            self.datasets.setdefault("test", self.datasets["val"])
