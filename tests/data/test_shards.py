"""Shards: write -> read round trips, bad samples skipped and counted, rank x worker splitting."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.utils import easy_vqa_pngs, to_jpeg
from vlmoe.data.errors import SampleErrors
from vlmoe.data.shards import ShardList, ShardWriter, count_samples, expand_shards, stream_pipeline


def _write_pairs(folder: Path, n: int, maxcount: int) -> list[dict]:
    pngs = easy_vqa_pngs(n)
    samples = [
        {"__key__": f"{i:09d}", "jpg": to_jpeg(p), "txt": f"caption number {i}", "json": {"i": i}}
        for i, p in enumerate(pngs)
    ]
    with ShardWriter(folder / "pairs-%06d.tar", maxcount=maxcount) as sink:
        for s in samples:
            sink.write(s)
    return samples


def test_write_read_round_trip(tmp_path: Path) -> None:
    samples = _write_pairs(tmp_path, 10, maxcount=4)
    shards = expand_shards(str(tmp_path / "pairs-{000000..000002}.tar"))
    assert [Path(s).name for s in shards] == ["pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "pairs-000000.tar": 4,
        "pairs-000001.tar": 4,
        "pairs-000002.tar": 2,
    }
    assert count_samples(shards) == 10
    (tmp_path / "sizes.json").unlink()
    assert count_samples(shards) == 10  # by listing the tars
    out = list(stream_pipeline(shards, "pair", batch_size=None, shuffle=0))
    assert [o["key"] for o in out] == [s["__key__"] for s in samples]
    for o, s in zip(out, samples):
        assert o["text"] == s["txt"]
        ref = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        assert np.array_equal(np.asarray(o["image"]), np.asarray(ref))
    # Raw members are byte-identical too.
    with tarfile.open(shards[0]) as tf:
        assert tf.extractfile("000000001.jpg").read() == samples[1]["jpg"]
        assert json.loads(tf.extractfile("000000001.json").read()) == {"i": 1}
        assert all(m.mtime == 0 for m in tf.getmembers())


def test_writer_is_deterministic_and_atomic(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "a", 5, maxcount=10)
    _write_pairs(tmp_path / "b", 5, maxcount=10)
    assert (tmp_path / "a/pairs-000000.tar").read_bytes() == (tmp_path / "b/pairs-000000.tar").read_bytes()
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "c/x-%06d.tar") as sink:
        sink.write({"__key__": "0", "txt": "a"})
        raise RuntimeError("interrupted")
    assert list((tmp_path / "c").iterdir()) == []  # no half-written shard left behind
    with pytest.raises(ValueError, match="%d"):
        ShardWriter(tmp_path / "no-pattern.tar")


def test_expand_shards_forms_and_errors(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "d", 6, maxcount=2)
    d = tmp_path / "d"
    expected = [str(d / f"pairs-{i:06d}.tar") for i in range(3)]
    assert expand_shards(d) == expected
    assert expand_shards(str(d / "pairs-*.tar")) == expected
    assert expand_shards(f"{d}/pairs-000000.tar::{d}/pairs-{{000001..000002}}.tar") == expected
    (tmp_path / "list.txt").write_text("d/pairs-000002.tar\n# comment\nd/pairs-000000.tar\n")
    assert expand_shards(tmp_path / "list.txt") == [expected[2], expected[0]]
    assert expand_shards("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_shards(str(tmp_path / "nothing-{000000..000009}.tar"))
    with pytest.raises(FileNotFoundError, match="2 of 5 shards"):
        expand_shards(str(d / "pairs-{000000..000004}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        expand_shards(tmp_path / "empty")


def _bad_shard(path: Path) -> dict[str, int]:
    """A shard with 6 good pairs and one bad sample of each kind; returns the expected counts."""
    pngs = easy_vqa_pngs(8)
    good = [to_jpeg(p) for p in pngs]
    garbage = b"\xff\xd8\xff\xe0 this is not a jpeg"
    with tarfile.open(path, "w") as tf:

        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        for i in range(3):
            add(f"good{i}.jpg", good[i])
            add(f"good{i}.txt", b"a caption")
        add("trunc.jpg", good[3][: len(good[3]) // 2])  # truncated image
        add("trunc.txt", b"a caption")
        add("garbage.jpg", garbage)  # corrupt image
        add("garbage.txt", b"a caption")
        add("empty.jpg", good[4])
        add("empty.txt", b"  \n")  # empty caption
        add("notext.jpg", good[5])  # no caption at all
        add("badjson.jpg", good[6])
        add("badjson.json", b"{not json")  # no txt, unparsable json
        for i in range(3, 6):
            add(f"good{i}.jpg", good[7])
            add(f"good{i}.txt", b"another caption")
    return {"corrupt_image": 2, "empty_text": 1, "missing_field": 1, "bad_json": 1}


def test_bad_samples_skipped_and_counted_without_sleeping(tmp_path: Path, caplog) -> None:
    expected = _bad_shard(tmp_path / "bad-000000.tar")
    errors = SampleErrors(name="test", log_first=3)
    pipe = stream_pipeline(str(tmp_path / "bad-000000.tar"), "pair", batch_size=None, shuffle=0, errors=errors)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="vlmoe.data"):
        out = list(pipe)
    elapsed = time.perf_counter() - start
    assert [o["key"] for o in out] == [f"good{i}" for i in range(6)]
    assert errors.as_dict() == {**dict.fromkeys(errors.as_dict(), 0), **expected}
    assert errors.total == 5 and errors.summary().startswith("skipped 5 samples: corrupt_image=2")
    assert sum("skipped a sample" in r.message for r in caplog.records) == 3  # rate-limited log
    assert elapsed < 2.0  # webdataset's warn handler sleeps 0.5 s per error


def test_truncated_shard_keeps_what_precedes_the_cut(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "t", 6, maxcount=10)
    blob = (tmp_path / "t/pairs-000000.tar").read_bytes()
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(blob[: len(blob) // 2 + 100])  # the tar stream ends inside a member
    _write_pairs(tmp_path / "ok", 2, maxcount=10)
    errors = SampleErrors(name="test")
    shards = [str(cut), str(tmp_path / "ok/pairs-000000.tar")]
    out = list(stream_pipeline(shards, "pair", batch_size=None, shuffle=0, errors=errors))
    keys = [o["key"] for o in out]
    counts = errors.as_dict()
    assert counts["broken_tar"] >= 1
    # Whole samples before the cut survive; the one cut in half is dropped (broken or incomplete);
    # the next shard is read normally.
    assert keys[-2:] == ["000000000", "000000001"] and 1 <= len(keys) - 2 <= 3
    assert counts["corrupt_image"] + counts["missing_field"] + counts["broken_tar"] >= 1


def test_counting_samples_survives_broken_shards(tmp_path: Path, caplog) -> None:
    """Shards without sizes.json (img2dataset output, hand-copied tars): a truncated or garbage tar is
    named and counted as broken, not a crash naming no file."""
    _write_pairs(tmp_path / "t", 6, maxcount=10)
    blob = (tmp_path / "t/pairs-000000.tar").read_bytes()
    folder = tmp_path / "copied"
    folder.mkdir()
    (folder / "a-000000.tar").write_bytes(blob)
    (folder / "a-000001.tar").write_bytes(blob[: len(blob) // 2 + 100])  # truncated
    (folder / "a-000002.tar").write_bytes(b"this is not a tar file at all" * 40)  # garbage
    shards = expand_shards(folder)
    broken: list[str] = []
    with caplog.at_level(logging.WARNING, logger="vlmoe.data"):
        n = count_samples(shards, broken=broken)
    assert broken == [str(folder / "a-000001.tar"), str(folder / "a-000002.tar")]
    assert 6 + 1 <= n <= 6 + 4  # all of the good shard, the keys before the cut of the truncated one
    assert "broken shard" in caplog.text and "a-000002.tar" in caplog.text


def test_error_counts_cross_worker_processes(tmp_path: Path) -> None:
    for i in range(2):
        _bad_shard(tmp_path / f"bad-{i:06d}.tar")
    errors = SampleErrors(name="workers", log_first=0)
    pipe = stream_pipeline(
        str(tmp_path / "bad-{000000..000001}.tar"), "pair", batch_size=None, shuffle=0, errors=errors
    )
    loader = DataLoader(pipe, batch_size=None, num_workers=2, collate_fn=lambda x: x)
    assert len(list(loader)) == 12
    assert errors.as_dict()["corrupt_image"] == 4  # both workers' counts reach the main process


def _keys_seen(shards: list[str], rank: int, world: int, workers: int, epoch: int = 0) -> list[str]:
    pipe = stream_pipeline(shards, "text", batch_size=None, shuffle=100, rank=rank, world_size=world, seed=7)
    pipe.pipeline[0].set_epoch(epoch)
    loader = DataLoader(pipe, batch_size=None, num_workers=workers, collate_fn=lambda x: x)
    return [s["key"] for s in loader]


def test_each_sample_once_per_epoch_across_ranks_and_workers(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "texts-%06d.tar", maxcount=10) as sink:
        for i in range(83):  # 9 shards, the last one short: uneven on purpose
            sink.write({"__key__": f"{i:09d}", "txt": f"text {i}"})
    shards = expand_shards(tmp_path)
    everything = sorted(f"{i:09d}" for i in range(83))
    for epoch in (0, 1):
        per_rank = [_keys_seen(shards, rank, 2, 2, epoch) for rank in (0, 1)]
        seen = per_rank[0] + per_rank[1]
        assert sorted(seen) == everything  # exactly once: no sample missing, none twice
        assert set(per_rank[0]).isdisjoint(per_rank[1])
    # The shard order is reshuffled between epochs, identically on every rank.
    lists = [ShardList(shards, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for sl in lists:
        sl.set_epoch(0)
    a0 = [u["url"] for u in lists[0]] + [u["url"] for u in lists[1]]
    for sl in lists:
        sl.set_epoch(1)
    a1 = [u["url"] for u in lists[0]] + [u["url"] for u in lists[1]]
    assert sorted(a0) == sorted(a1) == sorted(shards) and a0 != a1


def test_rank_from_environment(tmp_path: Path, monkeypatch) -> None:
    with ShardWriter(tmp_path / "texts-%06d.tar", maxcount=1) as sink:
        for i in range(4):
            sink.write({"__key__": f"{i:09d}", "txt": f"text {i}"})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    got = [s["key"] for s in stream_pipeline(str(tmp_path), "text", batch_size=None, shuffle=0)]
    assert len(got) == 2


def test_resampled_is_infinite_and_needs_no_node_splitter(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "texts-%06d.tar", maxcount=2) as sink:
        for i in range(4):
            sink.write({"__key__": f"{i:09d}", "txt": f"text {i}"})
    pipe = stream_pipeline(str(tmp_path), "text", batch_size=3, resampled=True, shuffle=10, rank=1, world_size=4)
    it = iter(pipe)
    batches = [next(it) for _ in range(20)]  # more than one pass over 4 samples
    assert all(len(b) == 3 for b in batches)
    assert {s["key"] for b in batches for s in b} == {f"{i:09d}" for i in range(4)}


def test_image_stream_reads_cls_and_batches_with_collate(tmp_path: Path) -> None:
    pngs = easy_vqa_pngs(5)
    with ShardWriter(tmp_path / "images-%06d.tar") as sink:
        for i, p in enumerate(pngs):
            sink.write({"__key__": f"{i:09d}", "png": p, "cls": i % 3})
    pipe = stream_pipeline(
        str(tmp_path),
        "image",
        batch_size=2,
        shuffle=0,
        transform=lambda im: torch.zeros(3, 8, 8),
        collate=lambda s: ([x["label"] for x in s], torch.stack([x["image"] for x in s])),
    )
    batches = list(pipe)
    assert [b[0] for b in batches] == [[0, 1], [2, 0], [1]]  # partial last batch kept
    assert batches[0][1].shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="stream kind"):
        stream_pipeline(str(tmp_path), "video", batch_size=1)
