"""Image-text retrieval as BEiT-3 does it (``BEiT3ForRetrieval``, ``ClipLoss``, ``RetrievalHandler``).

A dual encoder on the one multiway backbone: an image-only pass (``vision_head`` on the vision CLS)
and a text-only pass (``language_head`` on the text CLS), both L2-normalised, a learnable
``logit_scale``. The loss is CLIP's symmetric cross-entropy over the similarities of the whole
global batch: every rank all-gathers the image and text features of all ranks, the local part keeps
its gradients (open_clip's ``ClipLoss`` with ``local_loss=False, gather_with_grad=False``, which BEiT-3
uses), so each rank computes the loss of the global batch. Evaluation embeds every image and caption
of the split and reports image -> text and text -> image R@1/5/10 and their mean
(:mod:`vlmoe.metrics.retrieval`); ``average_score`` selects the best checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from vlmoe.data.coco import KarpathyCaptions
from vlmoe.data.controls import image_derangement
from vlmoe.data.inputs import as_list, strings
from vlmoe.metrics.retrieval import RetrievalEvaluator
from vlmoe.models import VLMoE, VLMoEForRetrieval

from ..registry import Input, Prediction, TaskSpec, register_task
from .base import DEMO, SMOKE_BUDGET, WHOLE_IMAGES, FinetuneDataModule, FinetuneTask, demo_recipe

__all__ = ["RetrievalCollator", "RetrievalDataModule", "RetrievalTask", "clip_loss", "gather_features"]


def gather_features(*features: Tensor) -> tuple[Tensor, ...]:
    """Each ``(B, D)`` tensor of every rank concatenated in rank order; this rank's part is the input
    itself (with its gradients), the others' are detached copies. Outside ``torch.distributed``: as is."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for f in features:
        parts = [torch.empty_like(f) for _ in range(world)]
        dist.all_gather(parts, f.detach().contiguous())
        parts[rank] = f
        out.append(torch.cat(parts))
    return tuple(out)


def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
    """``((CE(s·I·Tᵀ, y) + CE(s·T·Iᵀ, y)) / 2, accuracy)`` over the global batch (all ranks' features,
    :func:`gather_features`); ``s = exp(logit_scale)``, row ``i`` matches column ``i``."""
    all_image, all_text = gather_features(image, text)
    scale = logit_scale.exp()
    logits = scale * all_image.float() @ all_text.float().t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    acc = (logits.argmax(dim=1) == labels).float().mean()
    return loss, acc


class RetrievalTask(FinetuneTask):
    """Retrieval finetuning (see the module docstring); options: :class:`~vlmoe.tasks.finetune.FinetuneTask`'s."""

    metric_key = "average_score"
    needs_text = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_model(self, backbone: VLMoE) -> VLMoEForRetrieval:
        return VLMoEForRetrieval(backbone)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        img, aux_i = self.model.encode_image(batch["image"], return_aux=True)
        txt, aux_t = self.model.encode_text(batch["text_ids"], batch["text_padding_mask"], return_aux=True)
        loss, acc = clip_loss(img, txt, self.model.logit_scale)
        self.log("train/itc_accuracy", acc, on_step=True, on_epoch=False)
        self.log("train/logit_scale", self.model.logit_scale.detach().exp(), on_step=True, on_epoch=False)
        return self.loss_with_aux(loss, aux_i + aux_t)

    def make_evaluator(self, stage: str) -> RetrievalEvaluator:
        return RetrievalEvaluator()

    def eval_step(self, batch: dict[str, Any]) -> tuple[Tensor | None, list[dict[str, Any]]]:
        img = self.model.encode_image(batch["image"]).float().tolist()
        txt = self.model.encode_text(batch["caption_ids"], batch["caption_padding_mask"]).float().tolist()
        ids = batch["image_id"].tolist()
        records = [{"key": f"i{i}", "image_id": i, "embedding": e} for i, e in zip(ids, img)]
        records += [{"key": f"t{ids[r]}-{j}", "image_id": ids[r], "embedding": e}
                    for r, j, e in zip(batch["caption_image"], batch["caption_index"], txt)]
        return None, records

    def score_control(self, stage: str, evaluator: RetrievalEvaluator) -> dict[str, float]:
        """Recall with every image's embedding replaced by another image's (the fixed derangement of
        :mod:`vlmoe.data.controls`): a dual encoder's control needs no forward, its embeddings are kept."""
        images = [r for r in evaluator.records if str(r["key"]).startswith("i")]
        texts = [r for r in evaluator.records if not str(r["key"]).startswith("i")]
        if len(images) < 2:
            return {}
        dm = self.trainer.datamodule if self._trainer is not None else None
        donor = image_derangement([r["image_id"] for r in images], seed=getattr(dm, "seed", 0))
        control = RetrievalEvaluator()
        control.update([{**r, "embedding": images[donor[k]]["embedding"]} for k, r in enumerate(images)] + texts)
        return control.compute()

    def write_outputs(self, stage: str, evaluator: RetrievalEvaluator, metrics: dict[str, float]) -> None:
        """Only ``<stage>_metrics.json`` (the embeddings are not worth a file)."""
        from pathlib import Path

        from vlmoe.io import atomic_write_json

        if metrics:
            atomic_write_json(Path(self.output_dir) / f"{stage}_metrics.json",
                              {"step": self.evaluated_step, **metrics}, indent=1)


