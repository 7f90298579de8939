import argparse

import pytest
import timm
import torch
import torch.nn.functional as F

from vlmoe.models import (
    VLMoEForPretraining,
    beit3_config,
    beit3_to_vlmoe,
    create_model,
    detect_format,
    load_beit3,
    load_checkpoint,
    load_timm_vit,
    read_state_dict,
    vlmoe_to_beit3,
)

HEAD_KEYS = {"mim_head.weight", "mim_head.bias", "mlm_head.weight", "mlm_head.bias", "pooler.norm.weight",
             "pooler.norm.bias", "pooler.dense.weight", "pooler.dense.bias"}


def _pretraining(name="tiny", **overrides):
    return VLMoEForPretraining(create_model(name, **overrides), codebook_size=64, pooler=True)


def _beit3_sd(perturb, name="tiny", **overrides):
    """A BEiT-3-layout state dict (``beit3.`` prefix, pretraining heads and a pooler at the top level)
    from a random pretraining model; returns ``(its backbone, the state dict, the task model)``."""
    task = perturb(_pretraining(name, **overrides)).eval()
    return task.backbone, vlmoe_to_beit3(task.state_dict()), task


def _same_outputs(a, b, **inputs):
    with torch.no_grad():
        torch.testing.assert_close(a(**inputs).hidden_states, b(**inputs).hidden_states)


def test_beit3_key_layout(perturb):
    _, sd, _ = _beit3_sd(perturb)
    assert "beit3.encoder.layers.0.self_attn.q_proj.A.weight" in sd
    assert "beit3.encoder.layers.1.ffn.B.ffn_layernorm.bias" in sd
    assert "beit3.encoder.embed_positions.A.weight" in sd and sd["beit3.encoder.embed_positions.A.weight"].shape == (
        19,
        64,
    )
    assert "mim_head.weight" in sd and "pooler.dense.weight" in sd and "mlm_head.bias" in sd
    assert detect_format(sd) == "beit3"
    conv, origin, unused = beit3_to_vlmoe(sd)
    assert set(unused) == HEAD_KEYS  # heads keep their BEiT-3 names: task models use the same ones
    assert origin["blocks.0.attn.qkv.vision.weight"] == "beit3.encoder.layers.0.self_attn.{q,k,v}_proj.A.weight"


@pytest.mark.parametrize("wrap", ["model", "module", "bare", "no_prefix"])
def test_load_beit3_layouts(perturb, tiny_batch, wrap):
    src, sd, task = _beit3_sd(perturb)
    if wrap == "no_prefix":
        sd = {k.removeprefix("beit3."): v for k, v in sd.items()}
    ckpt = {"model": sd, "epoch": 3} if wrap == "model" else {"module": sd} if wrap == "module" else sd
    model, report = load_beit3(ckpt, "tiny")  # the backbone alone: the heads are reported unused
    assert set(report.unexpected) == HEAD_KEYS and not report.missing
    image, ids, pad = tiny_batch
    _same_outputs(src, model.eval(), image=image, text_ids=ids, text_padding_mask=pad)
    full = _pretraining()  # a task model takes the heads too, under the same names
    report = load_checkpoint(full, ckpt, strict=True)
    assert report.complete and "every parameter loaded" in str(report)
    for k, v in task.state_dict().items():
        assert torch.equal(full.state_dict()[k], v), k


def test_load_beit3_infers_config(perturb):
    _, sd, _ = _beit3_sd(perturb, final_norm=False)
    cfg = beit3_config(sd)
    assert (cfg.dim, cfg.depth, cfg.mlp_dim, cfg.img_size, cfg.patch_size) == (64, 2, 128, 32, 8)
    assert cfg.vocab_size == 128 and cfg.max_text_positions == 66 and not cfg.final_norm
    assert cfg.num_heads == 1  # width / 64
    model, report = load_beit3(sd, num_heads=2)  # no warning: heads given
    assert not report.missing and model.config.num_heads == 2


