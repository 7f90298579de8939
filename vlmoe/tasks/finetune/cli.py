"""``vlmoe finetune TASK``: finetuning and evaluation through LightningCLI.

    vlmoe finetune vqav2                                   # the demo: the demo pretraining checkpoint, CPU
    vlmoe finetune vqav2 --config configs/finetune/vqav2/beit3_base.yaml --config configs/trainer/ddp.yaml
    vlmoe finetune vqav2 validate --ckpt_path runs/finetune/vqav2/demo/checkpoints/last.ckpt   # score it
    vlmoe finetune vqav2 test --ckpt_path ... --data.test_questions ...   # EvalAI results file
    vlmoe finetune nlvr2 | imagenet ...

TASK is one of :data:`TASKS`; without a subcommand ``fit`` is implied. The defaults of every option
are the task's demo (``configs/finetune/<task>/demo.yaml`` spells it out). Metrics land in the logs
(``val/accuracy``, ...) and, with the predictions, in ``<run_dir>/predictions/``; the best checkpoint
by the task's metric is kept next to ``last.ckpt``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from ..cli import SUBCOMMANDS, VLMoECLI, run_cli
from .captioning import CaptioningDataModule, CaptioningTask
from .detection import DetectionDataModule, DetectionTask
from .imagenet import ImageNetDataModule, ImageNetTask
from .nlvr2 import NLVR2DataModule, NLVR2Task
from .retrieval import RetrievalDataModule, RetrievalTask
from .vqa import VQADataModule, VQATask

__all__ = ["TASKS", "FinetuneCLI", "build_cli", "main"]


@dataclass(frozen=True)
class TaskSpec:
    """A finetuning task for the CLI: its classes, data -> model links, metric and demo."""

    task: type
    data: type
    metric: str
    links: tuple[tuple[str, str], ...] = ()
    demo: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_TRAINER = {
    "accelerator": "auto",
    "devices": 1,
    "precision": "32-true",
    "gradient_clip_val": None,
    "log_every_n_steps": 10,
    "num_sanity_val_steps": 0,
}

# every demo: the demo pretraining checkpoint, the schedule's floor, one loader worker (2-core CPUs)
_DEMO_COMMON = {"model.init_checkpoint": "demo", "model.min_lr": 1.0e-5, "data.num_workers": 1}


def _demo(options: dict[str, Any]) -> dict[str, Any]:
    return {**_DEMO_COMMON, **options}


TASKS: dict[str, TaskSpec] = {
    "vqav2": TaskSpec(
        VQATask, VQADataModule, "accuracy", links=(("data.answers", "model.answers"),),
        demo=_demo({
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
    ),
    "nlvr2": TaskSpec(
        NLVR2Task, NLVR2DataModule, "accuracy",
        demo=_demo({
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
            "data.randaug": "",
            "data.scale": [1.0, 1.0],
            "data.hflip": 0.0,
        }),
        trainer={"max_epochs": 2, "max_steps": -1},
        description="NLVR2 finetuning (BEiT-3's two-image head; accuracy and consistency).",
    ),
    "imagenet": TaskSpec(
        ImageNetTask, ImageNetDataModule, "top1", links=(("data.class_names", "model.class_names"),),
        demo=_demo({
            # BEiT-3's regularisers (layer decay 0.65, drop path, RandAugment, random erasing, Mixup /
            # CutMix) are in configs/finetune/imagenet/beit3_*.yaml; on the 4,000 demo images of a
            # 2-block model they only slow the demo down (measured: 43 % instead of 84 % at 16 epochs)
            "model.image_size": 64,
            "model.lr": 5.0e-4,
            "model.warmup_steps": 50,
            "model.layer_decay": 1.0,
            "model.drop_path_rate": 0.0,
            "model.mixup": 0.0,
            "model.cutmix": 0.0,
            "data.batch_size": 64,
            "data.val_batch_size": 250,
            "data.randaug": "",
            "data.re_prob": 0.0,
            "data.scale": [0.5, 1.0],
        }),
        trainer={"max_epochs": 24, "max_steps": -1},
        description="ImageNet-style classification, vision branch only (BEiT-3's head; Mixup / CutMix; top-1/5).",
    ),
    "captioning": TaskSpec(
        CaptioningTask, CaptioningDataModule, "CIDEr", links=(("data.tokenizer_name", "model.tokenizer"),),
        demo=_demo({
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
            "data.randaug": "",
            "data.scale": [1.0, 1.0],
            "data.hflip": 0.0,
        }),
        trainer={"max_epochs": 3, "max_steps": -1},
        description="Image captioning (BEiT-3's masked seq2seq; KV-cached beam search; BLEU/METEOR/ROUGE-L/CIDEr).",
    ),
    "detection": TaskSpec(
        DetectionTask, DetectionDataModule, "bbox_AP",
        links=(("data.class_names", "model.class_names"), ("data.category_ids", "model.category_ids"),
               ("data.mean_std_values", "model.mean_std")),
        demo=_demo({
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
    ),
    "retrieval": TaskSpec(
        RetrievalTask, RetrievalDataModule, "average_score",
        demo=_demo({
            "model.image_size": 64,
            "model.lr": 5.0e-4,
            "model.warmup_steps": 50,
            "model.weight_decay": 0.05,
            "data.val_split": "test",
            "data.batch_size": 64,
            "data.val_batch_size": 100,
            "data.max_len": 24,
            "data.randaug": "",
            "data.scale": [1.0, 1.0],
            "data.hflip": 0.0,
        }),
        trainer={"max_epochs": 2, "max_steps": -1},
        description="Image-text retrieval, dual encoder (BEiT-3's heads; contrastive loss over all ranks; R@1/5/10).",
    ),
}


class FinetuneCLI(VLMoECLI):
    """``vlmoe finetune TASK``: the task's links, the best checkpoint by its metric, predictions folder."""

    spec: TaskSpec

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.set_defaults(
            {
                # map-style splits: a checkpoint after each validation, the best by the task's metric
                "checkpoint.every_n_train_steps": None,
                "checkpoint.monitor": f"val/{self.spec.metric}",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,  # metric names hold '/' (folders)
                "checkpoint.filename": "step={step:06d}-" + self.spec.metric + "={val/" + self.spec.metric + ":.4f}",
            }
        )

    def link_arguments(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(self.spec.demo)
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        for source, target in self.spec.links:
            parser.link_arguments(source, target, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        cfg = self._cfg()
        if cfg.model.get("output_dir") is None:
            cfg.model.output_dir = f"{cfg.checkpoint.dirpath.rstrip('/').rsplit('/', 1)[0]}/predictions"


def _cli_class(name: str) -> type[FinetuneCLI]:
    spec = TASKS[name]
    return type(f"Finetune{name.capitalize()}CLI", (FinetuneCLI,), {
        "spec": spec, "command": f"finetune {name}", "default_run_dir": f"runs/finetune/{name}/demo",
    })


def build_cli(task: str, args: list[str] | None, run: bool = True, cli_class: type | None = None) -> FinetuneCLI:
    """The CLI of ``vlmoe finetune TASK`` (``run=False``: parse and instantiate only)."""
    if task not in TASKS:
        raise ValueError(f"unknown finetuning task {task!r}; choose from {sorted(TASKS)}")
    spec = TASKS[task]
    cls = cli_class or _cli_class(task)
    return run_cli(cls, spec.task, spec.data, args, run=run, trainer_defaults={**_TRAINER, **spec.trainer},
                   description=spec.description + " No options: the CPU demo. Subcommands fit (implied) | validate | "
                   "test | predict; --debug shows tracebacks.")


def _usage() -> str:
    return "usage: vlmoe finetune TASK [fit|validate|test|predict] [options]\n\ntasks:\n" + "\n".join(
        f"  {n:<9} {s.description}" for n, s in TASKS.items()
    )


def main(argv: list[str] | None = None) -> FinetuneCLI | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return None
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        raise ValueError(f"unknown finetuning task {task!r}; choose from {sorted(TASKS)} (vlmoe finetune --help)")
    if rest and rest[0] in SUBCOMMANDS and rest[0] != "fit" and not any(a.startswith("--ckpt_path") for a in rest):
        print(f"vlmoe finetune {task} {rest[0]}: scoring the model of --model.init_checkpoint (no --ckpt_path given)",
              file=sys.stderr)
    return build_cli(task, rest)


if __name__ == "__main__":
    main()
