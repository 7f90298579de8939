"""The evaluator protocol: ``reset / update / compute`` over one evaluation set, each sample once.

Under data parallelism every rank sees part of the set, and samplers pad the last batches with
duplicates so that all ranks take the same number of steps. An evaluator therefore keeps its
records keyed by the sample's id (question id, NLVR2 identifier, image id, ...): a record seen again
is ignored, :meth:`Evaluator.gather` merges the records of every rank (ignoring duplicates again),
and :meth:`Evaluator.compute` scores the union, so a metric equals the single-process metric on the
same model whatever the world size.

    ev = VQAEvaluator(annotations)               # a subclass
    ev.update([{"question_id": 1, "answer": "2"}, ...])    # every rank, every batch
    ev.gather()                                  # every rank (a collective under torch.distributed)
    ev.compute()                                 # {"accuracy": ..., ...}

Pure Python: records are plain data (ids, strings, numbers); torch is imported only to gather.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
from typing import Any

__all__ = ["Evaluator", "all_gather_objects"]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (``torch.distributed.all_gather_object``), or ``[obj]`` outside it."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return [obj]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Evaluator(ABC):
    """Base of vlmoe's evaluators.

    Subclasses set :attr:`id_key` (the record field that identifies a sample) and implement
    :meth:`compute` over :attr:`records`; they may override :meth:`check` to validate a record.
    """

    id_key: str = "id"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every record (start a new evaluation pass)."""
        self._records: dict[Hashable, dict[str, Any]] = {}
        self.duplicates = 0

    def key(self, record: dict[str, Any]) -> Hashable:
        """The sample id of ``record``."""
        try:
            return record[self.id_key]
        except KeyError:
            name = type(self).__name__
            raise KeyError(f"{name}: a record has no {self.id_key!r}; it has {sorted(record)}") from None

    def check(self, record: dict[str, Any]) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Validate one record (raise ``ValueError`` naming the id and the field)."""

    def update(self, records: Iterable[dict[str, Any]]) -> None:
        """Add records; one already seen (same id: a sampler's padding duplicate) is ignored."""
        for r in records:
            k = self.key(r)
            if k in self._records:
                self.duplicates += 1
                continue
            self.check(r)
            self._records[k] = r

    def gather(self, all_gather: Callable[[Any], list[Any]] | None = None) -> None:
        """Merge the records of every rank into every rank (dropping duplicates across ranks).

        Args:
            all_gather: ``obj -> [obj of rank 0, obj of rank 1, ...]``; default
                :func:`all_gather_objects` (``torch.distributed``, a no-op in one process).
        """
        parts = (all_gather or all_gather_objects)(list(self._records.values()))
        if len(parts) == 1:
            return
        self.reset()
        for part in parts:
            self.update(part)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records, one per sample id, in id order (ids of one type sort; others keep arrival order)."""
        try:
            return [self._records[k] for k in sorted(self._records)]
        except TypeError:
            return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metrics over :attr:`records` (call :meth:`gather` first under data parallelism)."""
