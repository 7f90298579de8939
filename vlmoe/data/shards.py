"""webdataset shards: naming them, writing them, and reading one stream of samples from them.

Layout (img2dataset's, see the reference notes): a shard is a POSIX tar whose members sharing a
basename form one sample, e.g. ``000010005.jpg`` + ``000010005.txt`` + ``000010005.json``. vlmoe reads
three kinds of stream:

- ``"pair"``: an image (``jpg``/``jpeg``/``png``/``webp``) and a caption (``txt``, or the ``caption``
  field of ``json`` when there is no ``txt``);
- ``"image"``: an image, with an optional integer class in ``cls``;
- ``"text"``: a ``txt`` member.

Reading (:func:`stream_pipeline`) goes: shard list -> split by node -> split by worker -> tar members
-> samples -> shuffle buffer -> decode and check -> image transform -> batches. Two modes:

- finite epochs (``resampled=False``): every rank sees the same shard order (a permutation seeded
  by ``seed`` and the epoch), then takes every ``world_size``-th shard starting at its rank, and each
  DataLoader worker every ``num_workers``-th of those, so each sample is read exactly once per epoch
  across all ranks and workers (given at least ``world_size * num_workers`` shards);
- resampled (``resampled=True``, for multi-node runs): each worker draws shards with replacement
  from the whole list with its own seed, forever; no node split is needed (and none is applied:
  webdataset's default node splitter refuses ``world_size > 1`` even in this mode). Cut epochs with
  :class:`vlmoe.data.pretrain.MultiStream`'s ``batches_per_epoch``.

The rank and world size come from explicit arguments, else from an initialised
``torch.distributed``, else from the ``RANK`` / ``WORLD_SIZE`` environment variables.

Bad samples are skipped and counted by a :class:`~vlmoe.data.errors.SampleErrors`.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from vlmoe.data._io import decode_image
from vlmoe.data.errors import SampleErrors
from vlmoe.io import atomic_write_json

log = logging.getLogger("vlmoe.data")

__all__ = [
    "IMAGE_EXTS",
    "STREAM_KINDS",
    "ShardList",
    "ShardWriter",
    "count_samples",
    "decode_samples",
    "dist_info",
    "expand_shards",
    "shard_sizes",
    "stream_pipeline",
]

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
STREAM_KINDS: tuple[str, ...] = ("pair", "image", "text")
SIZES_FILE = "sizes.json"
_SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")


# ------------------------------------------------------------------------------------- shard names
def _is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or ("://" in spec and not spec.startswith("file://"))


def _is_shard(path: Path) -> bool:
    return path.name.endswith(_SHARD_SUFFIXES)


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Turn a shard specification into a list of shard paths / URLs.

    Accepted, alone, in a list, or joined with ``::``:

    - brace notation ``data/pairs-{000000..000099}.tar`` (every named file must exist);
    - glob patterns ``data/pairs-*.tar``;
    - a directory (its ``*.tar`` / ``*.tgz`` / ``*.tar.gz`` files, sorted);
    - a text file (``.txt`` / ``.list``) with one shard per line, relative to the file's folder;
    - remote URLs (``pipe:...``, ``s3://...``, ``https://...``), passed through unchecked.

    Raises:
        FileNotFoundError: a pattern, directory or list names no existing shard, or some of the
            shards a brace pattern names are missing (the message lists a few).
    """
    specs = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    out: list[str] = []
    for item in specs:
        for part in str(item).split("::"):
            part = os.path.expanduser(part.strip())
            if part:
                out.extend(_expand_one(part))
    if not out:
        raise FileNotFoundError(f"shard specification {spec!r} names no shard")
    return out


def _expand_one(part: str) -> list[str]:
    if _is_remote(part):
        return list(braceexpand.braceexpand(part))
    if part.startswith("file://"):
        part = part[len("file://") :]
    path = Path(part)
    if path.is_dir():
        tars = sorted(str(p) for p in path.iterdir() if p.is_file() and _is_shard(p))
        if not tars:
            raise FileNotFoundError(f"shard directory {path} holds no .tar/.tgz shards")
        return tars
    if path.is_file() and path.suffix in (".txt", ".list"):
        found: list[str] = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entry = line if _is_remote(line) or os.path.isabs(line) else str(path.parent / line)
                found.extend(_expand_one(entry))
        if not found:
            raise FileNotFoundError(f"shard list {path} names no shard")
        return found
    names = list(braceexpand.braceexpand(part))
    found, missing = [], []
    for name in names:
        if glob.has_magic(name):
            matches = sorted(glob.glob(name))
            (found.extend(matches) if matches else missing.append(name))
        elif os.path.isfile(name):
            found.append(name)
        else:
            missing.append(name)
    if not found:
        raise FileNotFoundError(f"shard pattern {part!r} matches no file")
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(names)} shards named by {part!r} do not exist, e.g. {missing[:3]}"
        )
    return found


