"""What every finetuning task shares: the model from a checkpoint, the data modules' common parts, and
evaluation over whole splits.

:class:`FinetuneTask` builds its task model (a :class:`~vlmoe.models.TaskModel`) on a backbone whose
architecture comes from ``model`` (a preset or config file) or, by default, from the checkpoint it
starts from (``init_checkpoint``: a ``vlmoe pretrain`` / ``finetune`` ``.ckpt``, a ``vlmoe export``
folder, an official BEiT-3 ``.pth`` - dense -> MoE upcycling included - or a timm ViT). The vision
positions are resized when the finetuning resolution (``image_size``) differs from the checkpoint's;
the load report (loaded share, missing / unused / resized keys) is printed on rank 0, and a
checkpoint that provides under half of the backbone's weights is an error. ``init_checkpoint: demo``
is the demo pretraining run's checkpoint (``runs/pretrain/demo/checkpoints/last.ckpt``).

Evaluation: every ``validation`` / ``test`` batch adds records to an evaluator
(:mod:`vlmoe.metrics`), keyed by the sample id, so the padding duplicates of a distributed sampler
never count twice; at the end of the split the records of every rank are gathered, scored once, logged
as ``val/<metric>`` (``test/<metric>``), and written atomically to ``output_dir`` (rank 0).

:class:`FinetuneDataModule` is the data side: tokenizer, normalisation, transforms (the BEiT-3
recipes: random resized crop + flip + RandAugment for training, a whole-image resize for evaluation),
map-style datasets (Lightning's distributed sampler shards them), the demo data built on first use.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vlmoe.data import Collator, build_demo, build_tokenizer, build_transform, preprocess_dict
from vlmoe.data.controls import CONTROL_KEYS, ShuffledImages
from vlmoe.data.errors import SampleErrors, SkipUnreadable
from vlmoe.io import atomic_write_json
from vlmoe.metrics import Evaluator
from vlmoe.models import VLMoE, VLMoEConfig
from vlmoe.models.checkpoint import resolve_config
from vlmoe.models.loading import load_into, read_source
from vlmoe.moe.config import NO_MOE_CHANGES, MoEOptions

from ..base import VLMoETask, with_moe_options

log = logging.getLogger("vlmoe.tasks")

__all__ = [
    "DEMO",
    "DEMO_PRETRAIN_CHECKPOINT",
    "SMOKE_BUDGET",
    "WHOLE_IMAGES",
    "FinetuneDataModule",
    "FinetuneTask",
    "control_metrics",
    "control_name",
    "demo_recipe",
]

DEMO = "demo"
DEMO_PRETRAIN_CHECKPOINT = "runs/pretrain/demo/checkpoints/last.ckpt"

# what every demo recipe shares: the demo pretraining checkpoint, the schedule's floor, one loader
# worker (2-core CPUs)
_DEMO_COMMON = {"model.init_checkpoint": DEMO, "model.min_lr": 1.0e-5, "data.num_workers": 1}

# the study's ``smoke`` budget of a task: a few steps on a few samples (tests)
SMOKE_BUDGET = ["--trainer.max_steps=2", "--trainer.max_epochs=-1", "--data.limit_train_samples=32",
                "--data.batch_size=16", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]


# the vision-language demos' images as they are: no RandAugment, crop or flip (the texts name the
# shape's colour, kind, size and side, which those change)
WHOLE_IMAGES = {"data.randaug": "", "data.scale": [1.0, 1.0], "data.hflip": 0.0}


def demo_recipe(options: dict[str, Any]) -> dict[str, Any]:
    """A task's demo: the CLI defaults ``options`` over what every demo shares."""
    return {**_DEMO_COMMON, **options}


def resolve_init(init_checkpoint: str | None) -> str | None:
    """``demo`` -> the demo pretraining checkpoint (an error saying how to make it when absent)."""
    if init_checkpoint != DEMO:
        return init_checkpoint
    path = Path(DEMO_PRETRAIN_CHECKPOINT)
    if not path.is_file():
        raise FileNotFoundError(
            f"model.init_checkpoint=demo: no demo pretraining checkpoint at {path.resolve()}. Run `vlmoe pretrain` "
            "first (about 2 minutes on a CPU), or pass --model.init_checkpoint PATH (a vlmoe .ckpt, an export "
            "folder, a BEiT-3 .pth) or --model.init_checkpoint null with --model.model PRESET (random init)"
        )
    return str(path)


