"""Finetuning tasks (VQAv2, NLVR2, ImageNet) on the shared base, and ``vlmoe finetune``.

    from vlmoe.tasks.finetune import VQATask, VQADataModule
    dm = VQADataModule()                                  # the demo's VQAv2-format files
    task = VQATask(answers=dm.answers, vocab_size=dm.vocab_size, init_checkpoint="demo")
"""

from .base import DEMO, FinetuneDataModule, FinetuneTask
from .imagenet import ImageNetDataModule, ImageNetTask
from .nlvr2 import NLVR2DataModule, NLVR2Task
from .vqa import VQADataModule, VQATask, vqa_loss

__all__ = [
    "DEMO",
    "FinetuneDataModule",
    "FinetuneTask",
    "ImageNetDataModule",
    "ImageNetTask",
    "NLVR2DataModule",
    "NLVR2Task",
    "VQADataModule",
    "VQATask",
    "vqa_loss",
]