def shard_sizes(shards: Sequence[str]) -> dict[str, int] | None:
    """Samples per shard from the ``sizes.json`` files next to the shards (open_clip's convention:
    ``{"pairs-000000.tar": 10000, ...}``); None if any shard is not listed."""
    cache: dict[str, Mapping[str, int]] = {}
    sizes: dict[str, int] = {}
    for shard in shards:
        if _is_remote(shard):
            return None
        folder = os.path.dirname(os.path.abspath(shard))
        if folder not in cache:
            f = os.path.join(folder, SIZES_FILE)
            try:
                with open(f) as fh:
                    cache[folder] = json.load(fh)
            except (OSError, json.JSONDecodeError):
                cache[folder] = {}
        n = cache[folder].get(os.path.basename(shard))
        if n is None:
            return None
        sizes[shard] = int(n)
    return sizes


def count_samples(shards: Sequence[str], scan: bool = True, broken: list[str] | None = None) -> int | None:
    """Total samples in ``shards``: from ``sizes.json`` when present, else by listing the tars
    (reads only headers) when ``scan`` is True, else None.

    A tar that cannot be read to its end (truncated, garbage, not a tar) is a broken shard: it is
    named in a warning, its samples before the damage are counted, and it is appended to ``broken``
    when a list is given. Reading it later skips and counts its bad members (``broken_tar``).
    """
    sizes = shard_sizes(shards)
    if sizes is not None:
        return sum(sizes.values())
    if not scan or any(_is_remote(s) for s in shards):
        return None
    total = 0
    for shard in shards:
        keys: set[str | None] = set()
        try:
            size = os.path.getsize(shard)
            with tarfile.open(shard) as tf:
                for m in tf:
                    if m.offset_data + m.size > size:  # a header scan does not notice a cut member
                        raise tarfile.ReadError(f"member {m.name} ends past the end of the file")
                    if m.isreg():
                        keys.add(base_plus_ext(m.name)[0])
                if tf.offset + 2 * tarfile.BLOCKSIZE > size:  # no end-of-archive blocks: cut short
                    raise tarfile.ReadError("the file ends without the end-of-archive blocks")
        except (tarfile.TarError, EOFError, OSError) as e:
            log.warning("broken shard %s (%s: %s): counting the %d samples before the damage",
                        shard, type(e).__name__, e, len(keys - {None}))
            if broken is not None:
                broken.append(shard)
        total += len(keys - {None})
    return total


