"""Pretraining input: three webdataset streams (image-text pairs, images, texts) in every step.

BEiT-3 trains each step on a batch made of image-text pairs, images and texts. Here each stream is
its own :func:`~vlmoe.data.shards.stream_pipeline` that batches its own samples; :class:`MultiStream`
advances them in lockstep and yields one dict per step::

    {"pair":  {image, image_mask, text_ids, text_padding_mask, mlm_labels, key},
     "image": {image, image_mask, [label], key},
     "text":  {text_ids, text_padding_mask, mlm_labels, key}}

Only streams with shards and a positive weight appear. The weights split the step's batch size
between streams (largest-remainder rounding, at least one sample per stream in use).

Epochs: an iterable dataset has no natural length, and ranks / workers may hold different numbers
of samples, which deadlocks DDP at the end of an epoch. So the epoch is fixed up front: one pass
over the reference stream (pairs, else images, else texts; or ``samples_per_epoch``) divided over
ranks and workers, and every worker yields exactly that many steps, re-opening a stream that runs
out (the open_clip / webdataset ``with_epoch`` recipe).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from vlmoe.data.collate import Collator
from vlmoe.data.errors import SampleErrors
from vlmoe.data.masking import BlockMaskingGenerator
from vlmoe.data.shards import STREAM_KINDS, count_samples, dist_info, expand_shards, stream_pipeline
from vlmoe.data.tokenizers import Tokenizer, build_tokenizer
from vlmoe.data.transforms import build_transform, draft_size

__all__ = ["EpochLoader", "MultiStream", "PretrainData", "PretrainDataConfig", "split_batch"]


def split_batch(batch_size: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``batch_size`` samples between streams in proportion to ``weights``.

    Largest-remainder rounding; every stream with a positive weight gets at least one sample.

    Args:
        batch_size: samples per step, all streams together.
        weights: stream name -> non-negative weight.
    """
    active = {k: float(w) for k, w in weights.items() if w > 0}
    if not active:
        raise ValueError(f"no stream has a positive weight: {dict(weights)}")
    if batch_size < len(active):
        raise ValueError(f"batch_size {batch_size} is smaller than the number of streams {len(active)}")
    total = sum(active.values())
    exact = {k: batch_size * w / total for k, w in active.items()}
    sizes = {k: max(1, math.floor(v)) for k, v in exact.items()}
    # Hand out what rounding left (or take back what the minimum of 1 added) by remainder order.
    order = sorted(active, key=lambda k: exact[k] - math.floor(exact[k]), reverse=True)
    i = 0
    while sum(sizes.values()) < batch_size:
        sizes[order[i % len(order)]] += 1
        i += 1
    while sum(sizes.values()) > batch_size:
        k = max((k for k in sizes if sizes[k] > 1), key=lambda k: sizes[k] - exact[k])
        sizes[k] -= 1
    return sizes


