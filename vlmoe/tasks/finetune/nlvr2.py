"""NLVR2 finetuning as BEiT-3 does it (``BEiT3ForVisualReasoning``, ``NLVR2Handler``).

Both images go through the backbone with the sentence; ``cat(vision CLS, first text token)`` of each
image, the two side by side (``4 D``), a two-layer MLP head (its linears scaled by 1e-3 at init),
cross-entropy over True / False. Evaluation: accuracy and consistency (every statement of a sentence
right) on dev and test-P.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from vlmoe.data.nlvr2 import NLVR2Dataset
from vlmoe.metrics.nlvr2 import NLVR2Evaluator
from vlmoe.models import VLMoE, VLMoEForNLVR2

from .base import DEMO, FinetuneDataModule, FinetuneTask

__all__ = ["NLVR2DataModule", "NLVR2Task"]


class NLVR2Task(FinetuneTask):
    """NLVR2 finetuning (see the module docstring); options: :class:`~vlmoe.tasks.finetune.FinetuneTask`'s."""

    has_control = True
    needs_text = True

    def __init__(self, head_init_scale: float = 1e-3, **kwargs: Any) -> None:
        """Args: head_init_scale: the scale of the head's linears at init (BEiT-3: 1e-3); other options:
        :class:`~vlmoe.tasks.finetune.FinetuneTask`'s."""
        self.head_init_scale = head_init_scale
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_model(self, backbone: VLMoE) -> VLMoEForNLVR2:
        return VLMoEForNLVR2(backbone, init_scale=self.head_init_scale)

    def _forward(self, batch: dict[str, Any]) -> tuple[Tensor, Any]:
        return self.model(batch["image"], batch["image2"], batch["text_ids"], batch["text_padding_mask"],
                          return_aux=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits, aux = self._forward(batch)
        return self.loss_with_aux(F.cross_entropy(logits.float(), batch["label"]), aux)

    def make_evaluator(self, stage: str) -> NLVR2Evaluator:
        return NLVR2Evaluator()

    def eval_step(self, batch: dict[str, Any]) -> tuple[Tensor | None, list[dict[str, Any]]]:
        logits, aux = self._forward(batch)
        loss = self.loss_with_aux(F.cross_entropy(logits.float(), batch["label"]), aux, stage="val")
        pred = logits.argmax(-1).tolist()
        return loss, [{"identifier": i, "prediction": p, "label": int(y)}
                      for i, p, y in zip(batch["identifier"], pred, batch["label"].tolist())]


class NLVR2DataModule(FinetuneDataModule):
    """NLVR2 JSON-lines files and image folders (see :mod:`vlmoe.data.nlvr2`); ``demo``: the demo data's.

    Args:
        train: the training ``train.json``.
        val: the evaluation file (``dev.json``).
        test: the test file (``test1.json``, test-P), or None.
        image_root: the folder holding ``train/``, ``dev/``, ``test1/``.
        **kwargs: :class:`~vlmoe.tasks.finetune.FinetuneDataModule` options.
    """

    def __init__(self, train: str | None = DEMO, val: str | None = DEMO, test: str | None = DEMO,
                 image_root: str | None = DEMO, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.files = {"train": train, "val": val, "test": test, "image_root": image_root}

    def demo_files(self, d: Any) -> dict[str, Any]:
        return {"train": d.nlvr2_train, "val": d.nlvr2_dev, "test": d.nlvr2_test, "image_root": d.nlvr2_images}

    def image_keys(self, data: NLVR2Dataset) -> list[tuple[str, str]]:
        """The (left, right) image files of every statement: the control replaces both by another
        statement's pair."""
        return [tuple(str(p) for p in data.image_paths(i)) for i in range(len(data))]

    def setup(self, stage: str | None = None) -> None:
        f = self.resolve()
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test", "val")}
        for split in wanted.get(stage, ("train", "val", "test")):
            if split not in self.datasets and f[split]:
                transform = self.transform(split == "train")
                self.datasets[split] = NLVR2Dataset(f[split], f["image_root"], transform=transform)
        if stage == "test" and "test" not in self.datasets:
            raise ValueError("data.test is not set: give the NLVR2 test1.json (test-P)")