# ------------------------------------------------------------------------------------------ writing
class ShardWriter:
    """Write samples into numbered tar shards, each made atomically, plus ``sizes.json``.

    ``pattern`` holds a ``%d``-style field for the shard number, e.g. ``out/pairs-%06d.tar``. A new
    shard starts after ``maxcount`` samples or ``maxsize`` bytes. Each shard is written under a
    temporary name and renamed when complete, and members get a fixed mtime, so equal inputs give
    byte-identical shards. Sample values: ``bytes`` (written as is), ``str``, ``dict``/``list`` (JSON),
    ``int`` (``cls``), PIL images (encoded by extension).

    Args:
        pattern: output file pattern.
        maxcount: samples per shard at most.
        maxsize: bytes per shard at most (approximately: checked between samples).
        start_shard: number of the first shard.
    """

    def __init__(self, pattern: str | os.PathLike, maxcount: int = 10000, maxsize: float = 1e9, start_shard: int = 0):
        self.pattern = str(pattern)
        try:
            self.pattern % 0
        except TypeError:
            raise ValueError(f"shard pattern {self.pattern!r} needs a %d field, e.g. 'out/pairs-%06d.tar'") from None
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        self.maxcount, self.maxsize = maxcount, maxsize
        self.shard = start_shard
        self.sizes: dict[str, int] = {}
        self.paths: list[Path] = []
        self._tar: wds.TarWriter | None = None
        self._file: Any = None
        self._tmp: Path | None = None
        self._count = 0
        self._bytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def _open(self) -> None:
        final = Path(self.pattern % self.shard)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _finish/_abort across writes
        self._tar = wds.TarWriter(self._file, mtime=0, user="vlmoe", group="vlmoe", mode=0o644)
        self._count = self._bytes = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        final = Path(self.pattern % self.shard)
        os.replace(self._tmp, final)
        self.sizes[final.name] = self._count
        self.paths.append(final)
        self._tar = self._file = self._tmp = None
        self.shard += 1

    def _abort(self) -> None:
        if self._tar is not None:
            with contextlib.suppress(Exception):  # finish the tar stream so nothing writes later
                self._tar.close()
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = self._file = self._tmp = None

    def write(self, sample: Mapping[str, Any]) -> None:
        """Add one sample (a dict with ``__key__`` and one entry per extension)."""
        if "__key__" not in sample:
            raise ValueError(f"a sample needs a '__key__'; got keys {sorted(sample)}")
        if "." in sample["__key__"].split("/")[-1]:
            raise ValueError(f"sample key {sample['__key__']!r} contains a '.', which would split it")
        if self._tar is None or self._count >= self.maxcount or self._bytes >= self.maxsize:
            self._finish()
            self._open()
        obj = {k: (json.dumps(v).encode() if isinstance(v, dict | list) else v) for k, v in sample.items()}
        self._bytes += self._tar.write(obj) + 1024 * (len(obj) - 1)  # + tar headers/padding
        self._count += 1

    def close(self) -> list[Path]:
        """Finish the last shard and merge the counts into ``sizes.json`` next to the shards.

        Returns:
            The shard paths written.
        """
        self._finish()
        by_dir: dict[Path, dict[str, int]] = {}
        for p in self.paths:
            by_dir.setdefault(p.parent, {})[p.name] = self.sizes[p.name]
        for folder, sizes in by_dir.items():
            f = folder / SIZES_FILE
            merged = {}
            if f.is_file():
                try:
                    merged = json.loads(f.read_text())
                except json.JSONDecodeError:
                    merged = {}
            merged.update(sizes)
            atomic_write_json(f, dict(sorted(merged.items())), indent=1)
        return list(self.paths)


# ---------------------------------------------------------------------------- ranks, workers, shards
def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int, int]:
    """``(rank, world_size, worker, num_workers)`` of the calling process.

    Args:
        rank, world_size: explicit values (both or neither); otherwise taken from an initialised
            ``torch.distributed``, else from ``RANK`` / ``WORLD_SIZE`` in the environment.
    """
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return rank, world_size, worker, num_workers


