"""Finetuning tasks (VQAv2, NLVR2, ImageNet, captioning, detection, retrieval) on the shared base, and
``vlmoe finetune``; each task module registers its :class:`~vlmoe.tasks.registry.TaskSpec`.

    from vlmoe.tasks.finetune import VQATask, VQADataModule
    dm = VQADataModule()                                  # the demo's VQAv2-format files
    task = VQATask(answers=dm.answers, vocab_size=dm.vocab_size, init_checkpoint="demo")
"""

# each task module registers its TaskSpec on import; this order is the registry's (help, study)
# isort: off
from .base import DEMO, FinetuneDataModule, FinetuneTask
from .vqa import VQADataModule, VQATask, vqa_loss
from .nlvr2 import NLVR2DataModule, NLVR2Task
from .imagenet import ImageNetDataModule, ImageNetTask
from .captioning import CaptioningDataModule, CaptioningTask, caption_loss
from .detection import DetectionDataModule, DetectionTask
from .retrieval import RetrievalDataModule, RetrievalTask, clip_loss
from .segmentation import SegmentationDataModule, SegmentationTask
# isort: on

__all__ = [
    "DEMO",
    "CaptioningDataModule",
    "CaptioningTask",
    "DetectionDataModule",
    "DetectionTask",
    "FinetuneDataModule",
    "FinetuneTask",
    "ImageNetDataModule",
    "ImageNetTask",
    "NLVR2DataModule",
    "NLVR2Task",
    "RetrievalDataModule",
    "RetrievalTask",
    "SegmentationDataModule",
    "SegmentationTask",
    "VQADataModule",
    "VQATask",
    "caption_loss",
    "clip_loss",
    "vqa_loss",
]
