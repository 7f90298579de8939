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

from vlmoe.data.inputs import as_list, strings
from vlmoe.data.nlvr2 import NLVR2Dataset
from vlmoe.metrics.nlvr2 import NLVR2Evaluator
from vlmoe.models import VLMoE, VLMoEForNLVR2

from ..registry import Input, Prediction, TaskSpec, register_task
from .base import DEMO, SMOKE_BUDGET, WHOLE_IMAGES, FinetuneDataModule, FinetuneTask, demo_recipe

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


# ---------------------------------------------------------------------- use on one's own images
def verify(predictor: Any, left: Any, right: Any, sentences: str | list[str]) -> list[dict[str, Any]]:
    """NLVR2: is the sentence true of the (left, right) pair? ``{"true": bool, "score": p(true)}`` per pair;
    one right image or one sentence goes with every left image."""
    a, b, ss = as_list(left), as_list(right), strings(sentences, "sentences")
    if len(b) == 1 and len(a) > 1:
        b = b * len(a)
    if len(ss) == 1 and len(a) > 1:
        ss = ss * len(a)
    if not len(a) == len(b) == len(ss):
        raise ValueError(f"{len(a)} left images, {len(b)} right images and {len(ss)} sentences")
    out = []
    for s in predictor.batches(len(a)):
        ids, pad = predictor.texts(ss[s])
        p = predictor.model(predictor.images(a[s], s.start), predictor.images(b[s], s.start), ids,
                            pad).float().softmax(-1)[:, 1]
        out += [{"true": bool(v > 0.5), "score": float(v)} for v in p.tolist()]
    return out


register_task(TaskSpec(
    name="nlvr2", task=NLVR2Task, data=NLVR2DataModule, model=VLMoEForNLVR2, metric="accuracy",
    demo=demo_recipe({
        "model.image_size": 64,
        # BEiT-3 scales both head linears by 1e-3; at width 64 that leaves the output flat at chance
        # for the whole demo (measured: 50.0 % after 624 steps, 58.0 % with 1.0)
        "model.head_init_scale": 1.0,
        "model.lr": 3.0e-4,
        "model.warmup_steps": 20,
        "model.weight_decay": 0.2,
        "model.task_head_lr_weight": 10.0,
        "data.batch_size": 32,
        "data.val_batch_size": 120,
        "data.max_len": 24,
        **WHOLE_IMAGES,
    }),
    trainer={"max_epochs": 2, "max_steps": -1},
    description="NLVR2 finetuning (BEiT-3's two-image head; accuracy and consistency).",
    demo_notes=(
        "  vlmoe pretrain && vlmoe finetune nlvr2\n"
        "\n"
        "From the demo pretraining checkpoint, at 64 px; the demo's NLVR2 files (10,000 true / false\n"
        "statements about two easy-vqa images, four image pairs per sentence); accuracy and consistency on the\n"
        "1,000 dev examples. The head starts at full scale (BEiT-3's 1e-3 keeps it at chance at this width)."
    ),
    predict=Prediction(
        "verify", verify, help="is a sentence true of each image (left) and --right?",
        inputs=(Input("right", "image", "right image", required=True, missing="upload the right image"),
                Input("sentences", "text", "sentence", required=True, missing="write a sentence",
                      flag="--sentence")),
        text=lambda v: f"{'true' if v['true'] else 'false'}  (p(true) = {v['score']:.3f})",
    ),
    study_metrics=("accuracy", "consistency"),
    study_budgets={"demo": ["--trainer.max_epochs=1", "--data.limit_train_samples=4000"], "smoke": SMOKE_BUDGET},
))