def test_unused_and_missing_are_reported(perturb):
    _, sd, _ = _beit3_sd(perturb)
    sd["head.weight"] = torch.zeros(3129, 64)  # a VQA task head
    sd["fc_norm.bias"] = torch.zeros(64)
    mlm_only = VLMoEForPretraining(create_model("tiny"), codebook_size=None)  # no MIM head, no pooler
    report = load_checkpoint(mlm_only, sd)
    assert set(report.unexpected) == {"head.weight", "fc_norm.bias", "mim_head.weight", "mim_head.bias",
                                      "pooler.norm.weight", "pooler.norm.bias", "pooler.dense.weight",
                                      "pooler.dense.bias"}  # fmt: skip
    assert not report.missing and not report.complete
    del sd["beit3.encoder.layer_norm.B.weight"]
    report = load_checkpoint(mlm_only, sd)
    assert report.missing == ["backbone.norm.text.weight"]
    assert "unused checkpoint keys: 8" in str(report) and "norm.text.weight" in str(report)
    with pytest.raises(ValueError, match="strict=True"):
        load_checkpoint(mlm_only, sd, strict=True)


def test_head_of_another_shape_stays_at_init_and_is_named(perturb):
    """BEiT-3's own loader drops a head whose shape differs (another number of classes): so do we."""
    _, sd, task = _beit3_sd(perturb)
    model = VLMoEForPretraining(create_model("tiny"), codebook_size=32, pooler=True)
    before = model.mim_head.weight.detach().clone()
    report = load_checkpoint(model, sd)
    assert report.head_mismatch == ["mim_head.weight: (64, 64) in the checkpoint, (32, 64) here (left at init)",
                                    "mim_head.bias: (64,) in the checkpoint, (32,) here (left at init)"]
    assert torch.equal(model.mim_head.weight, before) and torch.equal(model.mlm_head.weight, task.mlm_head.weight)
    assert "mim_head.weight" in report.missing and report.share > 0.9


def test_positions_interpolated_for_another_image_size(perturb):
    _, sd, _ = _beit3_sd(perturb)
    model, report = load_beit3(sd, "tiny", img_size=48)
    assert any("4x4 -> 6x6" in r for r in report.resized)
    old = sd["beit3.encoder.embed_positions.A.weight"]
    new = model.vision_embed.pos_embed.weight.detach()
    torch.testing.assert_close(new[:3], old[:3])
    grid = old[3:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)  # BEiT-3's recipe
    torch.testing.assert_close(new[3:], ref.permute(0, 2, 3, 1).reshape(36, 64))
    assert model(image=torch.randn(1, 3, 48, 48)).hidden_states.shape == (1, 37, 64)


def test_text_positions_truncated_or_rejected(perturb):
    _, sd, _ = _beit3_sd(perturb)
    model, report = load_beit3(sd, "tiny", max_text_positions=20)
    assert "kept the first 20 of 66 rows" in report.resized[0]
    torch.testing.assert_close(
        model.text_embed.pos_embed.weight.detach(), sd["beit3.encoder.embed_positions.B.weight"][:20]
    )
    with pytest.raises(ValueError, match=r"embed_positions\.B\.weight.*\(66, 64\).*\(80, 64\)"):
        load_beit3(sd, "tiny", max_text_positions=80)


def test_checkpoint_of_another_shape_names_key_and_shapes(perturb):
    _, sd, _ = _beit3_sd(perturb)
    with pytest.raises(ValueError) as e:
        load_beit3(sd, "tiny", dim=32, num_heads=2)
    msg = str(e.value)
    assert "checkpoint key 'beit3." in msg and "' (-> '" in msg
    assert "64) but the model expects (" in msg and "32)" in msg
    assert "looks like dim=64, depth=2" in msg and "'tiny' with dim=32" in msg
    with pytest.raises(
        ValueError, match=r"ffn\.A\.(fc1|fc2|ffn_layernorm)\.(weight|bias)' \(-> 'blocks\.0\.mlp\.vision"
    ):
        load_beit3(sd, "tiny", mlp_dim=96)


def test_files_are_read_without_unpickling_code(perturb, tmp_path):
    src, sd, _ = _beit3_sd(perturb)
    path = tmp_path / "beit3.pth"
    # training checkpoints carry an argparse.Namespace under 'args': allowed, it holds no code
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3), "epoch": 1}, path)
    report = load_checkpoint(_pretraining(), path, strict=True)
    assert report.source == str(path)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "evil.pth"
    torch.save({"model": sd, "extra": Evil()}, bad)
    with pytest.raises(ValueError, match=r"evil\.pth: holds Python objects other than tensors \(print\)"):
        load_beit3(bad, "tiny")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_state_dict(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"not a state dict \(non-tensor entries \['epoch'\]"):
        read_state_dict({"epoch": 1, "weights": torch.zeros(1)})