class FinetuneTask(VLMoETask):
    """Base of the finetuning tasks.

    Args:
        model: preset name or YAML / JSON config of the backbone; None: the architecture of
            ``init_checkpoint``.
        model_overrides: backbone config fields to change (``{"drop_path_rate": 0.1}``; the task's
            own defaults, e.g. ``final_norm: false`` for VQA as BEiT-3, come first).
        moe: changes to the MoE layers, typed (``--model.moe.top_k 1``; applied after ``model_overrides``).
        init_checkpoint: the weights to start from (see the module docstring); ``demo``: the demo
            pretraining run's; None: random initialisation (with a warning).
        allow_partial_init: accept an ``init_checkpoint`` that provides under half of the weights.
        vocab_size: the tokenizer's vocabulary (linked from the data module by the CLI); must match
            the checkpoint's text embedding.
        image_size: finetuning resolution (None: the checkpoint's); positions are resized.
        drop_path_rate: stochastic depth of the finetuning run (None: the config's).
        linear_probe: freeze the backbone (train the head only).
        task_head_lr_weight: lr multiplier of the ``head`` parameters (BEiT-3's ``task_head_lr_weight``).
        output_dir: where predictions and metrics are written (the CLI: ``<run_dir>/predictions``).
        controls: also score every vision-language evaluation with the images shuffled across samples
            (:mod:`vlmoe.data.controls`), logged as ``<stage>/<metric>_shuffled_images``; one more
            forward over the evaluation set. Tasks without a text input ignore it.
        **kwargs: optimizer / schedule / MoE options of :class:`~vlmoe.tasks.VLMoETask`.
    """

    default_overrides: ClassVar[dict[str, Any]] = {}
    needs_text: ClassVar[bool] = False
    """The task reads text: its backbone must have the text branch."""
    metric_key: ClassVar[str] = "accuracy"
    has_control: ClassVar[bool] = False
    """The task reads image and text: its evaluation can score the shuffled-image control by running
    :meth:`eval_step` on the control images (tasks whose control needs no forward override
    :meth:`score_control` instead)."""

    def __init__(
        self,
        model: str | None = None,
        model_overrides: dict[str, Any] | None = None,
        moe: MoEOptions = NO_MOE_CHANGES,
        init_checkpoint: str | None = DEMO,
        allow_partial_init: bool = False,
        vocab_size: int | None = None,
        image_size: int | None = None,
        drop_path_rate: float | None = None,
        linear_probe: bool = False,
        task_head_lr_weight: float = 1.0,
        output_dir: str | None = None,
        controls: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.controls = bool(controls)
        if task_head_lr_weight <= 0:
            raise ValueError(f"model.task_head_lr_weight must be > 0, got {task_head_lr_weight}")
        self.linear_probe, self.task_head_lr_weight = linear_probe, task_head_lr_weight
        self.output_dir = output_dir
        init = resolve_init(init_checkpoint)
        overrides = {**self.default_overrides, **(model_overrides or {})}
        if image_size is not None:
            overrides["img_size"] = image_size
        if drop_path_rate is not None:
            overrides["drop_path_rate"] = drop_path_rate
        try:
            source = read_source(init) if init is not None else None  # the file is read once, here
            if model is not None:
                base = resolve_config(model)
            elif source is not None and source.config is not None:
                base = source.config
            elif source is not None:
                raise ValueError(f"{init}: a bare vlmoe state dict carries no architecture; give --model.model PRESET")
            else:
                raise ValueError("give model.model (a preset) or model.init_checkpoint (weights to start from)")
            config = base.replace(**with_moe_options(overrides, moe, base))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"model: {e}") from None
        if self.needs_text and not config.has_text:
            source = f"model.model {model}" if model is not None else f"model.init_checkpoint {init}"
            raise ValueError(
                f"{source}: a vision-only backbone (modalities {list(config.modalities)}), but "
                f"{type(self).__name__} reads text; start from a vision-language checkpoint, or give "
                "--model.model PRESET to build one (the checkpoint then initialises its vision part)"
            )
        if vocab_size is not None and config.has_text and config.vocab_size != vocab_size:
            if init is not None and model is None:
                raise ValueError(
                    f"the tokenizer has {vocab_size} ids but {init} embeds {config.vocab_size}: give the checkpoint's "
                    "tokenizer (data.tokenizer, e.g. beit3.spm for BEiT-3's 64010)"
                )
            config = config.replace(vocab_size=vocab_size)
        self.model = self.build_model(VLMoE(config))
        if source is not None:
            report = load_into(self.model, source, allow_partial=allow_partial_init)
            rank_zero_info(str(report))
        else:
            rank_zero_warn("model.init_checkpoint is null: finetuning from random initialisation")
        if linear_probe:
            for p in self.model.backbone.parameters():
                p.requires_grad_(False)
        self.evaluators: dict[str, Evaluator] = {}
        self._checkpoint_step: int | None = None  # the global step of a checkpoint loaded by the trainer

    # ------------------------------------------------------------------ subclass interface
    def build_model(self, backbone: VLMoE) -> nn.Module:
        """The task model on ``backbone``."""
        raise NotImplementedError

    def make_evaluator(self, stage: str) -> Evaluator:
        """The evaluator of a ``val`` / ``test`` pass (the data module knows the ground truth)."""
        raise NotImplementedError

    def eval_step(self, batch: dict[str, Any]) -> tuple[Tensor | None, list[dict[str, Any]]]:
        """``(loss or None, prediction records)`` of an evaluation batch."""
        raise NotImplementedError

    @property
    def config(self) -> VLMoEConfig:
        return self.backbone.config

    def data_geometry(self) -> dict[str, int]:
        """The resolution the data module must deliver (the model's)."""
        return {"image_size": self.config.img_size, "patch_size": self.config.patch_size}

    # ------------------------------------------------------------------ optimisation
    def _param_groups(self) -> list[dict[str, Any]]:
        groups = super()._param_groups()
        if self.task_head_lr_weight == 1.0:
            return groups
        out = []
        for g in groups:  # split each group into its head and non-head parameters
            head = [i for i, n in enumerate(g["names"]) if n.startswith("model.head.")]
            rest = [i for i in range(len(g["names"])) if i not in head]
            for idx, scale in ((rest, 1.0), (head, self.task_head_lr_weight)):
                if idx:
                    out.append({**g, "params": [g["params"][i] for i in idx], "names": [g["names"][i] for i in idx],
                                "lr_scale": g["lr_scale"] * scale})
        return out

    def train(self, mode: bool = True) -> FinetuneTask:
        super().train(mode)
        if self.linear_probe:
            self.model.backbone.eval()  # a frozen backbone: no drop path, dropout or bias updates
        return self

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        trainer = self.trainer
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            # a run that --trainer.max_steps ends mid-epoch: stopping through should_stop makes
            # Lightning validate at this step, so the run ends scored, with its best checkpoint
            trainer.should_stop = True

    def loss_with_aux(self, loss: Tensor, aux: Any, stage: str = "train") -> Tensor:
        """``loss + aux_loss_weight * MoE aux`` with every term checked (and logged in training)."""
        total = loss + self.aux_loss_weight * aux.loss
        terms = {"loss/task": loss, **self.aux_terms(aux), "loss": total}
        self.check_terms(terms, stage="train" if stage == "train" else "validation", stats=aux.stats)
        if stage == "train":
            self.log("loss", total.detach(), prog_bar=True, on_step=True, on_epoch=False)
            self.log_dict({k: v.detach() for k, v in terms.items() if k != "loss"}, on_step=True, on_epoch=False)
        return total

    # ------------------------------------------------------------------ evaluation
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._checkpoint_step = checkpoint.get("global_step")

    @property
    def evaluated_step(self) -> int:
        """The training step of the weights being scored: the trainer's while fitting; in ``validate`` /
        ``test`` with ``--ckpt_path``, the checkpoint's (Lightning restores no step counter there)."""
        trainer = self.trainer
        if trainer.state.fn != "fit" and self._checkpoint_step is not None:
            return int(self._checkpoint_step)
        return trainer.global_step

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "controls"):
            # the data module then hands every evaluation sample another sample's image as well
            dm.controls = self.controls and self.has_control
        super().setup(stage)

    def _start(self, stage: str) -> None:
        self.evaluators[stage] = self.make_evaluator(stage)
        if self.controls and self.has_control:
            self.evaluators[f"{stage}/control"] = self.make_evaluator(stage)

    def _step(self, stage: str, batch: dict[str, Any]) -> None:
        loss, records = self.eval_step(batch)
        self.evaluators[stage].update(records)
        if loss is not None:
            self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(records))
        control = self.evaluators.get(f"{stage}/control")
        if control is not None:
            if CONTROL_KEYS["image"] not in batch:
                raise ValueError(
                    f"model.controls is on but the {stage} batches carry no {CONTROL_KEYS['image']!r}: the data "
                    "module must wrap its evaluation sets in vlmoe.data.controls.ShuffledImages (image_keys())"
                )
            swapped = {**batch, **{k: batch[c] for k, c in CONTROL_KEYS.items() if c in batch}}
            control.update(self.eval_step(swapped)[1])

    def score_control(self, stage: str, evaluator: Evaluator) -> dict[str, float]:
        """The metrics of the shuffled-image control (default: :meth:`score` of the control evaluator)."""
        control = self.evaluators.get(f"{stage}/control")
        if control is None:
            return {}
        control.gather()
        return self.score(control)

    def _end(self, stage: str) -> dict[str, float]:
        ev = self.evaluators[stage]
        ev.gather()
        if self.trainer.sanity_checking:
            if f"{stage}/control" in self.evaluators:
                self.evaluators[f"{stage}/control"].gather()
            return {}
        metrics = self.score(ev)
        if metrics and self.controls:
            metrics.update(control_metrics(self.score_control(stage, ev)))
        if metrics:
            self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False)
        if self.trainer.is_global_zero and self.output_dir:
            self.write_outputs(stage, ev, metrics)
        if self.trainer.is_global_zero and metrics:
            print(self.metrics_line(stage, metrics), flush=True)
        return metrics

    def metrics_line(self, stage: str, metrics: dict[str, float]) -> str:
        """``val (step 936, 500 images): CIDEr 2.5962 (shuffled images 0.1012), Bleu_4 0.7062 (...), ...``
        (the task's metric first; each metric's shuffled-image control beside it)."""
        counts = [f"{int(v):,} {k[4:]}" for k, v in metrics.items() if k.startswith("num_")]
        shown = sorted((k for k in metrics if not k.startswith("num_") and k != "official" and SHUFFLED not in k),
                       key=lambda k: k != self.metric_key)
        where = f" -> {Path(self.output_dir) / f'{stage}_metrics.json'}" if self.output_dir else ""
        head = ", ".join([f"step {self.evaluated_step}", *counts])

        def one(k: str) -> str:
            c = metrics.get(control_name(k))
            return f"{k} {metrics[k]:.4f}" + ("" if c is None else f" (shuffled images {c:.4f})")

        return f"{stage} ({head}): " + ", ".join(one(k) for k in shown) + where

    def score(self, evaluator: Evaluator) -> dict[str, float]:
        """The metrics of a gathered evaluator (a test split without labels has none)."""
        return evaluator.compute()

    def write_outputs(self, stage: str, evaluator: Evaluator, metrics: dict[str, float]) -> None:
        """``<output_dir>/<stage>_predictions.json`` and ``<stage>_metrics.json`` (atomic writes)."""
        out = Path(self.output_dir)
        atomic_write_json(out / f"{stage}_predictions.json", evaluator.records)
        if metrics:
            atomic_write_json(out / f"{stage}_metrics.json", {"step": self.evaluated_step, **metrics}, indent=1)

    def on_validation_epoch_start(self) -> None:
        self._start("val")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._end("val")

    def on_test_epoch_start(self) -> None:
        self._start("test")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        return self.eval_step(batch)[1]