class RetrievalCollator:
    """Training samples (one caption each) go through the base collator; evaluation samples (an image
    with all its captions) also get ``caption_ids`` / ``caption_padding_mask`` of every caption,
    flattened, with ``caption_image`` (row of its image) and ``caption_index``."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base([{k: v for k, v in s.items() if k != "captions"} for s in samples])
        if samples and "captions" in samples[0]:
            caps = [(r, j, c) for r, s in enumerate(samples) for j, c in enumerate(s["captions"])]
            ids, pad = self.base.tokenizer([c for _, _, c in caps], self.base.max_len)
            batch.update(caption_ids=ids, caption_padding_mask=pad, caption_image=[r for r, _, _ in caps],
                         caption_index=[j for _, j, _ in caps])
        return batch


class RetrievalDataModule(FinetuneDataModule):
    """Karpathy-split image-caption files (``dataset_coco.json``, ``dataset_flickr30k.json``); ``demo``:
    the demo data's COCO-style split.

    Args:
        karpathy: the Karpathy split file.
        image_root: folder of its ``filepath`` folders (Flickr30k: the image folder, ``filepath`` empty).
        val_split / test_split: the splits ``validate`` / ``test`` score.
        **kwargs: :class:`~vlmoe.tasks.finetune.FinetuneDataModule` options.
    """

    def __init__(self, karpathy: str | None = DEMO, image_root: str | None = DEMO, val_split: str = "val",
                 test_split: str = "test", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.files = {"karpathy": karpathy, "image_root": image_root}
        self.splits = {"val": val_split, "test": test_split}

    def demo_files(self, d: Any) -> dict[str, Any]:
        return {"karpathy": d.coco_karpathy, "image_root": d.coco_images}

    def setup(self, stage: str | None = None) -> None:
        f = self.resolve()
        if not f["karpathy"]:
            raise ValueError("data.karpathy is not set: give dataset_coco.json / dataset_flickr30k.json")
        if stage in ("fit", None) and "train" not in self.datasets:
            self.datasets["train"] = KarpathyCaptions(f["karpathy"], f["image_root"], "train", self.transform(True))
        for name, stages in (("val", ("fit", "validate", None)), ("test", ("test", "predict", None))):
            if stage in stages and name not in self.datasets:
                self.datasets[name] = KarpathyCaptions(f["karpathy"], f["image_root"], self.splits[name],
                                                       self.transform(False), per_caption=False)

    def collator(self) -> RetrievalCollator:
        return RetrievalCollator(super().collator())


# ---------------------------------------------------------------------- use on one's own images
def embed_images(predictor: Any, images: Any) -> Tensor:
    """Retrieval: unit-norm image embeddings ``(N, D)``."""
    imgs = as_list(images)
    return torch.cat([predictor.model.encode_image(predictor.images(imgs[s], s.start)).float()
                      for s in predictor.batches(len(imgs))])


def embed_texts(predictor: Any, texts: str | list[str]) -> Tensor:
    """Retrieval: unit-norm text embeddings ``(N, D)``."""
    ts = strings(texts, "texts")
    return torch.cat([predictor.model.encode_text(*predictor.texts(ts[s])).float() for s in predictor.batches(len(ts))])


def match(predictor: Any, images: Any, texts: str | list[str]) -> Tensor:
    """Retrieval: the ``(images, texts)`` cosine-similarity matrix."""
    return embed_images(predictor, images) @ embed_texts(predictor, texts).t()


def rank_texts(predictor: Any, images: Any, texts: str | list[str]) -> list[list[dict[str, Any]]]:
    """Retrieval, per image: the texts from the best match down, ``{"text", "score"}`` (cosine similarity)."""
    ts = strings(texts, "texts")
    sims = match(predictor, images, ts)
    return [[{"text": ts[j], "score": float(row[j])} for j in row.argsort(descending=True).tolist()]
            for row in sims]


register_task(TaskSpec(
    name="retrieval", task=RetrievalTask, data=RetrievalDataModule, model=VLMoEForRetrieval, metric="average_score",
    demo=demo_recipe({
        "model.image_size": 64,
        "model.lr": 5.0e-4,
        "model.warmup_steps": 50,
        "model.weight_decay": 0.05,
        "data.val_split": "test",
        "data.batch_size": 64,
        "data.val_batch_size": 100,
        "data.max_len": 24,
        **WHOLE_IMAGES,
    }),
    trainer={"max_epochs": 2, "max_steps": -1},
    description="Image-text retrieval, dual encoder (BEiT-3's heads; contrastive loss over all ranks; R@1/5/10).",
    demo_notes=(
        "  vlmoe pretrain && vlmoe finetune retrieval\n"
        "\n"
        "Starts from the demo pretraining checkpoint, trains the dual encoder (image-only and text-only passes,\n"
        "the contrastive loss) at 64 px on the demo's Karpathy-format captions and reports image -> text and text\n"
        "-> image R@1/5/10 on its test split (500 images, 2,500 captions). Many demo captions fit many images\n"
        "equally well (24 colour x shape combinations among 500 images), so R@1 has a low ceiling here."
    ),
    predict=Prediction(
        "rank_texts", rank_texts, help="rank texts (--text, repeated) by how well they match every image",
        inputs=(Input("texts", "texts", "texts (one per line)", required=True,
                      missing="write one or more texts, one per line", flag="--text"),),
        more={"match": match, "embed_images": embed_images, "embed_texts": embed_texts},
        text=lambda r: "\n".join(f"{t['score']:.3f}  {t['text']}" for t in r),
    ),
    study_metrics=("tr_r1", "ir_r1", "average_score"),
    study_budgets={"demo": ["--trainer.max_epochs=1"], "smoke": SMOKE_BUDGET},
))
