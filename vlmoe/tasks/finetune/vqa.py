"""VQAv2 finetuning as BEiT-3 does it (``BEiT3ForVisualQuestionAnswering``, ``VQAHandler``).

- Model: :class:`~vlmoe.models.VLMoEForVQA` (vision-CLS pooler, ``Linear(D, 2D) - LN - GELU -
  Linear(2D, A)``), the backbone without its final norm (BEiT-3's VQA registration).
- Loss: ``BCEWithLogits(logits, soft targets)`` averaged over the batch and the answers, times the
  number of answers (= summed over the answers), the soft targets being the VQA scores 0 / 0.3 / 0.6 /
  0.9 / 1 of each answer of the vocabulary; ``loss="soft_ce"``: a softmax cross-entropy against the
  same targets normalised to sum 1.
- Answer vocabulary: ``answer2label.txt`` (BEiT-3's format), or built from the training annotations
  by the min-count rule (9 over train + val gives BEiT-3's 3,129).
- Splits: ``standard`` (train on the train files, evaluate on the val files) or ``beit3`` (ViLT /
  BEiT-3: the val images split into 1,000 ``rest_val`` images for evaluation and ``trainable_val``
  trained on with train).
- Evaluation: the official VQA accuracy over the 10 human answers, overall and per answer type;
  an EvalAI results file (``[{"question_id", "answer"}]``) for test / test-dev questions.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, Subset

from vlmoe.data.inputs import as_list, check_count, strings
from vlmoe.data.vqav2 import AnswerVocab, VQAv2Dataset
from vlmoe.metrics.vqa import VQAEvaluator, read_vqa_ground_truth, write_vqa_submission
from vlmoe.models import VLMoE, VLMoEForVQA

from ..registry import Input, Prediction, TaskSpec, register_task
from .base import DEMO, SMOKE_BUDGET, FinetuneDataModule, FinetuneTask, demo_recipe

__all__ = ["VQA_LOSSES", "VQADataModule", "VQATask", "vqa_loss"]

VQA_LOSSES = ("bce", "soft_ce")


def vqa_loss(logits: Tensor, targets: Tensor, kind: str = "bce") -> Tensor:
    """The VQA training loss over soft targets (the VQA scores of each answer of the vocabulary).

    - ``"bce"``: BEiT-3's ``BCEWithLogits(mean) * num_answers`` (summed over answers, mean over the
      batch): one sigmoid per answer.
    - ``"soft_ce"``: softmax cross-entropy against the targets normalised to sum 1 (a question whose
      answers all score 0 adds nothing). One softmax over the answers: with few answers and one
      right answer per question (the demo's 13) it learns the open questions several times faster
      than ``"bce"`` (BENCHMARKS.md, "Why the demo models did not look at the image").
    """
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]
    if kind == "soft_ce":
        t = targets.float()
        total = t.sum(-1, keepdim=True)
        t = t / total.clamp_min(1e-12)
        return -(t * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    raise ValueError(f"VQA loss {kind!r}: choose from {VQA_LOSSES}")


class VQATask(FinetuneTask):
    """VQAv2 finetuning.

    Args:
        answers: the answer vocabulary (linked from the data module by the CLI).
        loss: ``"bce"`` (BEiT-3) or ``"soft_ce"`` (see :func:`vqa_loss`).
        **kwargs: :class:`~vlmoe.tasks.finetune.FinetuneTask` options.
    """

    default_overrides = {"final_norm": False}
    has_control = True
    needs_text = True

    def __init__(self, answers: list[str] | None = None, loss: str = "bce", **kwargs: Any) -> None:
        self.answers = list(answers or [])
        if not self.answers:
            raise ValueError("model.answers: the VQA task needs the answer vocabulary (the data module's)")
        if loss not in VQA_LOSSES:
            raise ValueError(f"model.loss={loss!r}: choose from {VQA_LOSSES}")
        self.loss_kind = loss
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_model(self, backbone: VLMoE) -> VLMoEForVQA:
        return VLMoEForVQA(backbone, self.answers)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits, aux = self.model(batch["image"], batch["text_ids"], batch["text_padding_mask"], return_aux=True)
        return self.loss_with_aux(vqa_loss(logits, batch["vqa_targets"], self.loss_kind), aux)

    def make_evaluator(self, stage: str) -> VQAEvaluator:
        dm = self.trainer.datamodule
        gt = dm.ground_truth(stage) if dm is not None and hasattr(dm, "ground_truth") else None
        return VQAEvaluator(gt, source=f"the {stage} annotations")

    def eval_step(self, batch: dict[str, Any]) -> tuple[Tensor | None, list[dict[str, Any]]]:
        logits, aux = self.model(batch["image"], batch["text_ids"], batch["text_padding_mask"], return_aux=True)
        loss = None
        if "vqa_targets" in batch:
            loss = self.loss_with_aux(vqa_loss(logits, batch["vqa_targets"], self.loss_kind), aux, stage="val")
        best = logits.argmax(-1).tolist()
        qids = batch["question_id"].tolist()
        return loss, [{"question_id": q, "answer": self.answers[i]} for q, i in zip(qids, best)]

    def score(self, evaluator: VQAEvaluator) -> dict[str, float]:
        return {} if evaluator.ground_truth is None else evaluator.compute()

    def write_outputs(self, stage: str, evaluator: VQAEvaluator, metrics: dict[str, float]) -> None:
        super().write_outputs(stage, evaluator, metrics)
        from pathlib import Path

        # the EvalAI results file of the split (test-dev / test-std submissions)
        write_vqa_submission(evaluator.submission(), Path(self.output_dir) / f"{stage}_vqa_submission.json",
                             overwrite=True)


class VQADataModule(FinetuneDataModule):
    """VQAv2 questions / annotations / COCO images (see :mod:`vlmoe.data.vqav2`); ``demo`` values: the
    demo data's VQAv2-format files (easy-vqa's train and test splits).

    Args:
        train_questions: training ``*_questions.json``.
        train_annotations: its ``*_annotations.json``.
        val_questions: evaluation questions.
        val_annotations: their annotations.
        test_questions: test / test-dev questions (no annotations: predictions only), or None.
        image_root: the folder holding ``train2014/``, ``val2014/``, ``test2015/``.
        answer_vocab: ``answer2label.txt``; None: built from the training annotations.
        min_answer_count: the min-count rule of a built vocabulary (BEiT-3: 9).
        split: ``standard`` or ``beit3`` (see the module docstring).
        rest_val_images: images of the ``beit3`` split's evaluation part.
        seed: seed of the ``beit3`` split.
        **kwargs: :class:`~vlmoe.tasks.finetune.FinetuneDataModule` options.
    """

    def __init__(
        self,
        train_questions: str | None = DEMO,
        train_annotations: str | None = DEMO,
        val_questions: str | None = DEMO,
        val_annotations: str | None = DEMO,
        test_questions: str | None = None,
        image_root: str | None = DEMO,
        answer_vocab: str | None = DEMO,
        min_answer_count: int = 9,
        split: str = "standard",
        rest_val_images: int = 1000,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if split not in ("standard", "beit3"):
            raise ValueError(f"data.split={split!r}: choose 'standard' or 'beit3'")
        self.files = {
            "train_questions": train_questions, "train_annotations": train_annotations,
            "val_questions": val_questions, "val_annotations": val_annotations,
            "test_questions": test_questions, "image_root": image_root, "answer_vocab": answer_vocab,
        }
        self.min_answer_count, self.split = min_answer_count, split
        self.rest_val_images, self.seed = rest_val_images, seed
        self._resolved: dict[str, Any] | None = None
        self._vocab: AnswerVocab | None = None
        self._gt: dict[str, dict[int, dict[str, Any]]] = {}

    # ------------------------------------------------------------------ files
    def resolve(self) -> dict[str, Any]:
        """The files, ``demo`` replaced by the demo data's (built on first use)."""
        if self._resolved is None:
            files = dict(self.files)
            if self.uses_demo():
                d = self.demo()
                demo = {"train_questions": d.vqa_train_questions, "train_annotations": d.vqa_train_annotations,
                        "val_questions": d.vqa_val_questions, "val_annotations": d.vqa_val_annotations,
                        "image_root": d.coco_images, "answer_vocab": d.vqa_answers}
                files = {k: (str(demo[k]) if v == DEMO else v) for k, v in files.items()}
            self._resolved = files
        return self._resolved

    @property
    def vocab(self) -> AnswerVocab:
        """The answer vocabulary."""
        if self._vocab is None:
            f = self.resolve()
            if f["answer_vocab"]:
                self._vocab = AnswerVocab.load(f["answer_vocab"])
            else:
                sources = [f["train_annotations"]] + ([f["val_annotations"]] if f["val_annotations"] else [])
                self._vocab = AnswerVocab.build([s for s in sources if s], self.min_answer_count)
        return self._vocab

    @property
    def answers(self) -> list[str]:
        """The answer vocabulary in label order (linked to the task by the CLI)."""
        return list(self.vocab.answers)

    def ground_truth(self, stage: str) -> dict[int, dict[str, Any]] | None:
        """``{question_id: answers, types}`` of the split ``stage`` evaluates (None for test)."""
        if stage == "test":
            return None
        if "val" not in self._gt:
            f = self.resolve()
            gt = read_vqa_ground_truth(f["val_annotations"])
            if self.split == "beit3":
                keep = {r["question_id"] for r in self._rest_val().records}
                gt = {q: v for q, v in gt.items() if q in keep}
            self._gt["val"] = gt
        return self._gt["val"]

    # ------------------------------------------------------------------ datasets
    def image_keys(self, data: VQAv2Dataset) -> list[int]:
        """The image id of every question (the questions of one image share its control image)."""
        return [int(r["image_id"]) for r in data.records]

    def _dataset(self, questions: str, annotations: str | None, train: bool) -> VQAv2Dataset:
        f = self.resolve()
        return VQAv2Dataset(questions, f["image_root"], annotations=annotations, vocab=self.vocab,
                            transform=self.transform(train), drop_unanswerable=train)

    def _image_split(self, data: VQAv2Dataset) -> tuple[list[int], list[int]]:
        """Record indices of ``trainable_val`` and ``rest_val`` (ViLT: 1,000 random val images)."""
        images = sorted({int(r["image_id"]) for r in data.records})
        rest = set(random.Random(self.seed).sample(images, min(self.rest_val_images, len(images))))
        trainable = [i for i, r in enumerate(data.records) if int(r["image_id"]) not in rest]
        held = [i for i, r in enumerate(data.records) if int(r["image_id"]) in rest]
        return trainable, held

    def _rest_val(self) -> VQAv2Dataset:
        f = self.resolve()
        data = self._dataset(f["val_questions"], f["val_annotations"], train=False)
        _, held = self._image_split(data)
        data.records = [data.records[i] for i in held]
        return data

    def setup(self, stage: str | None = None) -> None:
        f = self.resolve()
        if stage in ("fit", None) and "train" not in self.datasets and f["train_questions"]:
            train = self._dataset(f["train_questions"], f["train_annotations"], train=True)
            if self.split == "beit3":
                extra = self._dataset(f["val_questions"], f["val_annotations"], train=True)
                trainable, _ = self._image_split(extra)
                self.datasets["train"] = ConcatDataset([train, Subset(extra, trainable)])
            else:
                self.datasets["train"] = train
        if stage in ("fit", "validate", None) and "val" not in self.datasets and f["val_questions"]:
            if self.split == "beit3":
                self.datasets["val"] = self._rest_val()
            else:
                self.datasets["val"] = self._dataset(f["val_questions"], f["val_annotations"], train=False)
        if stage in ("test", "predict", None) and "test" not in self.datasets:
            if f["test_questions"]:
                self.datasets["test"] = self._dataset(f["test_questions"], None, train=False)
            elif stage == "test":
                raise ValueError("data.test_questions is not set: give the test / test-dev questions file")

    def collator(self) -> Any:
        base = super().collator()

        def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = base([{k: v for k, v in s.items() if k != "answers"} for s in samples])
            if "vqa_targets" not in batch and samples and "vqa_targets" in samples[0]:
                batch["vqa_targets"] = torch.stack([s["vqa_targets"] for s in samples])
            return batch

        return collate