def test_safetensors_file(perturb, tmp_path):
    from safetensors.torch import save_file

    src, sd, _ = _beit3_sd(perturb)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "b.safetensors")
    model = _pretraining()
    load_checkpoint(model, tmp_path / "b.safetensors", strict=True)
    _same_outputs(src, model.backbone.eval(), text_ids=torch.randint(0, 128, (2, 5)))


def test_export_to_beit3_rejects_moe():
    with pytest.raises(ValueError, match="no BEiT-3 counterpart"):
        vlmoe_to_beit3(create_model("tiny_moe").state_dict())


# ---------------------------------------------------------------------------------------------- timm
def _timm(name, perturb, **kw):
    model = timm.create_model(
        name,
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=5,
        **kw,
    )
    return perturb(model).eval()


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "beit3_base_patch16_224"])
def test_timm_vit_into_vision_branch(name, perturb):
    """A vision-only pass of the converted model equals timm's forward_features."""
    vit = _timm(name, perturb)
    assert detect_format(vit.state_dict()) == "timm"
    model, report = load_timm_vit(vit.state_dict(), num_heads=2)
    assert model.config.subln == (name.startswith("beit3"))
    assert report.missing == ["vision_embed.mask_token"]  # timm ViTs have no MIM token
    assert {"head.weight", "head.bias"} <= set(report.unexpected)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image=x).hidden_states, vit.forward_features(x), atol=1e-5, rtol=1e-5)


def test_timm_vit_unsupported_flavour_is_named(perturb):
    vit = _timm("vit_base_patch16_224", perturb, init_values=1e-5)  # layer scale
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma.*layer scale"):
        load_timm_vit(vit.state_dict(), num_heads=2)


def test_load_checkpoint_detects_vlmoe_and_timm(perturb, tiny_batch):
    src = perturb(create_model("tiny")).eval()
    dst = create_model("tiny").eval()
    report = load_checkpoint(dst, {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}})
    assert report.format == "vlmoe" and report.complete
    image, ids, pad = tiny_batch
    _same_outputs(src, dst, image=image, text_ids=ids, text_padding_mask=pad)
    with pytest.raises(ValueError, match="cannot tell the checkpoint layout"):
        load_checkpoint(dst, {"foo.weight": torch.zeros(1)})


def test_training_checkpoint_loads_every_weight(perturb, tiny_batch, tmp_path):
    """A ``vlmoe pretrain`` ``.ckpt`` (the task's state dict: the model under ``model.``) loads whole."""
    src = perturb(create_model("tiny_moe")).eval()
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in src.state_dict().items()},
        "pytorch-lightning_version": "2.6.6",
        "vlmoe_config": src.config.to_dict(),
        "global_step": 7,
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    dst = create_model("tiny_moe").eval()
    report = load_checkpoint(dst, path)
    assert report.complete and report.share == 1.0, str(report)
    image, ids, pad = tiny_batch
    _same_outputs(src, dst, image=image, text_ids=ids, text_padding_mask=pad)


def test_a_load_that_matches_too_little_is_an_error(perturb):
    """Keys of another model or layout used to load 0 of N tensors and leave the model at random init."""
    src = perturb(create_model("tiny"))
    sd = {(f"encoder.{k}" if ".mlp." in k or ".attn." in k else k): v for k, v in src.state_dict().items()}
    dst = create_model("tiny")
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"provides only \d+\.\d% of the model's weights.*allow_partial=True"):
        load_checkpoint(dst, sd)
    report = load_checkpoint(dst, sd, allow_partial=True)  # on purpose: the embeddings and norms only
    assert 0 < report.share < 0.5 and report.missing
    assert torch.equal(dst.state_dict()["vision_embed.cls_token"], src.state_dict()["vision_embed.cls_token"])
    assert torch.equal(dst.state_dict()["blocks.0.attn.qkv.vision.weight"], before["blocks.0.attn.qkv.vision.weight"])


def test_unreadable_files_get_one_clear_line(tmp_path):
    junk = tmp_path / "weights.pth"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=r"weights\.pth: not a checkpoint or corrupt") as err:
        read_state_dict(junk)
    assert "weights_only=False" not in str(err.value)  # never the advice to unpickle code
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file or corrupt"):
        read_state_dict(bad)

    torch.save({"w": torch.zeros(1), "obj": argparse.ArgumentParser}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"holds Python objects other than tensors \(argparse\.ArgumentParser\)"):
        read_state_dict(tmp_path / "pickled.pt")
