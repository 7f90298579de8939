"""Checkpoint writing that never leaves a torn file, the checkpoint callback and the progress bar of
vlmoe runs.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in
the system temp directory; committing it is ``shutil.move``, a copy when that directory is on another
filesystem, so a kill during the copy leaves a truncated checkpoint under the final name.
:class:`AtomicCheckpointIO` writes next to the target, flushes it to disk and renames it into
place (atomic on POSIX), so a checkpoint path always holds either the previous complete file or the
new complete file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["AtomicCheckpointIO", "PretrainCheckpoint", "StepProgressBar", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the target's folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # the rename itself is durable only once the directory entry is flushed
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local writes are atomic (write, fsync, rename).

    Remote paths (``s3://`` ...) keep Lightning's own writer: object stores publish an object only
    when its upload completes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


class PretrainCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves when training ends and says where the checkpoint is.

    Lightning's ``ModelCheckpoint`` skips the end-of-training save once any "last" checkpoint exists,
    so a run whose ``max_steps`` is not a multiple of ``every_n_train_steps`` would lose its final
    steps. Defaults: ``save_last=True``, ``auto_insert_metric_name=False`` (metric names contain
    ``/``), file names ``step=000123.ckpt``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # None means "not given" (the CLI passes every argument explicitly)
        if kwargs.get("save_last") is None:
            kwargs["save_last"] = True
        if kwargs.get("filename") is None:
            kwargs["filename"] = "step={step:06d}"
            kwargs["auto_insert_metric_name"] = False
        super().__init__(*args, **kwargs)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            trainer.global_step > 0
            and self._last_global_step_saved != trainer.global_step
            and not trainer.fast_dev_run
            and not trainer.sanity_checking
        ):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
        self._report(trainer)

    @rank_zero_only
    def _report(self, trainer: pl.Trainer) -> None:
        path = self.last_model_path or self.best_model_path
        if not path:
            return
        print(f"\ncheckpoint (step {trainer.global_step}): {path}")
        if self.monitor and self.best_model_path and self.best_model_path != path:
            print(f"best checkpoint ({self.monitor}): {self.best_model_path}")
        print(f"resume: add --ckpt_path {path} (or --ckpt_path last); model only: vlmoe export {path} OUT_DIR")


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled for step-budgeted runs.

    Pretraining runs are sized in optimizer steps (``max_steps``) with unbounded epochs
    (``max_epochs=-1``), for which the stock bar prints ``Epoch 2/-2``. This one prints
    ``Epoch 2 · step 1200/5000`` then, and the stock ``Epoch 2/9`` when epochs bound the run.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        desc = f"Epoch {current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            desc += f"/{trainer.max_epochs - 1}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            desc += f" · step {trainer.global_step}/{trainer.max_steps}"
        if len(self.validation_description) > len(desc):
            desc = f"{desc:{len(self.validation_description)}}"
        return desc

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.is_enabled and self.train_progress_bar_id is not None:
            # the stock bar sets its label once per epoch; the step count moves every batch
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))
