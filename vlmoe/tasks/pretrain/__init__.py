"""Masked multimodal pretraining: the task, its three-stream data module, MIM targets, ``vlmoe pretrain``.

    from vlmoe.tasks.pretrain import PretrainTask, PretrainDataModule
    task = PretrainTask("tiny_mhmoe", vocab_size=dm.vocab_size)        # or: vlmoe pretrain
"""

from .data import PretrainDataModule
from .targets import MIMTarget, PixelTarget, TeacherTarget, VQKDTarget, VQKDTokenizer, patchify
from .task import STREAMS, PretrainTask

__all__ = [
    "STREAMS",
    "MIMTarget",
    "PixelTarget",
    "PretrainDataModule",
    "PretrainTask",
    "TeacherTarget",
    "VQKDTarget",
    "VQKDTokenizer",
    "patchify",
]
