"""The pretraining LightningDataModule: three webdataset streams per step, demo data by default.

Shard specifications of ``"demo"`` (the default) stand for the demo shards of
:func:`vlmoe.data.build_demo`, built on first use into ``$VLMOE_DATA/demo`` (or
``~/.cache/vlmoe/demo``; ``demo_dir`` overrides) by one process per node (``prepare_data``); every
other process waits for it and then finds the cached build.

The image size and patch size default to the model's (read from the LightningModule when the
trainer sets the data up), so changing the model preset is enough. The epoch length is fixed per
rank and worker (:class:`vlmoe.data.PretrainData`), so DDP ranks always take the same number of
steps; shards are split by rank and by DataLoader worker in the pipeline (Lightning's distributed
sampler does not apply to iterable datasets).

Resuming mid-epoch: ``resume="skip"`` fast-forwards the first epoch past the batches already
trained on (exact for a deterministic pipeline, e.g. no shuffling; costs the decoding of those
batches), ``resume="reseed"`` (default) starts the stream afresh with a seed derived from the step
(cheap; the open_clip practice for large data).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlmoe.data import PretrainData, PretrainDataConfig, build_demo, build_tokenizer, expand_shards, preprocess_dict
from vlmoe.data.shards import STREAM_KINDS as STREAMS

log = logging.getLogger("vlmoe.tasks")

__all__ = ["PretrainDataModule"]

DEMO = "demo"


class _Skip(IterableDataset):
    """Drop the first ``skip`` batches the DataLoader would deliver (round-robin over workers)."""

    def __init__(self, dataset: IterableDataset, skip: int, num_workers: int) -> None:
        super().__init__()
        self.dataset, self.skip, self.num_workers = dataset, skip, max(1, num_workers)

    def __len__(self) -> int:
        return max(0, len(self.dataset) - self.skip)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # the DataLoader takes batches from workers in turn: global batch i comes from worker i % W
        mine = len(range(worker, self.skip, self.num_workers))
        return itertools.islice(iter(self.dataset), mine, None)


class PretrainDataModule(pl.LightningDataModule):
    """Image-text pairs, images and texts for :class:`~vlmoe.tasks.PretrainTask`.

    The data options proper (batch size, text length, tokenizer, masking ratios, normalisation,
    crop scale, shuffling, workers, seed, stream weights) are the fields of
    :class:`vlmoe.data.PretrainDataConfig`, given as keyword arguments (``--data.batch_size``, ...);
    this module adds where the shards are, validation, the demo data and resuming.

    Args:
        pair_shards: training shards of image-text pairs: a brace pattern
            (``pairs-{000000..000099}.tar``), a folder, a list, or ``demo`` (the demo shards); None:
            no pair stream.
        image_shards: training shards of images (same forms; None: no image stream).
        text_shards: training shards of texts (same forms; None: no text stream).
        val_pair_shards: validation shards of pairs (None: none).
        val_image_shards: validation shards of images (None: none).
        val_text_shards: validation shards of texts (None: none).
        demo_dir: where the demo data lives / is built (default ``$VLMOE_DATA/demo`` or
            ``~/.cache/vlmoe/demo``).
        val_batch_size: validation batch size (default ``batch_size``).
        val_samples: validation samples per rank and pass (default: one pass over the val shards).
        image_size: image side (default: the model's ``img_size``).
        patch_size: the MIM grid's patch size (default: the model's).
        min_mask_patches: smallest masking block (default: BEiT v2's 16 on a 14 x 14 grid, scaled to
            the grid, at least 2).
        resume: ``reseed`` or ``skip`` (see the module docstring).
        **options: :class:`~vlmoe.data.PretrainDataConfig` fields (``batch_size``, ``max_len``,
            ``tokenizer``, ``weights``, ``mim_ratio``, ``mlm_ratio_pair``, ``mlm_ratio_text``,
            ``mean_std``, ``scale``, ``shuffle``, ``resampled``, ``samples_per_epoch``,
            ``num_workers``, ``seed``, ...).
    """

    def __init__(
        self,
        pair_shards: str | list[str] | None = DEMO,
        image_shards: str | list[str] | None = DEMO,
        text_shards: str | list[str] | None = DEMO,
        val_pair_shards: str | list[str] | None = DEMO,
        val_image_shards: str | list[str] | None = DEMO,
        val_text_shards: str | list[str] | None = DEMO,
        demo_dir: str | None = None,
        val_batch_size: int | None = None,
        val_samples: int | None = None,
        image_size: int | None = None,
        patch_size: int | None = None,
        min_mask_patches: int | None = None,
        resume: str = "reseed",
        **options: Any,
    ) -> None:
        super().__init__()
        if resume not in ("reseed", "skip"):
            raise ValueError(f"data.resume={resume!r}: choose 'reseed' or 'skip'")
        self.save_hyperparameters()
        try:
            # the options template; shards, geometry and train / val settings are filled in per split
            self.options = PretrainDataConfig(
                pair_shards=None, image_shards=None, text_shards=None, augment=True, **options
            )
        except TypeError as e:
            raise ValueError(f"data: {e} (the options are PretrainDataConfig's fields)") from None
        self.shards = {"pair": pair_shards, "image": image_shards, "text": text_shards}
        self.val_shards = {"pair": val_pair_shards, "image": val_image_shards, "text": val_text_shards}
        self.demo_dir = demo_dir
        self.weights = dict(self.options.weights)
        self.batch_size = self.options.batch_size
        self.val_batch_size = val_batch_size or self.batch_size
        self.val_samples = val_samples
        self.image_size, self.patch_size, self.min_mask_patches = image_size, patch_size, min_mask_patches
        self.resume = resume
        self._check_weights()
        # built now: the model's embedding size is linked to it
        self.tokenizer = build_tokenizer(self.options.tokenizer)
        self.train_data: PretrainData | None = None
        self.val_data: PretrainData | None = None

    # ------------------------------------------------------------------ the data-module protocol
    @property
    def num_workers(self) -> int:
        """DataLoader workers asked for (the CPU thread policy leaves a core to each)."""
        return self.options.num_workers

    @property
    def mean_std(self) -> str:
        """The image normalisation (the model's MIM targets undo it)."""
        return self.options.mean_std

    def preprocess_config(self) -> dict[str, Any]:
        """How an evaluation image / text is prepared (stored in checkpoints and exports)."""
        return preprocess_dict(
            image_size=self._model_geometry()[0] if self._geometry_known() else self.image_size,
            mean_std=self.options.mean_std,
            tokenizer=self.options.tokenizer,
            max_len=self.options.max_len,
        )

    def _check_weights(self) -> None:
        unknown = sorted(set(self.weights) - set(STREAMS))
        if unknown:
            raise ValueError(f"data.weights: unknown stream(s) {unknown}; the streams are {list(STREAMS)}")
        for name, shards, bs in (("", self.shards, self.batch_size), ("val_", self.val_shards, self.val_batch_size)):
            unweighted = [k for k, v in shards.items() if v is not None and k not in self.weights]
            if unweighted:
                raise ValueError(
                    f"data.weights {self.weights} has no weight for the {', '.join(unweighted)} stream(s), but "
                    f"data.{name}{unweighted[0]}_shards is set: give every stream a weight (0 turns it off)"
                )
            active = [k for k, v in shards.items() if v is not None and self.weights.get(k, 0) > 0]
            if active and bs < len(active):
                option = "data.batch_size" if not name else "data.val_batch_size"
                raise ValueError(
                    f"{option}={bs} is smaller than the number of streams ({len(active)}: {', '.join(active)}); "
                    "every stream takes at least one sample a step"
                )

    @property
    def vocab_size(self) -> int:
        """Text vocabulary of the tokenizer (every id is below it)."""
        return self.tokenizer.vocab_size

    # ------------------------------------------------------------------ setup
    def _uses_demo(self) -> bool:
        return any(v == DEMO for v in (*self.shards.values(), *self.val_shards.values()))

    def prepare_data(self) -> None:
        # one process per node builds (build_demo also locks, for launchers that skip this hook)
        if self._uses_demo():
            build_demo(self.demo_dir, verbose=True)

    def _resolve(self, shards: dict[str, Any], split: str) -> dict[str, Any]:
        if not any(v == DEMO for v in shards.values()):
            return shards
        paths = build_demo(self.demo_dir)  # cached: returns at once after prepare_data
        demo = {
            "train": {"pair": paths.pretrain_pairs, "image": paths.pretrain_images, "text": paths.pretrain_texts},
            "val": {"pair": paths.val_pairs, "image": paths.val_images, "text": paths.val_texts},
        }[split]
        return {k: demo[k] if v == DEMO else v for k, v in shards.items()}

    def _task_geometry(self) -> dict[str, int] | None:
        """The attached task's ``data_geometry()`` (its model's image and patch size), if it has one."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        geometry = getattr(module, "data_geometry", None)
        return geometry() if callable(geometry) else None

    def _geometry_known(self) -> bool:
        return (self.image_size is not None and self.patch_size is not None) or self._task_geometry() is not None

    def _model_geometry(self) -> tuple[int, int]:
        image_size, patch_size = self.image_size, self.patch_size
        geometry = self._task_geometry()
        if geometry is not None:
            if image_size is not None and image_size != geometry["image_size"]:
                raise ValueError(
                    f"data.image_size={image_size} but the model's img_size={geometry['image_size']}; "
                    "leave data.image_size unset to follow the model"
                )
            if patch_size is not None and patch_size != geometry["patch_size"]:
                raise ValueError(f"data.patch_size={patch_size} but the model's patch_size={geometry['patch_size']}")
            image_size, patch_size = geometry["image_size"], geometry["patch_size"]
        if image_size is None or patch_size is None:
            raise ValueError("image_size / patch_size unknown: set them, or attach the data to a trainer and a task")
        return image_size, patch_size

    def _workers(self, shards: dict[str, Any]) -> int:
        """DataLoader workers, at most as many as the smallest stream has shards per rank: a worker
        without a shard would have nothing to read (resampled streams have no such limit)."""
        if self.options.resampled:
            return self.num_workers
        world = self.trainer.world_size if self.trainer is not None else 1
        counts = [len(expand_shards(v)) for v in shards.values() if v is not None]
        per_rank = min(counts) // max(1, world) if counts else 0
        workers = min(self.num_workers, max(0, per_rank))
        if workers < self.num_workers:
            log.info(f"data: {workers} DataLoader workers instead of {self.num_workers} ({per_rank} shards per rank)")
        return workers

    def _config(self, shards: dict[str, Any], batch_size: int, samples: int | None, train: bool) -> PretrainDataConfig:
        image_size, patch_size = self._model_geometry()
        grid = (image_size // patch_size) ** 2
        min_block = self.min_mask_patches
        if min_block is None:
            # BEiT v2: blocks of >= 16 patches on 196; keep the same share on small grids
            min_block = max(2, round(16 * grid / 196)) if grid < 196 else 16
        o = self.options
        return dataclasses.replace(
            o,
            pair_shards=shards["pair"],
            image_shards=shards["image"],
            text_shards=shards["text"],
            batch_size=batch_size,
            image_size=image_size,
            patch_size=patch_size,
            min_mask_patches=min_block,
            # validation: the whole image, resized (no random crop or flip), fixed order
            augment=train,
            shuffle=o.shuffle if train else 0,
            resampled=o.resampled if train else False,
            samples_per_epoch=samples,
            num_workers=self._workers(shards),
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_data is None:
            shards = self._check_shards(self._resolve(self.shards, "train"), "")
            cfg = self._config(shards, self.batch_size, self.options.samples_per_epoch, train=True)
            self.train_data = PretrainData(cfg, tokenizer=self.tokenizer)
        if stage in ("fit", "validate", None) and self.val_data is None and any(self.val_shards.values()):
            shards = self._check_shards(self._resolve(self.val_shards, "val"), "val_")
            cfg = self._config(shards, self.val_batch_size, self.val_samples, train=False)
            self.val_data = PretrainData(cfg, tokenizer=self.tokenizer)

    @staticmethod
    def _check_shards(shards: dict[str, Any], prefix: str) -> dict[str, Any]:
        """Every stream's shards exist; an error names the option (``data.pair_shards``, ...)."""
        for stream, spec in shards.items():
            if spec is None:
                continue
            try:
                expand_shards(spec)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"data.{prefix}{stream}_shards: {e}") from None
        return shards

    # ------------------------------------------------------------------ loaders
    def _trained_batches(self) -> int:
        """Batches of the current epoch already trained on (non-zero only when resuming mid-epoch)."""
        if self.trainer is None:
            return 0
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        # `processed`, not `completed`: a checkpoint written in on_train_batch_end has trained on the
        # batch whose completion it does not yet count
        return int(progress.current.processed) if self.trainer.fit_loop.restarting else 0

    def train_dataloader(self) -> DataLoader:
        if self.train_data is None:
            self.setup("fit")
        data = self.train_data
        assert data is not None
        done = self._trained_batches()
        if done and self.resume == "skip":
            dataset: IterableDataset = _Skip(data.dataset, done, data.config.num_workers)
            return DataLoader(dataset, **self._loader_kwargs())
        if done and self.resume == "reseed":
            # a different, step-dependent stream: the resumed run does not replay the epoch's start
            step = self.trainer.global_step if self.trainer is not None else done
            cfg = data.config
            cfg = PretrainDataConfig(**{**cfg.__dict__, "seed": cfg.seed + 1_000_003 * (step + 1)})
            return PretrainData(cfg, tokenizer=self.tokenizer).loader()
        return data.loader()

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.train_data.config.num_workers if self.train_data is not None else self.num_workers
        opts: dict[str, Any] = {"batch_size": None, "num_workers": workers}
        if workers > 0:
            opts.update(prefetch_factor=4, persistent_workers=False)
        return opts

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:
            self.setup("validate")
        return self.val_data.loader() if self.val_data is not None else []

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.options.seed, "skipped_samples": self.error_counts()}

    def error_counts(self) -> dict[str, dict[str, int]]:
        """Samples skipped so far per stream and reason (unreadable images, empty texts, ...)."""
        return self.train_data.error_counts() if self.train_data is not None else {}
