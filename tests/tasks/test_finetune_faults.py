"""Finetuning data under faults: resumed epochs keep their size, ground truth follows its source, a
vocabulary or split that leaves nothing to train on is an error, unreadable training images are
skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmoe.tasks.finetune.base import _EpochSampler
from vlmoe.tasks.finetune.captioning import CaptioningDataModule


@pytest.mark.parametrize("n, world", [(10, 1), (10, 2), (11, 2), (7, 3)])
def test_epoch_sampler_shares_cover_the_epoch_and_keep_their_length_after_a_skip(n, world) -> None:
    shares = [_EpochSampler(n, True, seed=5, num_replicas=world, rank=r) for r in range(world)]
    for s in shares:
        s.set_epoch(2)
    got = [list(s) for s in shares]
    assert {len(g) for g in got} == {-(-n // world)} and set().union(*got) == set(range(n))
    # the first epoch of a resumed run skips what this rank trained on; its length stays the epoch's
    resumed = _EpochSampler(n, True, seed=5, skip=2, num_replicas=world, rank=world - 1)
    resumed.set_epoch(2)
    assert list(resumed) == got[-1][2:] and len(resumed) == len(got[-1])
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(resumed)  # the next epoch is whole


def _karpathy(path, captions: list[str]) -> None:
    images = [{"split": "test", "filepath": "val2014", "filename": f"{i}.jpg", "cocoid": i,
               "sentences": [{"raw": c}]} for i, c in enumerate(captions)]
    path.write_text(json.dumps({"images": images}))


def test_caption_ground_truth_follows_the_karpathy_file_and_never_overwrites_the_users(tmp_path) -> None:
    karpathy = tmp_path / "dataset_coco.json"
    _karpathy(karpathy, ["a red circle", "a blue square"])
    first = CaptioningDataModule(karpathy=str(karpathy), image_root=str(tmp_path), tokenizer=None).ground_truth("test")
    _karpathy(karpathy, ["a green circle", "a blue square"])  # the split file changes
    again = CaptioningDataModule(karpathy=str(karpathy), image_root=str(tmp_path), tokenizer=None).ground_truth("test")
    assert again == first
    refs = [a["caption"] for a in json.loads(Path(again).read_text())["annotations"]]
    assert refs == ["a green circle", "a blue square"]
    # a file of the user's under that name: an error naming it, the file left as it is
    user = {"info": {"description": "my references"}, "images": [], "annotations": []}
    Path(first).write_text(json.dumps(user))
    with pytest.raises(ValueError, match=r"coco_karpathy_test_gt\.json: differs from the 'test' split"):
        CaptioningDataModule(karpathy=str(karpathy), image_root=str(tmp_path), tokenizer=None).ground_truth("test")
    assert json.loads(Path(first).read_text()) == user