SHUFFLED = "_shuffled_images"


def control_name(metric: str) -> str:
    """The name of a metric's shuffled-image control: ``accuracy`` -> ``accuracy_shuffled_images``,
    ``accuracy/yes/no`` -> ``accuracy_shuffled_images/yes/no`` (counts have none: returned unchanged)."""
    if metric.startswith("num_") or metric in ("coverage", "official"):
        return metric
    head, sep, rest = metric.partition("/")
    return f"{head}{SHUFFLED}{sep}{rest}"


def control_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The control's metrics under their control names (its counts dropped: they equal the metric's)."""
    return {control_name(k): v for k, v in metrics.items() if control_name(k) != k}


class _EpochSampler(DistributedSampler):
    """This rank's share of an epoch's samples: a permutation seeded by ``seed`` and the epoch (or the
    order of the split), padded to a multiple of the ranks by repeating its start, every
    ``num_replicas``-th index from ``rank`` (:class:`~torch.utils.data.DistributedSampler`'s split, so
    Lightning uses it as it is). The first epoch it serves skips the first ``skip`` indices of this
    rank's share: the part a resumed run already trained on.

    Its length is always the full share: Lightning reads the number of batches once, when the
    loader is set up, and sizes every epoch by it. A resumed epoch that yields fewer batches ends
    when they run out (Lightning restored the count of those it had done), the next keep their size.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, skip: int = 0, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.n, self.skip = n, skip

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.total_size > len(order):  # pad so that every rank gets as many
            order += (order * math.ceil(self.total_size / max(1, len(order))))[: self.total_size - len(order)]
        mine = order[self.rank : self.total_size : self.num_replicas]
        skip, self.skip = self.skip, 0
        return iter(mine[skip:])

    def __len__(self) -> int:
        return self.num_samples


