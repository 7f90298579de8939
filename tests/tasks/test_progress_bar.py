"""The step-budget progress bar: ``Epoch N · step s/max`` instead of Lightning's ``Epoch N/-2``."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from vlmoe.tasks.callbacks import StepProgressBar


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.lin(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Recording(StepProgressBar):
    def __init__(self):
        super().__init__()
        self.descriptions = []

    def on_train_batch_end(self, trainer, *args, **kwargs):
        super().on_train_batch_end(trainer, *args, **kwargs)
        self.descriptions.append(self.progress.tasks[self.train_progress_bar_id].description.strip())


def _fit(tmp_path, **limits):
    bar = _Recording()
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2)  # 4 batches per epoch
    trainer = pl.Trainer(callbacks=[bar], logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         enable_model_summary=False, **limits)
    trainer.fit(_Tiny(), data)
    return bar.descriptions


def test_step_budget_label_moves_with_every_step(tmp_path):
    desc = _fit(tmp_path, max_steps=6, max_epochs=-1)
    assert desc == [f"Epoch {e} · step {s}/6" for e, s in [(0, 1), (0, 2), (0, 3), (0, 4), (1, 5), (1, 6)]]


def test_epoch_budget_keeps_the_stock_label(tmp_path):
    desc = _fit(tmp_path, max_epochs=2)
    assert desc[0] == "Epoch 0/1" and desc[-1] == "Epoch 1/1"


def test_a_resumed_run_counts_within_its_totals(tmp_path):
    """Resumed mid-epoch, the bar's count continues from the epoch's batch index: its total must too
    (it showed ``201/99``: batch 201 against the 99 steps left)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tracking(StepProgressBar):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_train_batch_end(self, trainer, *args, **kwargs):
            super().on_train_batch_end(trainer, *args, **kwargs)
            task = self.progress.tasks[self.train_progress_bar_id]
            self.seen.append((task.completed, task.total))

    data = DataLoader(TensorDataset(torch.randn(20, 4)), batch_size=2)  # 10 batches per epoch
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_last=True)
    common = dict(logger=False, default_root_dir=tmp_path, enable_model_summary=False, max_epochs=-1)
    pl.Trainer(callbacks=[Tracking(), ckpt], max_steps=3, **common).fit(_Tiny(), data)
    bar = Tracking()
    pl.Trainer(callbacks=[bar], max_steps=8, **common).fit(_Tiny(), data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert bar.seen and all(done <= total for done, total in bar.seen), bar.seen
    assert bar.seen[-1] == (8, 8)  # batches 4..8 of the epoch, the budget ending at batch 8
