"""Callbacks the command-line tests load by class path (also inside subprocesses)."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl


class LossRecorder(pl.Callback):
    """Append ``step loss epoch`` to a file after every training step (flushed: survives a kill).

    With several ranks each writes ``<path>.rank<r>``.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        path = self.path if trainer.world_size == 1 else f"{self.path}.rank{trainer.global_rank}"
        with open(path, "a") as f:
            # the step this loss was computed at, and its epoch
            f.write(f"{trainer.global_step - 1} {float(loss)!r} {trainer.current_epoch}\n")
            f.flush()


class KillAt(pl.Callback):
    """SIGKILL the process once ``global_step`` reaches ``step``: no cleanup, no final checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def read_losses(path: str) -> dict[int, float]:
    """``{step: loss}`` of a :class:`LossRecorder` file."""
    with open(path) as f:
        return {int(r[0]): float(r[1]) for r in (line.split() for line in f if line.strip())}


def read_epochs(path: str) -> dict[int, int]:
    """``{step: epoch}`` of a :class:`LossRecorder` file."""
    with open(path) as f:
        return {int(r[0]): int(r[2]) for r in (line.split() for line in f if line.strip())}


class RecordRank(pl.Callback):
    """Per rank: the sample keys of every batch, and a checksum of the weights when training ends."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _file(self, trainer: pl.Trainer) -> str:
        return f"{self.path}.rank{trainer.global_rank}"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        keys = [f"{stream}:{k}" for stream, b in batch.items() for k in b.get("key", [])]
        with open(self._file(trainer), "a") as f:
            f.write("keys " + " ".join(keys) + "\n")

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        total = sum(float(p.detach().double().sum()) for p in pl_module.parameters())
        with open(self._file(trainer), "a") as f:
            f.write(f"params {total!r} step {trainer.global_step}\n")


class PoisonRank(pl.Callback):
    """Fill the MIM head with NaN on one rank before a step (a rank-local numerical blow-up)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            pl_module.model.mim_head.weight.data.fill_(float("nan"))


class KillDuringCheckpointWrite(pl.Callback):
    """SIGKILL the process in the middle of writing the checkpoint of step ``step``: part of the file is
    on disk (flushed), the rest never comes."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict) -> None:
        if trainer.global_step != self.step:
            return
        import torch

        real_save = torch.save

        def save_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            real_save(obj, f, *args, **kwargs)
            f.truncate(f.tell() // 2)  # half of it written ...
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)  # ... then the process dies

        torch.save = save_then_die