class MultiStream(IterableDataset):
    """Advance several batched streams together, one dict of sub-batches per step.

    Args:
        streams: name -> an iterable dataset yielding batches.
        batches_per_worker: steps each DataLoader worker yields per epoch, re-opening streams that run
            out; None: stop as soon as any stream ends (one pass, lengths may differ across workers).
        num_workers: DataLoader workers (for ``__len__``).
    """

    def __init__(
        self,
        streams: Mapping[str, IterableDataset],
        batches_per_worker: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        if not streams:
            raise ValueError("MultiStream needs at least one stream")
        self.streams = dict(streams)
        self.batches_per_worker = batches_per_worker
        self.num_workers = num_workers

    def __len__(self) -> int:
        if self.batches_per_worker is None:
            raise TypeError("MultiStream without batches_per_worker has no length")
        return self.batches_per_worker * max(1, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """Seed the next pass's shard order (and resampling) with ``epoch`` in every stream."""
        for stream in self.streams.values():
            stages = getattr(stream, "pipeline", None) or [stream]
            if hasattr(stages[0], "set_epoch"):
                stages[0].set_epoch(epoch)

    def _restart(self, name: str) -> Iterator[Any]:
        it = iter(self.streams[name])
        first = next(it, None)
        if first is None:
            rank, world, worker, workers = dist_info()
            shards = len(getattr(self.streams[name], "shards", []) or [])
            raise RuntimeError(
                f"stream {name!r} yields no batch on rank {rank} worker {worker}: it has {shards} shard(s) "
                f"for world_size x num_workers = {world} x {workers} readers (or every sample was skipped); "
                "write more shards or use resampled=True"
            )

        def chain() -> Iterator[Any]:
            yield first
            yield from it

        return chain()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iters = {name: self._restart(name) for name in self.streams}
        step = 0
        while self.batches_per_worker is None or step < self.batches_per_worker:
            out = {}
            for name in self.streams:
                batch = next(iters[name], None)
                if batch is None:
                    if self.batches_per_worker is None:
                        return
                    iters[name] = self._restart(name)
                    batch = next(iters[name])
                out[name] = batch
            yield out
            step += 1


@dataclass
class PretrainDataConfig:
    """Pretraining data options (the ``data:`` section of a pretraining config).

    Args:
        pair_shards, image_shards, text_shards: shard specifications per stream (None: stream off).
        weights: stream -> share of each step's batch.
        batch_size: samples per step and rank, all streams together.
        image_size: image side in pixels.
        patch_size: model patch size (the MIM grid is ``image_size // patch_size``).
        max_len: text length L.
        tokenizer: see :func:`~vlmoe.data.tokenizers.build_tokenizer`.
        mim_ratio: fraction of patches masked (block-wise) in pair and image streams; 0 disables.
        mim_ratio_pair: the pair stream's own ratio (None: ``mim_ratio``; 0: the pair's image is seen
            whole, so every masked caption word can be read off it).
        min_mask_patches: smallest masking block.
        mlm_ratio_pair, mlm_ratio_text: fraction of text tokens masked in pairs / texts; 0 disables.
        mean_std: normalisation (see :mod:`vlmoe.data.transforms`).
        normalize_images: deliver normalised float32 images (the batch-dict contract). False:
            deliver the uint8 pixels (4x less to move to the GPU) and normalise on the device with
            :func:`vlmoe.data.transforms.normalize_batch`.
        scale: random resized crop area range (``(1, 1)``: no crop, the whole image).
        hflip: horizontal flip probability of the training transform (0: off, for data whose texts
            speak of left and right).
        augment: random resized crop + horizontal flip (training). False: a plain resize of the whole
            image, deterministic (validation).
        shuffle: shuffle buffer (samples); 0 disables.
        resampled: infinite shard resampling (multi-node).
        samples_per_epoch: epoch size; default: the samples of the reference stream.
        num_workers: DataLoader workers.
        seed: base seed.
    """

    pair_shards: Any = None
    image_shards: Any = None
    text_shards: Any = None
    weights: dict[str, float] = field(default_factory=lambda: {"pair": 1.0, "image": 1.0, "text": 1.0})
    batch_size: int = 48
    image_size: int = 224
    patch_size: int = 16
    max_len: int = 64
    tokenizer: str = "clip"
    mim_ratio: float = 0.4
    mim_ratio_pair: float | None = None
    min_mask_patches: int = 16
    mlm_ratio_pair: float = 0.5
    mlm_ratio_text: float = 0.15
    mean_std: str = "inception"
    normalize_images: bool = True
    scale: tuple[float, float] = (0.5, 1.0)
    hflip: float = 0.5
    augment: bool = True
    shuffle: int = 1000
    resampled: bool = False
    samples_per_epoch: int | None = None
    num_workers: int = 2
    seed: int = 0


class PretrainData:
    """Builds the three streams, the collators and the DataLoader from a :class:`PretrainDataConfig`.

    Args:
        config: the options.
        tokenizer: a ready tokenizer (default: built from ``config.tokenizer``).
        rank, world_size: explicit distributed position (default: detected when iterating).

    Attributes:
        tokenizer: the tokenizer (its ``vocab_size`` sizes the model's embedding).
        batch_sizes: samples per step of each active stream.
        errors: stream -> :class:`~vlmoe.data.errors.SampleErrors` (skipped-sample counters).
        dataset: the :class:`MultiStream`.
    """

    def __init__(
        self,
        config: PretrainDataConfig,
        tokenizer: Tokenizer | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.config = c = config
        self.tokenizer = tokenizer or build_tokenizer(c.tokenizer)
        shards = {"pair": c.pair_shards, "image": c.image_shards, "text": c.text_shards}
        unknown = sorted(set(c.weights) - set(STREAM_KINDS))
        if unknown:
            raise ValueError(f"weights: unknown stream(s) {unknown}; the streams are {list(STREAM_KINDS)}")
        unweighted = [k for k in STREAM_KINDS if shards[k] is not None and k not in c.weights]
        if unweighted:
            raise ValueError(
                f"weights {dict(c.weights)} has no weight for the {', '.join(unweighted)} stream(s), whose shards "
                "are set: give each a weight (0 turns a stream off) or set its shards to None"
            )
        weights = {k: float(c.weights[k]) for k in STREAM_KINDS if shards[k] is not None}
        self.batch_sizes = split_batch(c.batch_size, weights)
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        grid = c.image_size // c.patch_size

        def masking(ratio: float) -> BlockMaskingGenerator | None:
            if ratio <= 0:
                return None
            return BlockMaskingGenerator(grid, mask_ratio=ratio, min_num_patches=c.min_mask_patches)

        mim = masking(c.mim_ratio)
        mim_by_kind = {"image": mim, "text": None,
                       "pair": mim if c.mim_ratio_pair is None else masking(c.mim_ratio_pair)}
        # uint8 per sample, normalised per batch in the collate step (4x less data through the
        # transform and the stack, one fused conversion).
        tkind = "pretrain" if c.augment else "eval"
        transform = build_transform(
            tkind, c.image_size, mean_std=c.mean_std, scale=tuple(c.scale), hflip=c.hflip, output="uint8"
        )
        draft = (draft_size(c.image_size, c.scale[0] if c.augment else 1.0),) * 2
        mlm = {"pair": c.mlm_ratio_pair or None, "image": None, "text": c.mlm_ratio_text or None}
        self.errors: dict[str, SampleErrors] = {}
        streams = {}
        self.shards: dict[str, list[str]] = {}
        for kind, bs in self.batch_sizes.items():
            self.shards[kind] = expand_shards(shards[kind])
            self.errors[kind] = SampleErrors(name=kind)
            collate = Collator(
                self.tokenizer if kind != "image" else None,
                c.max_len,
                mlm_ratio=mlm[kind],
                mim=mim_by_kind[kind],
                mean_std=c.mean_std if c.normalize_images else None,
            )
            streams[kind] = stream_pipeline(
                self.shards[kind],
                kind,
                batch_size=bs,
                collate=collate,
                transform=transform if kind != "text" else None,
                errors=self.errors[kind],
                shuffle=c.shuffle,
                resampled=c.resampled,
                seed=c.seed,
                partial=False,
                draft=draft,
                rank=rank,
                world_size=world_size,
            )
        world = world_size if world_size is not None else dist_info()[1]
        self.samples_per_epoch = c.samples_per_epoch or self._reference_samples()
        ref = next(k for k in STREAM_KINDS if k in self.batch_sizes)
        steps_per_rank = max(1, math.ceil(self.samples_per_epoch / (self.batch_sizes[ref] * world)))
        workers = max(1, c.num_workers)
        self.batches_per_worker = max(1, math.ceil(steps_per_rank / workers))
        self.dataset = MultiStream(streams, self.batches_per_worker, c.num_workers)

    def _reference_samples(self) -> int:
        for kind in STREAM_KINDS:
            if kind in self.shards:
                n = count_samples(self.shards[kind])
                if n is None:
                    raise ValueError(
                        f"cannot tell how many samples the {kind} shards hold (no sizes.json and "
                        "not local); set samples_per_epoch"
                    )
                return n
        raise AssertionError("unreachable")

    @property
    def steps_per_epoch(self) -> int:
        """Steps each rank takes per epoch."""
        return len(self.dataset)

    def error_counts(self) -> dict[str, dict[str, int]]:
        """Skipped samples per stream and category so far (all workers of this rank)."""
        return {k: e.as_dict() for k, e in self.errors.items()}

    def loader(self, **kwargs: Any) -> DataLoader:
        """The DataLoader (batches come from the streams; the loader only moves them).

        Args:
            **kwargs: extra DataLoader options (``pin_memory``, ``persistent_workers``, ...).
        """
        w = self.config.num_workers
        opts: dict[str, Any] = {"batch_size": None, "num_workers": w}
        if w > 0:
            opts.update(prefetch_factor=4, persistent_workers=False)
        opts.update(kwargs)
        return EpochLoader(self.dataset, **opts)


class EpochLoader(DataLoader):
    """A DataLoader that tells its dataset the epoch before each pass.

    Worker processes iterate copies of the dataset, so an epoch counter kept by the dataset itself
    would restart in every copy and every epoch would read the shards in the same order. This
    loader counts passes in the main process (identically on every rank) and calls
    ``dataset.set_epoch`` before the workers start.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def __iter__(self) -> Any:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        self.epoch += 1
        return super().__iter__()
