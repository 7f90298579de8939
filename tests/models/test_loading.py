"""One loader for every checkpoint kind (``vlmoe.models.load``): each gives the model it holds with its
weights, reading the file once; ``hf-hub:`` names an export folder in the Hugging Face Hub cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.utils import TOK, export_tiny_model
from vlmoe.models import create_model, export_beit3, load, read_source


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _training_checkpoint(model, path: Path, preprocess: dict) -> Path:
    """What ``vlmoe finetune`` writes: Lightning's keys, the task model under ``model.``, vlmoe's description."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "pytorch-lightning_version": "2.6.0", "vlmoe_config": model.config.to_dict(),
                "vlmoe_task": model.task_config(), "vlmoe_preprocess": preprocess}, path)
    return path


def test_every_kind_loads_the_model_it_holds(tmp_path) -> None:
    folder = export_tiny_model(tmp_path, "vqa")
    model, report, pre = load(folder)
    assert model.task == "vqa" and model.answers == ["red", "blue", "yes", "no"] and report.complete
    assert pre["image_size"] == 32 and pre["tokenizer"] == "clip"
    assert read_source(folder).kind == "export" and read_source(folder / "model.safetensors").kind == "export"

    ckpt = _training_checkpoint(model, tmp_path / "last.ckpt", pre)
    again, report, pre2 = load(ckpt)
    assert read_source(ckpt).kind == "training" and report.complete and pre2 == pre
    _same(model, again)

    dense = create_model("tiny", vocab_size=TOK.vocab_size, img_size=32)
    export_beit3(dense, tmp_path / "beit3.pth")
    src = read_source(tmp_path / "beit3.pth")
    assert src.kind == "beit3" and src.config.dim == 64 and src.task is None
    back, report, pre3 = load(tmp_path / "beit3.pth", num_heads=dense.config.num_heads)
    assert pre3 is None and report.complete and back.config.depth == 2
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(image=x).hidden_states, dense.eval()(image=x).hidden_states)
    # the same file upcycled into an MoE preset: the config given replaces the one read off the tensors
    moe, report, _ = load(tmp_path / "beit3.pth", "tiny_moe", vocab_size=TOK.vocab_size, img_size=32)
    assert moe.config.moe is not None and report.share == 1.0

    torch.save(dense.state_dict(), tmp_path / "bare.pth")
    assert read_source(tmp_path / "bare.pth").kind == "vlmoe"
    with pytest.raises(ValueError, match="bare vlmoe state dict carries no architecture; give a config"):
        load(tmp_path / "bare.pth")
    bare, report, _ = load(tmp_path / "bare.pth", "tiny", vocab_size=TOK.vocab_size, img_size=32)
    assert report.complete
    _same(bare, dense)


def test_a_finetune_reads_its_starting_checkpoint_once(tmp_path, monkeypatch) -> None:
    import vlmoe.models.loading as loading
    from vlmoe.tasks.finetune import VQATask

    folder = export_tiny_model(tmp_path, "vqa")
    model, _, pre = load(folder)
    ckpt = _training_checkpoint(model, tmp_path / "last.ckpt", pre)
    reads = []
    real = loading.torch_load
    monkeypatch.setattr(loading, "torch_load", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    task = VQATask(answers=["red", "blue", "yes", "no"], init_checkpoint=str(ckpt), vocab_size=TOK.vocab_size)
    assert reads == [ckpt]
    _same(task.model.backbone.blocks, model.backbone.blocks)  # (VQA drops the final norm, as BEiT-3)


def _hub_cache(root: Path, repo: str, folder: Path) -> str:
    """A Hugging Face Hub cache holding ``folder`` as the snapshot of ``repo`` at ``main`` (the layout
    huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/<commit>/...})."""
    commit = "0" * 40
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return commit


def test_hf_hub_names_an_export_folder_in_the_hub_cache(tmp_path, monkeypatch) -> None:
    import vlmoe

    folder = export_tiny_model(tmp_path, "caption")
    cache = tmp_path / "hub"
    _hub_cache(cache, "vlmoe-org/tiny-caption", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    model, report, pre = load("hf-hub:vlmoe-org/tiny-caption")
    local, _, local_pre = load(folder)
    assert model.task == "captioning" and report.complete and pre == local_pre and pre["image_size"] == 32
    _same(model, local)
    predictor = vlmoe.load("hf-hub:vlmoe-org/tiny-caption")
    assert predictor.task == "captioning"
    with pytest.raises(FileNotFoundError, match="hf-hub:vlmoe-org/missing: cannot fetch it from the Hugging Face Hub"):
        load("hf-hub:vlmoe-org/missing")
    with pytest.raises(ValueError, match="expected hf-hub:ORG/NAME"):
        load("hf-hub:no-slash")
