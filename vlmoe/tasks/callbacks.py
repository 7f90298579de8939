"""Callbacks of vlmoe runs: atomic checkpoint writes, the checkpoint callback, the step progress bar,
the model summary and the skipped-sample report.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in
the system temp directory; committing it is ``shutil.move``, a copy when that directory is on another
filesystem, so a kill during the copy leaves a truncated checkpoint under the final name.
:class:`AtomicCheckpointIO` writes next to the target, flushes it to disk and renames it into
place (atomic on POSIX), so a checkpoint path always holds either the previous complete file or the
new complete file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from vlmoe.io import atomic_torch_save

__all__ = ["AtomicCheckpointIO", "ModelSummary", "SkippedSamples", "StepProgressBar", "VLMoECheckpoint",
           "batch_size_and_tokens"]


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


class VLMoECheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves when training ends, writes ``last.ckpt`` every
``every_n_train_steps`` even before the monitored metric exists, and says where the checkpoint is.

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

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Lightning defers a step-triggered save until the monitored metric exists, so a run killed
        # before its first validation would have nothing on disk: write last.ckpt now, the ranked
        # checkpoint when the metric comes
        every = self._every_n_train_steps
        if every < 1 or trainer.global_step % every or not self.save_last or self.monitor is None:
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor not in candidates and not self._should_skip_saving_checkpoint(trainer):
            saved = self._last_global_step_saved
            self._save_last_checkpoint(trainer, candidates)
            self._last_global_step_saved = saved  # a validation at this same step still saves its ranked one

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            trainer.global_step > 0
            and self._last_global_step_saved != trainer.global_step
            and not trainer.fast_dev_run
            and not trainer.sanity_checking
        ):
            candidates = self._monitor_candidates(trainer)
            if self.monitor is None or self.monitor in candidates:  # no validation since: nothing to rank
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

    @property
    def total_train_batches(self) -> int | float:
        """Batches this epoch will run, counted from the epoch's first batch.

        The stock bar counts ``batch_idx + 1`` (which continues mid-epoch after a resume) against the
        steps *remaining* in the budget, so a run resumed at step 200 of an epoch showed ``201/99``.
        """
        trainer = self.trainer
        total = trainer.num_training_batches
        if trainer.max_steps is not None and trainer.max_steps > 0:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # this epoch's batches so far
            remaining = (trainer.max_steps - trainer.global_step) * max(1, trainer.accumulate_grad_batches)
            total = min(total, done + remaining)
        return total

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


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return str(int(n))


class ModelSummary(LightningModelSummary):
    """The model's parameters by top-level part, with the MoE experts' share (rank 0, at fit start).

    Replaces Lightning's summary, whose FLOPs column reads 0 for every vlmoe model (it would need an
    example input) and which says nothing about experts.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        from vlmoe.moe import MoE

        rows = []
        for name, child in pl_module.named_children():
            n = sum(p.numel() for p in child.parameters())
            if n:
                rows.append((name, type(child).__name__, _count(n)))
        params = list(pl_module.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        layers = [m for m in pl_module.modules() if isinstance(m, MoE)]
        experts = sum(p.numel() for m in layers for p in m.experts.parameters())
        lines = [f"{name:<12} {kind:<28} {count:>9}" for name, kind, count in rows]
        mib = total * 4 / 2**20
        lines.append(f"parameters: {_count(total)} ({_count(trainable)} trainable, {mib:.1f} MiB in fp32)")
        if layers:
            e = sorted({m.num_experts for m in layers})
            lines.append(
                f"MoE: {len(layers)} layers of {'/'.join(map(str, e))} experts; experts hold {_count(experts)} "
                f"({experts / max(total, 1):.0%} of the parameters)"
            )
        print("\n".join(lines))


class SkippedSamples(pl.Callback):
    """Skipped training samples (corrupt images, empty texts, broken tar members, ...) in the logs and
    in a summary when training ends.

    Reads ``trainer.datamodule.error_counts()`` (``{stream: {reason: count}}``, this rank's count over
    all its DataLoader workers); does nothing for data modules without it. Every
    ``log_every_n_steps`` the counts (summed over ranks) are logged as ``data/skipped/<stream>/<reason>``;
    at the end rank 0 prints one line per stream with a non-zero count.
    """

    @staticmethod
    def _counts(trainer: pl.Trainer) -> dict[str, dict[str, int]] | None:
        dm = trainer.datamodule
        counts = getattr(dm, "error_counts", None) if dm is not None else None
        return counts() if callable(counts) else None

    def _global(self, trainer: pl.Trainer) -> dict[str, int] | None:
        counts = self._counts(trainer)
        if counts is None:
            return None
        flat = {f"{s}/{r}": n for s, reasons in sorted(counts.items()) for r, n in sorted(reasons.items())}
        if trainer.world_size > 1 and flat:
            values = torch.tensor(list(flat.values()), dtype=torch.float64, device=trainer.strategy.root_device)
            values = trainer.strategy.reduce(values, reduce_op="sum")
            flat = dict(zip(flat, (int(v) for v in values.round().tolist())))
        return flat

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        every = max(1, trainer.log_every_n_steps)
        if trainer.global_step % every or not trainer.loggers:
            return
        flat = self._global(trainer)
        if flat:
            metrics = {f"data/skipped/{k}": float(v) for k, v in flat.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = self._global(trainer)
        if not flat or not trainer.is_global_zero:
            return
        by_stream: dict[str, list[str]] = {}
        for key, n in flat.items():
            if n:
                stream, reason = key.split("/", 1)
                by_stream.setdefault(stream, []).append(f"{reason}={n}")
        if by_stream:
            print("skipped samples: " + "; ".join(f"{s}: {', '.join(r)}" for s, r in by_stream.items()))
        else:
            print("skipped samples: none")


class RoutingStatistics(pl.Callback):
    """Per-layer routing statistics of every MoE layer in any LightningModule, logged as
    ``routing/<layer>/<metric>`` and ``routing/mean/<metric>`` (activation ratio, load entropy, load
    CV, dropped assignments; see :mod:`vlmoe.moe.stats`).

    Counts are collected by forward hooks on the :class:`~vlmoe.moe.MoE` modules (no cooperation of
    the module needed), summed on the device, and summed over data-parallel ranks before each log:
    training every ``every_n_steps`` optimizer steps over the steps since the last log, validation
    once per validation run (under ``val/``). A recomputation during backward (activation
    checkpointing) is not counted twice.

    Args:
        every_n_steps: training log interval in optimizer steps.
        tau: activation-ratio threshold.
    """

    def __init__(self, every_n_steps: int = 50, tau: float = 0.1) -> None:
        from vlmoe.moe import RoutingStatsAccumulator

        self.every_n_steps, self.tau = every_n_steps, tau
        self.accumulators = {"train": RoutingStatsAccumulator(tau), "val": RoutingStatsAccumulator(tau)}
        self._stage: str | None = None
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ hooks on the MoE layers
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from vlmoe.moe import MoE

        if not self._handles:
            self._handles = [m.register_forward_hook(self._record) for m in pl_module.modules() if isinstance(m, MoE)]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _record(self, module: Any, inputs: Any, output: Any) -> None:
        from vlmoe.moe.routers import _in_backward

        if self._stage is not None and not _in_backward():
            self.accumulators[self._stage].update(output[1])

    def summary(self, stage: str, trainer: pl.Trainer | None = None) -> dict[str, float]:
        """The metrics of the counts gathered for ``stage`` since the last call (then reset); summed
        over ranks when a ``trainer`` with several is given (every rank must call it)."""
        acc = self.accumulators[stage]
        if trainer is not None and trainer.world_size > 1:
            acc.all_reduce(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        out: dict[str, float] = {}
        for layer, metrics in acc.per_layer().items():
            for k in ("activation_ratio", "load_entropy", "load_cv", "dropped"):
                out[f"routing/{layer}/{k}"] = metrics[k]
        for k, v in acc.summary().items():
            out[f"routing/mean/{k}"] = v
        acc.reset()
        return out

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._stage = "train"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._stage = None
        if self.every_n_steps <= 0 or trainer.global_step % self.every_n_steps or not self.accumulators["train"].counts:
            return
        stats = self.summary("train", trainer)
        # straight to the loggers: already aggregated over the window and the ranks
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)

    # ------------------------------------------------------------------ validation
    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._stage = "val"

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._stage = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.accumulators["val"].counts:
            return
        stats = self.summary("val", trainer)
        if stats and not trainer.sanity_checking:
            pl_module.log_dict({f"val/{k}": v for k, v in stats.items()}, sync_dist=False)


class Throughput(pl.Callback):
    """``perf/samples_per_s`` and ``perf/tokens_per_s`` of this rank (and ``samples/s`` on the progress
    bar), timed from one training batch end to the next, data loading included, as a user measures it.

    The counts come from ``pl_module.batch_size_and_tokens(batch)`` when the module has it (vlmoe's
    tasks do), else from :func:`batch_size_and_tokens` on the batch. Lightning's
    ``ThroughputMonitor`` averages over a window and needs per-batch size functions; this one reports
    each step, which is what the demo's progress bar shows.
    """

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_epoch_start(self, *args: Any) -> None:
        self._last = None  # the gap across an epoch boundary is not a training step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        import time

        now = time.perf_counter()
        last, self._last = self._last, now
        if last is None:
            return
        count = getattr(pl_module, "batch_size_and_tokens", None)
        if callable(count):
            samples, tokens = count(batch)
        else:
            samples, tokens = batch_size_and_tokens(batch, getattr(pl_module, "config", None))
        dt = max(now - last, 1e-9)
        log = dict(on_step=True, on_epoch=False, batch_size=max(1, samples))
        pl_module.log("perf/samples_per_s", samples / dt, **log)
        pl_module.log("perf/tokens_per_s", tokens / dt, **log)
        pl_module.log("samples/s", samples / dt, prog_bar=True, logger=False, **log)


class CPUThreads(pl.Callback):
    """On CPU, the thread policy of :func:`vlmoe.runtime.set_cpu_threads`: one core left per
    DataLoader worker (``trainer.datamodule.num_workers``) and per training process."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type != "cpu":
            return
        from vlmoe.runtime import set_cpu_threads

        workers = int(getattr(trainer.datamodule, "num_workers", 0) or 0) if trainer.datamodule else 0
        set_cpu_threads(int(getattr(trainer, "num_devices", 1) or 1), workers)


def batch_size_and_tokens(batch: Any, config: Any) -> tuple[int, int]:
    """``(samples, tokens)`` of a batch dict (``image`` / ``text_ids`` / ``text_padding_mask``), or
    of a dict of such dicts (one per stream); images count CLS + patches."""
    if isinstance(batch, Mapping) and batch and all(isinstance(v, Mapping) for v in batch.values()):
        pairs = [batch_size_and_tokens(b, config) for b in batch.values()]
        return sum(s for s, _ in pairs), sum(t for _, t in pairs)
    if not isinstance(batch, Mapping):
        return 0, 0
    image, ids, pad = batch.get("image"), batch.get("text_ids"), batch.get("text_padding_mask")
    n, tokens = 0, 0
    if isinstance(image, Tensor):
        n = image.shape[0]
        tokens += n * (1 + (image.shape[-2] // config.patch_size) * (image.shape[-1] // config.patch_size))
    if isinstance(ids, Tensor):
        n = n or ids.shape[0]
        tokens += int(ids.numel() if pad is None else (~pad.bool()).sum())
    return n, tokens
