"""Image captioning as BEiT-3 does it (``BEiT3ForCaptioning``, ``CaptioningHandler``, ``BertCaptioningLoss``).

Training is masked-LM sequence-to-sequence: the caption ``[bos] w1 .. wn [eos]`` follows the image
under :func:`~vlmoe.models.captioning_attention_mask` (text -> text causal, image -> text blocked);
a share of its tokens (``mask_prob``, 0.6) is masked 80 / 10 / 10 (:func:`~vlmoe.data.caption_mask`:
never the bos, at least one, at most n - 1) and only those are predicted, with a label-smoothed loss
(:func:`caption_loss`, epsilon 0.1); after ``drop_worst_after`` steps the ``drop_worst_ratio`` of the
tokens with the highest loss are left out.

Evaluation decodes every image of the split (beam 3, length penalty 0.6, at most ``max_len`` tokens,
KV-cached: :meth:`~vlmoe.models.VLMoEForCaptioning.generate`), writes the COCO results file
``<stage>_captions.json`` (``[{"image_id", "caption"}]``) and scores it with the COCO caption toolkit
(:mod:`vlmoe.metrics.captioning`: BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE is unavailable offline).
CIDEr selects the best checkpoint. Data: Karpathy's ``dataset_coco.json`` (train = train + restval,
one sample per caption) with the COCO-format ground truth of the evaluated split
(``coco_karpathy_{val,test}_gt.json``, written from the Karpathy file when not given); NoCaps-style
evaluation: a COCO-format caption file of images and references (``val_captions``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlmoe.data import Collator, build_tokenizer, caption_mask
from vlmoe.data.coco import COCOCaptions, KarpathyCaptions, karpathy_coco
from vlmoe.data.inputs import as_list, check_count, detokenize
from vlmoe.io import atomic_write_json
from vlmoe.metrics.captioning import CaptionEvaluator, results_list
from vlmoe.models import VLMoE, VLMoEForCaptioning

from ..registry import Input, Prediction, TaskSpec, register_task
from .base import DEMO, SMOKE_BUDGET, WHOLE_IMAGES, FinetuneDataModule, FinetuneTask, demo_recipe

__all__ = ["CaptionCollator", "CaptioningDataModule", "CaptioningTask", "caption_loss"]


class _SmoothedKL(torch.autograd.Function):
    """Per-row ``KL(q || softmax(x))`` for the label-smoothed target ``q``, in closed form; the backward
    writes ``softmax(x) - q`` into one ``(M, V)`` buffer (the gradient of the KL w.r.t. the logits)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, eps: float) -> Tensor:
        V = x.shape[1]
        off = eps / (V - 1) if V > 1 else 0.0
        lse = torch.logsumexp(x, dim=1)
        lp_y = x.gather(1, y[:, None]).squeeze(1) - lse
        if eps > 0:
            entropy = (1 - eps) * math.log(1 - eps) + eps * math.log(off)  # sum q log q
            sum_lp = x.sum(dim=1) - V * lse
            loss = entropy - (1 - eps) * lp_y - off * (sum_lp - lp_y)
        else:
            loss = -lp_y
        ctx.save_for_backward(x, y, lse)
        ctx.eps, ctx.off = eps, off
        return loss

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
        x, y, lse = ctx.saved_tensors
        grad = torch.sub(x, lse[:, None]).exp_()  # softmax
        if ctx.off:
            grad.sub_(ctx.off)
        grad.scatter_add_(1, y[:, None], torch.full_like(lse[:, None], -(1 - ctx.eps - ctx.off)))
        return grad.mul_(g[:, None]), None, None