class FinetuneDataModule(pl.LightningDataModule):
    """Common parts of the finetuning data modules.

    Args:
        batch_size: training samples per step and rank.
        val_batch_size: evaluation batch size (default ``2 * batch_size``).
        num_workers: DataLoader workers.
        tokenizer: ``clip``, a SentencePiece model or a ``tokenizer.json`` (texts of VL tasks).
        max_len: text length, special tokens included.
        mean_std: image normalisation (``inception``: BEiT-3's VL tasks; ``imagenet``: its ImageNet).
        image_size: image side (None: the model's, read from the task).
        randaug: timm RandAugment of training images (``rand-n2-m7``: BEiT-3's ``RandomAugment(2, 7)``;
            empty: none).
        scale: random resized crop area range of training images (``[1, 1]``: whole images).
        hflip: horizontal flip probability of training images.
        demo_dir: where the demo data lives / is built (default ``$VLMOE_DATA/demo``).
        limit_train_samples: use only the first N training samples (quick runs).
        shuffle: shuffle the training samples (a permutation seeded by ``seed`` and the epoch, so a
            resumed run continues the epoch where the checkpoint left it).
        seed: the shuffling seed.
        max_skipped_samples: training samples whose image is missing or cannot be decoded are skipped
            and counted (``skipped samples: train: ...`` at the end, ``data/skipped/train/*`` in the
            logs); one more than this in a run is an error.
    """

    def __init__(
        self,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 1,
        tokenizer: str | None = "clip",
        max_len: int = 64,
        mean_std: str = "inception",
        image_size: int | None = None,
        randaug: str = "rand-n2-m7",
        scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.5,
        demo_dir: str | None = None,
        limit_train_samples: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        max_skipped_samples: int = 100,
    ) -> None:
        super().__init__()
        if max_skipped_samples < 0:
            raise ValueError(f"data.max_skipped_samples must be >= 0, got {max_skipped_samples}")
        self.shuffle, self.seed = shuffle, seed
        self.max_skipped_samples = max_skipped_samples
        self.sample_errors = SampleErrors("train")
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or 2 * batch_size
        self._num_workers = num_workers
        self.tokenizer_name, self.max_len, self._mean_std = tokenizer, max_len, mean_std
        self.image_size, self.randaug, self.scale, self.hflip = image_size, randaug, tuple(scale), hflip
        self.demo_dir, self.limit_train_samples = demo_dir, limit_train_samples
        self.tokenizer = build_tokenizer(tokenizer) if tokenizer else None
        self.datasets: dict[str, Dataset] = {}
        self.controls = False  # set by the task: evaluation samples also carry a control image

    def error_counts(self) -> dict[str, dict[str, int]]:
        """Skipped training samples by reason (read by the ``SkippedSamples`` callback)."""
        return {"train": self.sample_errors.as_dict()}

    def image_keys(self, data: Dataset) -> list[Any] | None:
        """The image key of every sample of an evaluation set (id, path, or a tuple for two images),
        which the shuffled-image control permutes; None: this task has no such control."""
        return None

    # ------------------------------------------------------------------ the data-module protocol
    @property
    def vocab_size(self) -> int | None:
        return self.tokenizer.vocab_size if self.tokenizer is not None else None

    @property
    def mean_std(self) -> str:
        return self._mean_std

    @property
    def num_workers(self) -> int:
        return self._num_workers

    def preprocess_config(self) -> dict[str, Any]:
        return preprocess_dict(self.resolved_image_size(), self._mean_std, self.tokenizer_name, self.max_len,
                               **self.eval_resize())

    def eval_resize(self) -> dict[str, Any]:
        """How evaluation images are resized (``squash``: the whole image to the square, BEiT-3's VL tasks)."""
        return {"resize": "squash"}

    # ------------------------------------------------------------------ pieces
    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        module = self.trainer.lightning_module if self.trainer is not None else None
        geometry = getattr(module, "data_geometry", None)
        if callable(geometry):
            return geometry()["image_size"]
        raise ValueError("data.image_size unknown: set it, or attach the data module to a trainer and a task")

    def demo(self) -> Any:
        return build_demo(self.demo_dir)

    files: dict[str, Any] = {}  # subclasses: option name -> path, None or ``demo``

    def demo_files(self, demo: Any) -> dict[str, Any]:
        """What ``demo`` stands for in each of :attr:`files` (the demo data's paths)."""
        return {}

    def uses_demo(self) -> bool:
        return any(v == DEMO for v in self.files.values())

    def resolve(self) -> dict[str, Any]:
        """:attr:`files` with ``demo`` replaced by the demo data's paths (built on first use)."""
        files = dict(self.files)
        if self.uses_demo():
            demo = self.demo_files(self.demo())
            files = {k: (str(demo[k]) if v == DEMO else v) for k, v in files.items()}
        return files

    def prepare_data(self) -> None:
        if self.uses_demo():
            build_demo(self.demo_dir, verbose=True)

    def transform(self, train: bool) -> Any:
        size = self.resolved_image_size()
        if train:
            return build_transform("train", size, mean_std=self._mean_std, scale=self.scale, hflip=self.hflip,
                                   randaug=self.randaug, output="uint8")
        return build_transform("eval", size, mean_std=self._mean_std, output="uint8")

    def collator(self) -> Collator:
        return Collator(self.tokenizer, self.max_len, mean_std=self._mean_std)

    def _loader(self, name: str, train: bool) -> DataLoader:
        if name not in self.datasets:
            self.setup("fit" if train else "validate")
        data = self.datasets.get(name)
        if data is None:
            raise ValueError(f"this data module has no {name} split configured")
        if train and self.limit_train_samples:
            data = torch.utils.data.Subset(data, range(min(self.limit_train_samples, len(data))))
        world = self.trainer.world_size if self.trainer is not None else 1
        if train and len(data) < self.batch_size * world:
            raise ValueError(
                f"the training split has {len(data)} samples, fewer than one batch (data.batch_size={self.batch_size}"
                + (f" x {world} ranks" if world > 1 else "") + "): nothing to train on"
            )
        if train:
            data = SkipUnreadable(data, self.sample_errors, self.max_skipped_samples)
        if not train and self.controls:
            keys = self.image_keys(data)
            if keys is not None:
                data = ShuffledImages(data, keys, seed=self.seed)
        w = self._num_workers
        sampler = None
        if train:
            t = self.trainer
            world, rank = (t.world_size, t.global_rank) if t is not None else (1, 0)
            sampler = _EpochSampler(len(data), self.shuffle, self.seed, skip=self._resumed_samples(),
                                    num_replicas=world, rank=rank)
        return DataLoader(
            data,
            batch_size=self.batch_size if train else self.val_batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=w,
            collate_fn=self.collator(),
            persistent_workers=w > 0,
            prefetch_factor=4 if w > 0 else None,
        )

    def _resumed_samples(self) -> int:
        """Training samples of the current epoch this rank has already trained on in a resumed run (0
        otherwise)."""
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed) * self.batch_size

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.datasets else "val", train=False)
