"""Counting bad samples: skip, count, log at a bounded rate, never sleep.

Web-scale shards always hold some corrupt images, empty captions or truncated tar members. A data
pipeline should drop them, keep going, and let the user see how many were dropped and why.
webdataset's stock ``warn_and_continue`` sleeps 0.5 s after every error, which turns a noisy shard
into minutes of idle workers; :class:`SampleErrors` replaces it.

Counts live in shared memory created in the process that builds the pipeline, so the DataLoader's
worker processes (forked or spawned) add to the same counters and the main process (a Lightning
callback, a progress bar) can read the totals with :meth:`SampleErrors.as_dict`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import tarfile
from collections.abc import Callable
from multiprocessing.context import get_spawning_popen
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from vlmoe.data._io import DataFormatError

__all__ = ["CATEGORIES", "SampleErrors", "SkipUnreadable"]

log = logging.getLogger("vlmoe.data")

# Why a sample was dropped. A fixed tuple so the counters fit one shared array.
CATEGORIES: tuple[str, ...] = (
    "corrupt_image",  # undecodable or truncated image bytes
    "empty_text",  # caption missing or only whitespace
    "missing_field",  # the sample lacks a member its stream needs (e.g. no image in a pair)
    "bad_json",  # unparsable key.json metadata
    "broken_tar",  # truncated/corrupt tar member or shard, duplicate member names
    "other",  # anything else raised while preparing a sample
    "missing_image",  # an image file a record names is not there
)


class SampleErrors:
    """Shared counters of skipped samples, with rate-limited log messages.

    Args:
        name: a label for the messages (e.g. the stream name).
        log_first: log each of the first ``log_first`` errors of a process individually.
        log_every: afterwards, log a summary every ``log_every`` errors.
        shared: keep the counters in shared memory (visible across DataLoader workers).
    """

    def __init__(self, name: str = "data", log_first: int = 10, log_every: int = 1000, shared: bool = True):
        self.name = name
        self.log_first = log_first
        self.log_every = log_every
        self._shared = shared
        self._counts: Any = mp.Array("q", len(CATEGORIES), lock=True) if shared else [0] * len(CATEGORIES)
        self._seen_here = 0  # errors seen by this process (drives the log rate limit)

    # -- pickling: shared memory can only travel to a process that is being started ---------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._shared and get_spawning_popen() is None:
            # Pickled for some other reason (deepcopy, a checkpoint): keep a private snapshot.
            state["_counts"] = list(self._counts[:])
            state["_shared"] = False
        return state

    # -- counting ----------------------------------------------------------------------------------
    def count(self, category: str, message: str = "") -> None:
        """Record one skipped sample of ``category`` and log it (rate-limited).

        Args:
            category: one of :data:`CATEGORIES`.
            message: what went wrong and where (shard, key).
        """
        idx = CATEGORIES.index(category) if category in CATEGORIES else CATEGORIES.index("other")
        if self._shared:
            with self._counts.get_lock():
                self._counts[idx] += 1
        else:
            self._counts[idx] += 1
        self._seen_here += 1
        n = self._seen_here
        if n <= self.log_first:
            log.warning("[%s] skipped a sample (%s): %s", self.name, category, message)
            if n == self.log_first:
                log.warning("[%s] further skipped samples are summarised every %d", self.name, self.log_every)
        elif n % self.log_every == 0:
            log.warning("[%s] %s", self.name, self.summary())

    def handler(self, default_category: str = "broken_tar") -> Callable[[BaseException], bool]:
        """An exception handler for webdataset stages: count, log, continue (no sleep).

        Args:
            default_category: the category for exceptions not recognised as tar damage.
        """

        def handle(exn: BaseException) -> bool:
            if isinstance(exn, tarfile.TarError | EOFError) or "duplicate file name" in str(exn):
                category = "broken_tar"
            else:
                category = default_category
            self.count(category, f"{type(exn).__name__}: {exn}")
            return True

        return handle

    # -- reading -----------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, int]:
        """Counts per category (all categories, zeros included)."""
        return dict(zip(CATEGORIES, (int(c) for c in self._counts[:])))

    @property
    def total(self) -> int:
        """All skipped samples so far."""
        return sum(self.as_dict().values())

    def summary(self) -> str:
        """One line such as ``"skipped 3 samples: corrupt_image=2, empty_text=1"``."""
        nonzero = {k: v for k, v in self.as_dict().items() if v}
        detail = ", ".join(f"{k}={v}" for k, v in nonzero.items()) or "none"
        return f"skipped {sum(nonzero.values())} samples: {detail}"

    def reset(self) -> None:
        """Zero the counters."""
        for i in range(len(CATEGORIES)):
            self._counts[i] = 0
        self._seen_here = 0


class SkipUnreadable(Dataset):
    """A map-style training set whose unreadable samples are skipped and counted.

    A sample whose image is missing, undecodable (a 0-byte or truncated file, a text file named
    ``.jpg``) or over PIL's decompression-bomb limit is counted in ``errors`` and replaced by the next
    readable sample of the split, so batches keep their size and the epoch its length; each process
    (a DataLoader worker) counts a sample once and does not read it again. Past ``limit``
    skipped samples in a run the next one is an error (a wrong image folder should not train on the
    few images that happen to be there). Evaluation sets are not wrapped: a metric over part of a
    split would not be the split's metric.

    Args:
        data: the dataset.
        errors: the counters (shared with the DataLoader workers).
        limit: skipped samples allowed per run.
    """

    UNREADABLE = (OSError, Image.DecompressionBombError)

    def __init__(self, data: Any, errors: SampleErrors, limit: int) -> None:
        self.data, self.errors, self.limit = data, errors, limit
        self._unreadable: set[int] = set()  # found by this process: counted once, not read again

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        n = len(self.data)
        for k in range(n):
            j = (index + k) % n
            if j in self._unreadable:
                continue
            try:
                return self.data[j]
            except self.UNREADABLE as e:
                self._unreadable.add(j)
                category = "missing_image" if isinstance(e, FileNotFoundError) else "corrupt_image"
                self.errors.count(category, str(e))
                if self.errors.total > self.limit:
                    counts = ", ".join(f"{c}={v}" for c, v in self.errors.as_dict().items() if v)
                    raise DataFormatError(
                        f"{self.errors.name}: more than data.max_skipped_samples={self.limit} unreadable samples "
                        f"({counts}); the last: {e}"
                    ) from None
        raise DataFormatError(f"{self.errors.name}: no readable sample in the split")
