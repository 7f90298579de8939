"""Finetuning tasks (VQAv2, NLVR2, ImageNet, captioning, retrieval) under a real Trainer on the demo data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.utils import VARIANTS, trainer
from vlmoe.tasks.finetune import (
    CaptioningDataModule,
    CaptioningTask,
    DetectionDataModule,
    DetectionTask,
    ImageNetDataModule,
    ImageNetTask,
    NLVR2DataModule,
    NLVR2Task,
    RetrievalDataModule,
    RetrievalTask,
    VQADataModule,
    VQATask,
    vqa_loss,
)

_COMMON = dict(randaug="", scale=(1.0, 1.0), num_workers=0, batch_size=4, val_batch_size=8, max_len=16)


def _data(kind: str, demo, tokenizer, **kw):
    kw = {**_COMMON, "demo_dir": str(demo.root), **kw}
    if kind == "vqa":
        dm = VQADataModule(limit_train_samples=8, **kw)
    elif kind == "nlvr2":
        dm = NLVR2DataModule(limit_train_samples=8, **kw)
    elif kind == "captioning":
        dm = CaptioningDataModule(limit_train_samples=8, hflip=0.0, **kw)
    elif kind == "retrieval":
        dm = RetrievalDataModule(limit_train_samples=8, hflip=0.0, **kw)
    else:
        kw.pop("max_len")
        dm = ImageNetDataModule(limit_train_samples=8, **{k: v for k, v in kw.items() if k != "scale"})
    if getattr(dm, "tokenizer", None) is not None:
        dm.tokenizer = tokenizer
    return dm


def _task(kind: str, dm, variant: str = "dense", **kw):
    preset, overrides = VARIANTS[variant]
    kw = dict(model=preset, model_overrides=overrides, init_checkpoint=None, warmup_steps=0, stats_every=1, **kw)
    if kind == "vqa":
        return VQATask(answers=dm.answers, vocab_size=dm.vocab_size, **kw)
    if kind == "nlvr2":
        return NLVR2Task(vocab_size=dm.vocab_size, **kw)
    if kind == "captioning":  # the metrics' pure-Python tokenisation keeps the many short runs off Java
        return CaptioningTask(vocab_size=dm.vocab_size, caption_tokenizer="python", num_beams=2, max_len=8, **kw)
    if kind == "retrieval":
        return RetrievalTask(vocab_size=dm.vocab_size, **kw)
    return ImageNetTask(class_names=dm.class_names, **kw)


def test_vqa_loss_is_beit3s_formula() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.6, 0.9]])  # VQA soft scores
    bce = -(targets * torch.log(torch.sigmoid(logits)) + (1 - targets) * torch.log(1 - torch.sigmoid(logits)))
    ref = bce.sum(1).mean()  # BCEWithLogits(mean) * num_answers == summed over answers, mean over the batch
    torch.testing.assert_close(vqa_loss(logits, targets), ref)


def test_vqa_soft_ce_is_cross_entropy_on_the_normalised_scores() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.9], [0.0, 0.0, 0.0]])  # the last: no answer in vocab
    logp = torch.log_softmax(logits, -1)
    ref = torch.stack([-logp[0, 0], -(0.4 * logp[1, 1] + 0.6 * logp[1, 2]), torch.tensor(0.0)]).mean()
    torch.testing.assert_close(vqa_loss(logits, targets, "soft_ce"), ref)
    # one right answer per question: plain cross-entropy
    one_hot = vqa_loss(logits[:1], targets[:1], "soft_ce")
    torch.testing.assert_close(one_hot, F.cross_entropy(logits[:1], torch.tensor([0])))
    with pytest.raises(ValueError, match="hinge"):
        vqa_loss(logits, targets, "hinge")


@pytest.mark.parametrize("kind", ["vqa", "nlvr2", "imagenet", "captioning", "retrieval"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_dev_run_every_task_and_moe_variant(kind, variant, demo, tokenizer, tmp_path) -> None:
    dm = _data(kind, demo, tokenizer)
    task = _task(kind, dm, variant, output_dir=str(tmp_path / "pred"))
    t = trainer(tmp_path, fast_dev_run=True)
    t.fit(task, datamodule=dm)
    assert t.global_step == 1
    metric = {"vqa": "val/accuracy", "nlvr2": "val/accuracy", "imagenet": "val/top1", "captioning": "val/CIDEr",
              "retrieval": "val/average_score"}[kind]
    top = 10.0 if kind == "captioning" else 1.0  # CIDEr's scale goes to 10
    assert metric in t.callback_metrics and 0.0 <= float(t.callback_metrics[metric]) <= top
    if VARIANTS[variant][0] != "tiny":
        assert {"aux/balance", "aux/z", "aux/entropy"} & set(t.callback_metrics)  # MoE losses logged
    if kind == "imagenet":  # the vision branch only
        assert not any(".text." in n or "text_embed" in n for n, _ in task.named_parameters())


@pytest.mark.parametrize("variant", ["dense", "mhmoe"])
def test_detection_fast_dev_run_scores_coco_boxes_and_masks(variant, demo, tmp_path) -> None:
    dm = DetectionDataModule(demo_dir=str(demo.root), limit_train_samples=8, batch_size=2, val_batch_size=4,
                             num_workers=0, image_size=64, scale_range=(0.8, 1.25))
    preset, overrides = VARIANTS[variant]
    task = DetectionTask(class_names=dm.class_names, category_ids=dm.category_ids, model=preset,
                         model_overrides=overrides, init_checkpoint=None, image_size=64, window_size=4,
                         out_channels=32, head_channels=32, fc_dim=64, warmup_steps=0, stats_every=1,
                         output_dir=str(tmp_path / "pred"))
    t = trainer(tmp_path, fast_dev_run=True)
    t.fit(task, datamodule=dm)
    assert t.global_step == 1 and {"val/bbox_AP", "val/segm_AP"} <= set(t.callback_metrics)
    assert {"loss/loss_mask", "loss/loss_objectness"} <= set(t.callback_metrics)
    if variant != "dense":
        assert {"aux/balance", "aux/z", "aux/entropy"} & set(t.callback_metrics)
    assert not any(".text." in n or "text_embed" in n for n, _ in task.named_parameters())
    dets = json.loads((tmp_path / "pred" / "val_detections.json").read_text())
    assert all(d["category_id"] in dm.category_ids and len(d["bbox"]) == 4 for d in dets)
    if dets:  # the written results file scored on its own (vlmoe evaluate coco) gives the logged numbers
        from vlmoe.metrics.coco import evaluate_coco

        ids = json.loads((tmp_path / "pred" / "val_metrics.json").read_text())["num_images"]
        gt = json.loads(demo.coco_instances_val.read_text())
        seen = sorted(im["id"] for im in gt["images"])[: int(ids)]
        again = evaluate_coco(demo.coco_instances_val, dets, ["bbox", "segm"], img_ids=seen)
        assert again["bbox"]["stats"]["AP"] == pytest.approx(float(t.callback_metrics["val/bbox_AP"]), abs=1e-6)
        assert again["segm"]["stats"]["AP"] == pytest.approx(float(t.callback_metrics["val/segm_AP"]), abs=1e-6)
    assert dm.class_names == ["circle", "rectangle", "triangle"]


def test_detection_training_leaves_out_images_without_objects(demo, tmp_path) -> None:
    gt = json.loads(demo.coco_instances_train.read_text())
    empty = gt["images"][0]["id"]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != empty]
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(gt))
    dm = DetectionDataModule(train_annotations=str(ann), train_images=str(demo.coco_images / "train2014"),
                             val_annotations=str(ann), val_images=str(demo.coco_images / "train2014"),
                             demo_dir=str(demo.root), image_size=64, num_workers=0)
    dm.setup("fit")
    assert empty not in dm.datasets["train"].ids and empty in dm.datasets["val"].ids
    assert len(dm.datasets["train"].ids) == len(gt["images"]) - 1


def test_validate_scores_the_whole_split_and_writes_predictions(demo, tokenizer, tmp_path) -> None:
    dm = _data("vqa", demo, tokenizer, val_batch_size=256)
    task = _task("vqa", dm, output_dir=str(tmp_path / "pred"))
    t = trainer(tmp_path, limit_val_batches=None)
    metrics = t.validate(task, datamodule=dm)[0]
    n = len(dm.ground_truth("val"))
    assert metrics["val/num_questions"] == n == 9673 and metrics["val/coverage"] == 1.0
    preds = json.loads((tmp_path / "pred" / "val_predictions.json").read_text())
    assert len(preds) == n and {p["question_id"] for p in preds} == set(dm.ground_truth("val"))
    sub = json.loads((tmp_path / "pred" / "val_vqa_submission.json").read_text())
    assert sub[0].keys() == {"question_id", "answer"} and len(sub) == n
    assert {"val/accuracy/yes/no", "val/accuracy/other"} <= set(metrics)


def test_captioning_evaluates_a_coco_format_caption_file(demo, tokenizer, tmp_path) -> None:
    """NoCaps-style evaluation: the images and references of a COCO-format caption file."""
    dm = _data("captioning", demo, tokenizer, val_captions=str(demo.coco_karpathy_test_gt),
               image_root=str(demo.coco_images))
    task = _task("captioning", dm, output_dir=str(tmp_path / "pred"))
    metrics = trainer(tmp_path, limit_val_batches=1).validate(task, datamodule=dm)[0]
    results = json.loads((tmp_path / "pred" / "val_captions.json").read_text())
    gt = {im["id"] for im in json.loads(demo.coco_karpathy_test_gt.read_text())["images"]}
    assert len(results) == 8 and {r["image_id"] for r in results} <= gt
    assert metrics["val/num_images"] == 8 and metrics["val/coverage"] == pytest.approx(8 / len(gt))


def test_linear_probe_trains_the_head_only(demo, tokenizer, tmp_path) -> None:
    dm = _data("nlvr2", demo, tokenizer)
    task = _task("nlvr2", dm, linear_probe=True, lr=1e-2)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(task, datamodule=dm)
    after = task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["head.dense2.weight"], after["head.dense2.weight"])


def test_task_head_lr_weight_scales_the_head_only(demo, tokenizer) -> None:
    dm = _data("vqa", demo, tokenizer)
    task = _task("vqa", dm, task_head_lr_weight=20.0, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in task._param_groups() for n in g["names"]}
    top = task.backbone.num_layers + 1
    assert scale["model.head.3.weight"] == 20.0 and scale["model.pooler.dense.weight"] == 1.0  # BEiT-3: `head` only
    assert scale["model.backbone.blocks.1.attn.qkv.vision.weight"] == 0.5 ** (top - 2)


def test_nlvr2_head_init_scale_reaches_both_head_linears(demo, tokenizer) -> None:
    dm = _data("nlvr2", demo, tokenizer)
    torch.manual_seed(0)
    beit3 = _task("nlvr2", dm).model.head
    torch.manual_seed(0)
    unit = _task("nlvr2", dm, head_init_scale=1.0).model.head
    for lin in ("dense1", "dense2"):  # same draws, scaled by 1e-3 (BEiT-3) or not
        assert torch.allclose(getattr(beit3, lin).weight, 1e-3 * getattr(unit, lin).weight)


def test_imagenet_starts_from_a_timm_vit(demo, tmp_path) -> None:
    import timm

    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                           num_heads=2, mlp_ratio=2, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    dm = _data("imagenet", demo, None)
    task = ImageNetTask(class_names=dm.class_names, init_checkpoint=str(tmp_path / "vit.pth"),
                        model_overrides={"num_heads": 2})
    assert task.config.dim == 64 and task.config.modalities == ["vision"] and not task.config.subln
    sd = vit.state_dict()
    torch.testing.assert_close(task.model.backbone.blocks[1].mlp.vision.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


def test_a_checkpoint_of_another_architecture_names_keys_and_shapes(demo, tokenizer, tmp_path) -> None:
    from vlmoe.models import create_model

    torch.save({"model": create_model("tiny", dim=32, num_heads=2, mlp_dim=64).state_dict()}, tmp_path / "w.pth")
    dm = _data("vqa", demo, tokenizer)
    with pytest.raises(ValueError, match=r"w\.pth: checkpoint key '.*' has shape \(.*32.*\) but the model expects"):
        VQATask(answers=dm.answers, vocab_size=128, model="tiny", init_checkpoint=str(tmp_path / "w.pth"))
