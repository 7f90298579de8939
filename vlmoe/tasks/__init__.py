"""LightningModules and data modules: pretraining (and the shared optimizer / MoE logging base).

    from vlmoe.tasks import PretrainTask, PretrainDataModule
    task = PretrainTask("tiny_mhmoe", vocab_size=dm.vocab_size)        # or: vlmoe pretrain
"""

from .base import NonFiniteLossError, VLMoETask, param_groups, warmup_cosine
from .callbacks import AtomicCheckpointIO, PretrainCheckpoint, atomic_torch_save
from .datamodule import PretrainDataModule
from .pretrain import STREAMS, PretrainTask
from .targets import MIMTarget, PixelTarget, TeacherTarget, VQKDTarget, VQKDTokenizer, patchify

__all__ = [
    "STREAMS",
    "AtomicCheckpointIO",
    "MIMTarget",
    "NonFiniteLossError",
    "PixelTarget",
    "PretrainCheckpoint",
    "PretrainDataModule",
    "PretrainTask",
    "TeacherTarget",
    "VLMoETask",
    "VQKDTarget",
    "VQKDTokenizer",
    "atomic_torch_save",
    "param_groups",
    "patchify",
    "warmup_cosine",
]
