"""Atomic checkpoint writes: a failed write leaves the previous file whole and no temporary behind."""

from __future__ import annotations

import pytest
import torch

from vlmoe.tasks import AtomicCheckpointIO


def test_atomic_write_replaces_or_keeps(tmp_path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "ck" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # a normal file mode, not mkstemp's

    real_save = torch.save

    def dies_halfway(obj, f, *a, **k):
        f.write(b"partial bytes")  # some bytes reach the temporary file, then the writer dies
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint, intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3