# ---------------------------------------------------------------------- use on one's own images
def answer(predictor: Any, images: Any, questions: str | list[str], topk: int = 1) -> list[list[dict[str, Any]]]:
    """VQA: per image + question the ``topk`` answers ``{"answer", "score"}`` (sigmoid scores); one
    question is asked of every image."""
    check_count(topk, "topk")
    imgs, qs = as_list(images), strings(questions, "questions")
    if len(qs) == 1 and len(imgs) > 1:
        qs = qs * len(imgs)
    if len(qs) != len(imgs):
        raise ValueError(f"{len(imgs)} images but {len(qs)} questions")
    model, out = predictor.model, []
    for s in predictor.batches(len(imgs)):
        ids, pad = predictor.texts(qs[s])
        scores = model(predictor.images(imgs[s], s.start), ids, pad).float().sigmoid()
        top = scores.topk(min(topk, scores.shape[1]), dim=1)
        out += [[{"answer": model.answers[i], "score": float(v)} for v, i in zip(vs, ix)]
                for vs, ix in zip(top.values.tolist(), top.indices.tolist())]
    return out


register_task(TaskSpec(
    name="vqav2", task=VQATask, data=VQADataModule, model=VLMoEForVQA, metric="accuracy",
    links=(("data.answers", "model.answers"),),
    demo=demo_recipe({
        "model.image_size": 64,
        "model.loss": "soft_ce",
        "model.lr": 5.0e-4,
        "model.warmup_steps": 100,
        "model.weight_decay": 0.01,
        "model.task_head_lr_weight": 10.0,
        "data.batch_size": 64,
        "data.val_batch_size": 256,
        "data.max_len": 24,
        "data.randaug": "",
        "data.scale": [1.0, 1.0],
    }),
    trainer={"max_epochs": 3, "max_steps": -1},
    description="VQAv2 finetuning (BEiT-3's VQA head and loss; the official VQA accuracy).",
    demo_notes=(
        "  vlmoe pretrain && vlmoe finetune vqav2\n"
        "\n"
        "Starts from the demo pretraining checkpoint (runs/pretrain/demo/checkpoints/last.ckpt: the demo X-MoE\n"
        "model, 64 px), finetunes on easy-vqa's train questions (the demo's VQAv2-format files) and scores the\n"
        "official VQA accuracy on its test split (9,673 questions), beside the same evaluation with the images\n"
        "shuffled among the questions (the control: a model that ignores the image scores the same).\n"
        "Augmentation is off: RandAugment and random crops change the colours and shapes the questions ask\n"
        "about. The loss is a softmax cross-entropy over the 13 answers (BEiT-3's per-answer BCE, the published\n"
        "recipes' choice, learns the open questions several times slower at this scale)."
    ),
    predict=Prediction(
        "answer", answer, help="answer one question about every image",
        inputs=(Input("questions", "text", "question asked of every image", required=True,
                      missing="ask a question about the image", flag="--question"),
                Input("topk", "int", "how many answers", default=1, page=False, minimum=1)),
        page_kwargs={"topk": 5},
        text=lambda r: "\n".join(f"{a['answer']}  ({a['score']:.3f})" for a in r),
    ),
    routing_groups="answer_type",
    study_metrics=("accuracy", "accuracy/yes/no", "accuracy/other"),
    study_budgets={"demo": ["--trainer.max_epochs=1", "--trainer.limit_val_batches=8", "--model.warmup_steps=50"],
                   "smoke": SMOKE_BUDGET},
))