class ShardList(IterableDataset):
    """The shards this rank and DataLoader worker read, as ``{"url": ...}`` dicts.

    Args:
        shards: shard paths / URLs (see :func:`expand_shards`).
        resampled: draw shards with replacement forever instead of one pass per epoch.
        shuffle: permute the shard order each epoch (finite mode; same permutation on all ranks).
        seed: base seed of the permutation / resampling.
        rank, world_size: override the distributed rank (tests, custom launchers).
    """

    def __init__(
        self,
        shards: Sequence[str],
        resampled: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.shards = list(shards)
        self.resampled, self.shuffle, self.seed = resampled, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self._explicit_rank = rank is not None and world_size is not None
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch used for seeding (otherwise it counts the iterations of this object).

        Called in the main process before DataLoader workers start (see
        :class:`~vlmoe.data.pretrain.EpochLoader`), it also pins the rank and world size found
        there, so workers started with "spawn" (which do not inherit an initialised process
        group) split shards by the right rank.
        """
        self.epoch = epoch - 1
        if not self._explicit_rank:
            self.rank, self.world_size = dist_info()[:2]

    def __iter__(self) -> Iterator[dict[str, str]]:
        self.epoch += 1
        rank, world, worker, workers = dist_info(self.rank, self.world_size)
        if self.resampled:
            # Each (rank, worker) draws its own sequence: no split needed, none applied.
            rng = random.Random(hash((self.seed, self.epoch, rank, worker)) & 0xFFFFFFFF)
            while True:
                yield {"url": rng.choice(self.shards)}
        order = list(self.shards)
        if self.shuffle:
            # Seeded by (seed, epoch) only, so every rank permutes identically before splitting.
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        mine = order[rank::world][worker::workers]
        yield from ({"url": url} for url in mine)


# ----------------------------------------------------------------------------------- sample stages
class _CountingReader:
    """Wraps a byte stream and counts what is read from it (tar streams of unknown length)."""

    def __init__(self, stream: Any):
        self.stream, self.count = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.count += len(data)
        return data

    def close(self) -> None:
        self.stream.close()


def _tar_members(src: Iterable[dict[str, Any]], errors: SampleErrors) -> Iterator[dict[str, Any]]:
    """Members of each opened tar, checked for truncation; a damaged shard ends with a marker that
    invalidates the sample it cut, so that sample is counted once (as ``broken_tar``) and dropped."""
    for source in src:
        url = source["url"]
        stream = _CountingReader(source["stream"])
        last_key = None
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tf:
                end = 0  # where the last member's padded data ends
                for info in tf:
                    key = base_plus_ext(info.name)[0]
                    end = info.offset_data + -(-info.size // 512) * 512
                    if not info.isreg():
                        continue
                    data = tf.extractfile(info).read()
                    last_key = key
                    if len(data) != info.size:
                        # Python's streaming tar reader returns short reads silently at EOF.
                        raise tarfile.ReadError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
                    yield {"fname": info.name, "data": data, "__url__": url}
                    tf.members = []  # streaming: do not keep every header in memory
                if tf.fileobj.comptype == "tar":
                    # A cut through a header also ends iteration silently; a complete archive has two
                    # zero blocks after the last member. (Compressed shards fail in the decompressor.)
                    while stream.read(1 << 16):
                        pass
                    if stream.count - end < 1024:
                        raise tarfile.ReadError(f"archive truncated after {stream.count} bytes (no end-of-archive)")
        except Exception as e:  # noqa: BLE001 - a damaged shard must not stop the epoch
            errors.handler("broken_tar")(type(e)(f"{url}: {e}") if isinstance(e, tarfile.TarError) else e)
            if last_key is not None:
                # group_by_keys drops a sample carrying a truthy "__bad__" entry.
                yield {"fname": f"{last_key}.__bad__", "data": b"1", "__url__": url}
        finally:
            with contextlib.suppress(Exception):
                stream.close()
        yield {}  # end-of-shard marker: samples never straddle shards


def tar_samples(src: Iterable[dict[str, str]], errors: SampleErrors) -> Iterator[dict[str, Any]]:
    """Shard URLs -> raw samples (``__key__``, ``__url__`` and bytes per extension).

    Like ``webdataset.tarfile_to_samples`` but truncated members are detected, and every problem
    (unreadable shard, truncated member, duplicate member names) is counted in ``errors``.
    """
    handler = errors.handler("broken_tar")
    streams = wds.tariterators.url_opener(src, handler=handler)
    return wds.tariterators.group_by_keys(_tar_members(streams, errors), handler=handler)


def _first(raw: Mapping[str, Any], exts: Iterable[str]) -> tuple[str | None, Any]:
    for ext in exts:
        if ext in raw:
            return ext, raw[ext]
    return None, None


def decode_samples(
    src: Iterable[dict[str, Any]], kind: str, errors: SampleErrors, draft: tuple[int, int] | None = None
) -> Iterator[dict[str, Any]]:
    """Decode raw tar samples of one stream kind, skipping and counting bad ones.

    Yields dicts with ``key``, ``url`` and, by kind, ``image`` (RGB PIL), ``text`` (stripped str),
    ``label`` (int, image stream with ``cls``).

    Args:
        src: raw samples from :func:`tar_samples` (bytes per extension).
        kind: ``"pair"``, ``"image"`` or ``"text"``.
        errors: where skipped samples are counted.
        draft: JPEG draft size hint for :func:`~vlmoe.data._io.decode_image`.
    """
    need_image, need_text = kind in ("pair", "image"), kind in ("pair", "text")
    for raw in src:
        where = f"{raw.get('__url__')}:{raw.get('__key__')}"
        out: dict[str, Any] = {"key": raw.get("__key__"), "url": raw.get("__url__")}
        try:
            if need_image:
                ext, data = _first(raw, IMAGE_EXTS)
                if data is None:
                    members = sorted(k for k in raw if not k.startswith("__"))
                    errors.count("missing_field", f"{where}: no image member ({'/'.join(IMAGE_EXTS)}), has {members}")
                    continue
                try:
                    out["image"] = decode_image(data, draft=draft)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                    errors.count("corrupt_image", f"{where}.{ext}: {e}")
                    continue
                if "cls" in raw:
                    out["label"] = int(raw["cls"].decode() if isinstance(raw["cls"], bytes) else raw["cls"])
            if need_text:
                text = raw.get("txt")
                if text is None and "json" in raw:
                    try:
                        meta = json.loads(raw["json"])
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        errors.count("bad_json", f"{where}.json: {e}")
                        continue
                    text = meta.get("caption") if isinstance(meta, dict) else None
                if text is None:
                    errors.count("missing_field", f"{where}: no txt member (nor a json caption)")
                    continue
                if isinstance(text, bytes):
                    text = text.decode("utf-8")
                text = text.strip()
                if not text:
                    errors.count("empty_text", f"{where}.txt is empty")
                    continue
                out["text"] = text
        except Exception as e:  # noqa: BLE001 - any other per-sample failure is skipped and counted
            errors.count("other", f"{where}: {type(e).__name__}: {e}")
            continue
        yield out


def apply_transform(
    src: Iterable[dict[str, Any]], transform: Callable[[Any], Any] | None, errors: SampleErrors
) -> Iterator[dict[str, Any]]:
    """Apply the image transform to each sample's ``image`` (if both exist), counting failures."""
    for sample in src:
        if transform is not None and "image" in sample:
            try:
                sample["image"] = transform(sample["image"])
            except Exception as e:  # noqa: BLE001
                errors.count("other", f"{sample.get('url')}:{sample.get('key')}: transform failed: {e}")
                continue
        yield sample


def stream_pipeline(
    shards: str | Sequence[str],
    kind: str,
    *,
    batch_size: int | None,
    collate: Callable[[list[dict[str, Any]]], Any] | None = None,
    transform: Callable[[Any], Any] | None = None,
    errors: SampleErrors | None = None,
    shuffle: int = 1000,
    resampled: bool = False,
    seed: int = 0,
    partial: bool = True,
    draft: tuple[int, int] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> wds.DataPipeline:
    """A webdataset pipeline for one stream: shards -> decoded, transformed (batched) samples.

    Args:
        shards: shard specification (expanded with :func:`expand_shards`).
        kind: ``"pair"``, ``"image"`` or ``"text"``.
        batch_size: batch this many samples with ``collate`` (None: yield single samples).
        collate: list of samples -> batch (default: the list itself).
        transform: PIL image -> tensor.
        errors: skip counter (a new one named after ``kind`` by default; read it from
            ``pipeline.errors``).
        shuffle: shuffle buffer size in samples (0: no shuffling of shards or samples).
        resampled: infinite shard resampling.
        seed: base seed for shard order and the shuffle buffer.
        partial: keep the last incomplete batch.
        draft: JPEG draft-decoding size hint.
        rank, world_size: explicit distributed position (default: detected).
    """
    if kind not in STREAM_KINDS:
        raise ValueError(f"unknown stream kind {kind!r}; choose from {STREAM_KINDS}")
    urls = expand_shards(shards)
    errors = errors or SampleErrors(name=kind)
    stages: list[Any] = [
        ShardList(urls, resampled=resampled, shuffle=shuffle > 0, seed=seed, rank=rank, world_size=world_size),
        functools.partial(tar_samples, errors=errors),
    ]
    if shuffle > 0:
        stages.append(functools.partial(_seeded_shuffle, bufsize=shuffle, seed=seed, rank=rank, world_size=world_size))
    stages.append(functools.partial(decode_samples, kind=kind, errors=errors, draft=draft))
    if transform is not None:
        stages.append(functools.partial(apply_transform, transform=transform, errors=errors))
    if batch_size is not None:
        stages.append(wds.batched(batch_size, collation_fn=collate or list, partial=partial))
    pipeline = wds.DataPipeline(*stages)
    pipeline.errors = errors
    pipeline.shards = urls
    return pipeline


def _seeded_shuffle(
    src: Iterable[Any], bufsize: int, seed: int, rank: int | None = None, world_size: int | None = None
) -> Iterator[Any]:
    """webdataset's buffer shuffle with a seed that differs per rank, worker and DataLoader run."""
    rank, _, worker, _ = dist_info(rank, world_size)
    # torch.initial_seed() differs per worker and per DataLoader iteration (a fresh base seed).
    rng = random.Random(hash((seed, rank, worker, torch.initial_seed())) & 0xFFFFFFFF)
    return wds.shuffle(bufsize=bufsize, initial=min(bufsize, 100), rng=rng)(iter(src))