def caption_loss(
    logits: Tensor, targets: Tensor, label_smoothing: float = 0.1, drop_worst_ratio: float = 0.0
) -> Tensor:
    """BEiT-3's ``BertCaptioningLoss``: KL divergence to a label-smoothed one-hot (``1 - eps`` on the
    target, ``eps / (V - 1)`` on every other token), summed over the vocabulary, averaged over the
    ``(M, V)`` predicted tokens; with ``drop_worst_ratio`` the highest-loss share of tokens is dropped.

    Computed in closed form: with ``lp = log_softmax(logits)``, ``KL = H(q) - (1 - eps) lp[y] -
    eps / (V - 1) (sum(lp) - lp[y])`` and ``sum(lp) = sum(logits) - V logsumexp(logits)``; the gradient
    is ``softmax - q``. No ``(M, V)`` target or log-probability tensor is built in the forward (the
    vocabulary is 49k-64k wide; a test checks it against the formula with an explicit target).
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"caption_loss takes (M, V) logits and (M,) targets; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    loss = _SmoothedKL.apply(x, targets, float(label_smoothing))
    if drop_worst_ratio > 0:
        keep = max(1, int(loss.shape[0] * (1 - drop_worst_ratio)))
        loss, _ = torch.topk(loss, k=keep, largest=False)
    return loss.mean()


class CaptioningTask(FinetuneTask):
    """Captioning finetuning (see the module docstring).

    Args:
        tokenizer: the tokenizer of the captions (linked from the data module; it gives the
            bos / eos / mask ids and turns generated ids into text).
        label_smoothing: epsilon of the loss.
        drop_worst_ratio: share of highest-loss tokens dropped after ``drop_worst_after`` steps.
        drop_worst_after: the step from which tokens are dropped (None: never).
        num_beams: beam size of evaluation decoding (1: greedy).
        length_penalty: beam scores are ``sum log p / len ** length_penalty``.
        max_len: longest generated caption, bos and eos included (default: the data's ``max_len``).
        caption_tokenizer: ``auto`` | ``ptb`` | ``python`` tokenisation of the metrics.
        **kwargs: :class:`~vlmoe.tasks.finetune.FinetuneTask` options.
    """

    metric_key = "CIDEr"
    has_control = True
    needs_text = True

    def __init__(
        self,
        tokenizer: str | None = "clip",
        label_smoothing: float = 0.1,
        drop_worst_ratio: float = 0.2,
        drop_worst_after: int | None = None,
        num_beams: int = 3,
        length_penalty: float = 0.6,
        max_len: int | None = None,
        caption_tokenizer: str = "auto",
        **kwargs: Any,
    ) -> None:
        self.tok = build_tokenizer(tokenizer or "clip")
        self.label_smoothing = label_smoothing
        self.drop_worst_ratio, self.drop_worst_after = drop_worst_ratio, drop_worst_after
        self.num_beams, self.length_penalty, self.max_len = num_beams, length_penalty, max_len
        self.caption_tokenizer = caption_tokenizer
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_model(self, backbone: VLMoE) -> VLMoEForCaptioning:
        t = self.tok
        return VLMoEForCaptioning(backbone, bos_id=t.bos_id, eos_id=t.eos_id, mask_id=t.mask_id)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        masked = batch["masked_positions"]
        logits, aux = self.model(batch["image"], batch["text_ids"], batch["text_padding_mask"], masked, return_aux=True)
        after = self.drop_worst_after
        drop = self.drop_worst_ratio if after is not None and self.global_step >= after else 0.0
        loss = caption_loss(logits, batch["caption_ids"][masked], self.label_smoothing, drop)
        return self.loss_with_aux(loss, aux)

    # ------------------------------------------------------------------ evaluation
    def decode_max_len(self) -> int:
        if self.max_len is not None:
            return self.max_len
        dm = self.trainer.datamodule if self._trainer is not None else None
        return int(getattr(dm, "max_len", 32) or 32)

    def make_evaluator(self, stage: str) -> CaptionEvaluator:
        dm = self.trainer.datamodule
        gt = dm.ground_truth(stage) if dm is not None and hasattr(dm, "ground_truth") else None
        if gt is None:
            raise ValueError(f"no ground-truth captions for the {stage} split (data.{stage}_gt)")
        return CaptionEvaluator(gt, tokenizer=self.caption_tokenizer)

    def eval_step(self, batch: dict[str, Any]) -> tuple[Tensor | None, list[dict[str, Any]]]:
        out = self.model.generate(batch["image"], max_len=self.decode_max_len(), num_beams=self.num_beams,
                                  length_penalty=self.length_penalty)
        ids = batch["image_id"].tolist()
        return None, [{"image_id": i, "caption": self.tok.decode(t).strip() or "."} for i, t in zip(ids, out.tokens)]

    def write_outputs(self, stage: str, evaluator: CaptionEvaluator, metrics: dict[str, float]) -> None:
        """``<stage>_captions.json`` (COCO results format) and ``<stage>_metrics.json``."""
        out = Path(self.output_dir)
        atomic_write_json(out / f"{stage}_captions.json", results_list(evaluator.records))
        if metrics:
            atomic_write_json(out / f"{stage}_metrics.json", {"step": self.evaluated_step, **metrics}, indent=1)


class CaptionCollator:
    """Captions -> ``text_ids`` with BEiT-3's caption masking, ``caption_ids`` (the originals) and
    ``masked_positions``; evaluation samples (several references, no ``text``) keep images and ids."""

    def __init__(self, base: Collator, mask_prob: float) -> None:
        self.base, self.mask_prob = base, mask_prob

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base([{k: v for k, v in s.items() if k != "captions"} for s in samples])
        if "text_ids" in batch:
            tok, ids = self.base.tokenizer, batch["text_ids"]
            lengths = (~batch["text_padding_mask"]).sum(dim=1)
            masked, positions = caption_mask(ids, lengths, mask_id=tok.mask_id, vocab_size=tok.vocab_size,
                                             special_ids=tok.special_ids, prob=self.mask_prob)
            batch.update(caption_ids=ids, text_ids=masked, masked_positions=positions)
        return batch


class CaptioningDataModule(FinetuneDataModule):
    """Karpathy-split captions (COCO, Flickr30k-style files) or a COCO-format caption file; ``demo``: the
    demo data's.

    Args:
        karpathy: ``dataset_coco.json`` (Karpathy's split file).
        image_root: the folder holding the Karpathy ``filepath`` folders (``train2014/``, ``val2014/``).
        val_split / test_split: the Karpathy splits evaluated by ``validate`` / ``test``.
        val_gt / test_gt: their COCO-format ground truth (None: written from ``karpathy`` into
            ``gt_dir``).
        val_captions: instead of a Karpathy split, evaluate the images of this COCO-format caption
            file (NoCaps' val, ...; images under ``image_root``), which is also the ground truth.
        gt_dir: where ground-truth files written from ``karpathy`` go (default: next to it). A file
            written there from another version of the Karpathy file is rewritten; a file of the same
            name with other content is an error, never overwritten.
        mask_prob: share of each training caption's tokens that is masked (BEiT-3's
            ``captioning_mask_prob``; its docs use 0.7).
        **kwargs: :class:`~vlmoe.tasks.finetune.FinetuneDataModule` options (``max_len`` 32: BEiT-3's
            ``num_max_bpe_tokens`` for captioning).
    """

    def __init__(
        self,
        karpathy: str | None = DEMO,
        image_root: str | None = DEMO,
        val_split: str = "val",
        test_split: str = "test",
        val_gt: str | None = None,
        test_gt: str | None = None,
        val_captions: str | None = None,
        gt_dir: str | None = None,
        mask_prob: float = 0.6,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("max_len", 32)
        super().__init__(**kwargs)
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"data.mask_prob must be in (0, 1], got {mask_prob}")
        self.files = {"karpathy": karpathy, "image_root": image_root}
        self.splits = {"val": val_split, "test": test_split}
        self.gt_files = {"val": val_gt, "test": test_gt}
        self.val_captions, self.gt_dir, self.mask_prob = val_captions, gt_dir, mask_prob
        self._gt_paths: dict[str, str] = {}  # stage -> its ground truth, checked against the Karpathy file

    def demo_files(self, d: Any) -> dict[str, Any]:
        return {"karpathy": d.coco_karpathy, "image_root": d.coco_images}

    def image_keys(self, data: Any) -> list[int]:
        """The image of every sample (Karpathy and COCO caption sets: ``items`` of (image, caption))."""
        return [i for i, _ in data.items]

    def ground_truth(self, stage: str) -> str:
        """The COCO-format ground-truth file of the split ``stage`` evaluates."""
        if stage == "val" and self.val_captions:
            return self.val_captions
        if self.gt_files.get(stage):
            return str(self.gt_files[stage])
        f = self.resolve()
        if not f["karpathy"]:
            raise ValueError(f"data.{stage}_gt is not set and there is no data.karpathy to write it from")
        if stage in self._gt_paths:
            return self._gt_paths[stage]
        split = self.splits[stage]
        folder = Path(self.gt_dir) if self.gt_dir else Path(f["karpathy"]).parent / "annotations"
        path = folder / f"coco_karpathy_{split}_gt.json"
        gt = karpathy_coco(f["karpathy"], split)
        if path.exists():
            try:
                held = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                held = None
            if held == gt:
                self._gt_paths[stage] = str(path)
                return str(path)
            # a file written from another version of the Karpathy file is refreshed; anything else
            # is the user's and stays as it is
            if not (isinstance(held, dict) and held.get("info") == gt["info"]):
                raise ValueError(
                    f"{path}: differs from the {split!r} split of {f['karpathy']} and was not written from it; "
                    f"give it as data.{stage}_gt to score against it, or another data.gt_dir"
                )
        atomic_write_json(path, gt)
        self._gt_paths[stage] = str(path)
        return str(path)

    def setup(self, stage: str | None = None) -> None:
        f = self.resolve()
        if stage in ("fit", None) and "train" not in self.datasets:
            if not f["karpathy"]:
                raise ValueError("data.karpathy is not set: give dataset_coco.json (Karpathy's split file)")
            self.datasets["train"] = KarpathyCaptions(f["karpathy"], f["image_root"], "train", self.transform(True))
        if stage in ("fit", "validate", None) and "val" not in self.datasets:
            if self.val_captions:
                self.datasets["val"] = COCOCaptions(self.val_captions, f["image_root"], self.transform(False))
            else:
                self.datasets["val"] = KarpathyCaptions(f["karpathy"], f["image_root"], self.splits["val"],
                                                        self.transform(False), per_caption=False)
        if stage in ("test", "predict", None) and "test" not in self.datasets and f["karpathy"]:
            self.datasets["test"] = KarpathyCaptions(f["karpathy"], f["image_root"], self.splits["test"],
                                                     self.transform(False), per_caption=False)
        for name, data in self.datasets.items():
            if len(data) == 0:
                raise ValueError(f"the captioning {name} split has no samples ({os.fspath(f['karpathy'] or '')})")

    def collator(self) -> CaptionCollator:
        return CaptionCollator(super().collator(), self.mask_prob)


# ---------------------------------------------------------------------- use on one's own images
def caption(predictor: Any, images: Any, beam: int = 3, max_len: int | None = None,
            length_penalty: float = 0.6) -> list[str]:
    """Captioning: one caption per image (KV-cached beam search; ``beam=1``: greedy)."""
    check_count(beam, "beam")
    imgs = as_list(images)
    n = max_len or min(32, predictor.model.config.max_text_positions)
    out = []
    for s in predictor.batches(len(imgs)):
        gen = predictor.model.generate(predictor.images(imgs[s], s.start), max_len=n, num_beams=beam,
                                       length_penalty=length_penalty)
        out += [detokenize(predictor.tokenizer.decode(t)) for t in gen.tokens]
    return out


register_task(TaskSpec(
    name="captioning", task=CaptioningTask, data=CaptioningDataModule, model=VLMoEForCaptioning, metric="CIDEr",
    links=(("data.tokenizer_name", "model.tokenizer"),),
    demo=demo_recipe({
        # the demo scores easy-vqa's test images (the Karpathy "test" split of the demo data) at the
        # end of training; the published recipe selects on val and tests separately
        "model.image_size": 64,
        "model.lr": 5.0e-4,
        "model.warmup_steps": 100,
        "model.weight_decay": 0.05,
        "model.num_beams": 3,
        "model.length_penalty": 0.6,
        "data.val_split": "test",
        "data.batch_size": 64,
        "data.val_batch_size": 100,
        "data.max_len": 24,
        **WHOLE_IMAGES,
    }),
    trainer={"max_epochs": 3, "max_steps": -1},
    description="Image captioning (BEiT-3's masked seq2seq; KV-cached beam search; BLEU/METEOR/ROUGE-L/CIDEr).",
    demo_notes=(
        "  vlmoe pretrain && vlmoe finetune captioning\n"
        "\n"
        "Starts from the demo pretraining checkpoint (runs/pretrain/demo/checkpoints/last.ckpt: the demo X-MoE\n"
        "model, its MLM head becomes the captioning head), finetunes at 64 px on the demo's Karpathy-format\n"
        "captions of easy-vqa's train images (5 per image, one sample per caption) and scores its test split (500\n"
        "images of easy-vqa's test set) with the COCO caption toolkit. The demo has no model selection (one\n"
        "validation, at the end); the published recipes select on val and test separately. Augmentation is off:\n"
        "RandAugment and random crops change the colours and shapes the captions name."
    ),
    predict=Prediction(
        "caption", caption, help="a caption of every image",
        inputs=(Input("beam", "int", "beam size (1: greedy)", default=3, page=False, minimum=1),),
        row=lambda c: {"caption": c},
    ),
    study_metrics=("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"),
    study_budgets={"demo": ["--trainer.max_epochs=1", "--data.limit_train_samples=9600",
                            "--trainer.limit_val_batches=2", "--model.warmup_steps=30"], "smoke": SMOKE_BUDGET},
))
