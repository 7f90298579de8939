"""The evaluator protocol: one record per sample id, merged across ranks without double counting."""

from __future__ import annotations

import pytest

from vlmoe.metrics import Evaluator


class Accuracy(Evaluator):
    id_key = "qid"

    def check(self, record):
        if record["pred"] not in (0, 1):
            raise ValueError(f"qid {record['qid']}: pred must be 0 or 1, got {record['pred']!r}")

    def compute(self):
        recs = self.records
        return {"accuracy": sum(r["pred"] == r["gold"] for r in recs) / len(recs), "n": float(len(recs))}


def _records(ids, wrong=()):
    return [{"qid": i, "pred": int(i not in wrong), "gold": 1} for i in ids]


def test_duplicates_count_once() -> None:
    ev = Accuracy()
    ev.update(_records([1, 2, 3], wrong=[3]))
    ev.update(_records([3, 1]))  # a padding duplicate of a seen sample (whatever its prediction)
    assert len(ev) == 3 and ev.duplicates == 2
    assert ev.compute() == {"accuracy": 2 / 3, "n": 3.0}
    ev.reset()
    assert len(ev) == 0


def test_gather_merges_ranks_like_one_process() -> None:
    """Two ranks of a padded sampler (7 samples over 2 ranks: rank 1 repeats sample 0)."""
    rank0, rank1 = Accuracy(), Accuracy()
    rank0.update(_records([0, 2, 4, 6], wrong=[4]))
    rank1.update(_records([1, 3, 5, 0], wrong=[1]))
    world = [list(rank0._records.values()), list(rank1._records.values())]
    for ev in (rank0, rank1):
        ev.gather(lambda _obj: world)
    one = Accuracy()
    one.update(_records(range(7), wrong=[1, 4]))
    assert rank0.compute() == rank1.compute() == one.compute() == {"accuracy": 5 / 7, "n": 7.0}


def test_bad_records_name_the_sample() -> None:
    ev = Accuracy()
    with pytest.raises(ValueError, match="qid 7: pred must be 0 or 1"):
        ev.update([{"qid": 7, "pred": 3, "gold": 1}])
    with pytest.raises(KeyError, match="a record has no 'qid'"):
        ev.update([{"question": 7}])
