"""LightningModules and data modules of vlmoe's tasks, on one base (:class:`VLMoETask`).

    from vlmoe.tasks.pretrain import PretrainTask, PretrainDataModule
    task = PretrainTask("tiny_mhmoe", vocab_size=dm.vocab_size)        # or: vlmoe pretrain
"""

from .base import NonFiniteLossError, VLMoETask, param_groups, warmup_cosine
from .callbacks import AtomicCheckpointIO, VLMoECheckpoint
from .pretrain import (
    STREAMS,
    MIMTarget,
    PixelTarget,
    PretrainDataModule,
    PretrainTask,
    TeacherTarget,
    VQKDTarget,
    VQKDTokenizer,
    patchify,
)

__all__ = [
    "STREAMS",
    "AtomicCheckpointIO",
    "MIMTarget",
    "NonFiniteLossError",
    "PixelTarget",
    "PretrainDataModule",
    "PretrainTask",
    "TeacherTarget",
    "VLMoECheckpoint",
    "VLMoETask",
    "VQKDTarget",
    "VQKDTokenizer",
    "param_groups",
    "patchify",
    "warmup_cosine",
]
