"""MIM targets: pixel normalisation, the VQ-KD tokenizer against a hand-written ViT, teacher features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.utils import trainer
from vlmoe.tasks import PixelTarget, TeacherTarget, VQKDTarget, VQKDTokenizer, patchify

TINY_VQKD = dict(img_size=32, patch_size=8, dim=32, depth=2, num_heads=2, mlp_ratio=2.0, code_dim=8, num_codes=16)


def test_patchify_matches_the_model_patch_order() -> None:
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(img, 2)  # (2, 4, 12)
    assert p.shape == (2, 4, 12)
    # patch 1 is the top-right 2x2 block (row-major, as the conv patch embedding orders tokens)
    assert torch.equal(p[0, 1].reshape(2, 2, 3).permute(2, 0, 1), img[0, :, 0:2, 2:4])
    # the conv patch embedding with a one-hot kernel reads the same values in the same order
    w = torch.zeros(12, 3, 2, 2)
    for i, (r, c, ch) in enumerate((r, c, ch) for r in range(2) for c in range(2) for ch in range(3)):
        w[i, ch, r, c] = 1
    conv = F.conv2d(img, w, stride=2).flatten(2).transpose(1, 2)
    assert torch.equal(conv, p)


def test_pixel_target_is_normalised_per_patch_and_flat_patches_stay_finite() -> None:
    img = torch.randn(2, 3, 16, 16) * 3 + 1
    img[1] = 0.25  # a flat image: zero variance in every patch
    t = PixelTarget()(img, 8, "inception")
    assert t.shape == (2, 4, 192)
    assert torch.allclose(t[0].mean(-1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(t[0].var(-1, unbiased=False), torch.ones(4), atol=1e-3)
    assert torch.isfinite(t).all() and t[1].abs().max() == 0
    assert PixelTarget().out_dim(8, 3) == 192


def _released_layout(tok: VQKDTokenizer) -> dict[str, torch.Tensor]:
    """The state dict as BEiT v2 releases it: the tokenizer plus decoder / EMA entries."""
    sd = {k: v.clone() for k, v in tok.state_dict().items()}
    n, c = tok.num_codes, tok.code_dim
    sd.update({
        "quantize.embedding.cluster_size": torch.rand(n),
        "quantize.embedding.embed_avg": torch.randn(n, c),
        "quantize.embedding.initted": torch.tensor([1.0]),
        "quantize.cluster_size": torch.rand(n),
        "decoder.blocks.0.attn.qkv.weight": torch.randn(3 * 32, 32),
        "decode_task_layer.0.weight": torch.randn(32, 32),
    })
    return sd


def _reference_tokens(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """The tokenizer's encoder + codebook lookup written out with plain tensor ops."""
    g = lambda k: sd[f"encoder.{k}"]  # noqa: E731
    t = F.conv2d(x, g("patch_embed.proj.weight"), g("patch_embed.proj.bias"), stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([g("cls_token").expand(x.shape[0], -1, -1), t], 1) + g("pos_embed")
    D = t.shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
    for i in range(depth):
        b = lambda k, i=i: g(f"blocks.{i}.{k}")  # noqa: E731
        h = F.layer_norm(t, (D,), b("norm1.weight"), b("norm1.bias"), 1e-6)
        bias = torch.cat([b("attn.q_bias"), torch.zeros(D), b("attn.v_bias")])
        q, k, v = (h @ b("attn.qkv.weight").t() + bias).chunk(3, dim=-1)
        split = lambda z: z.reshape(z.shape[0], z.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1) @ v
        a = a.transpose(1, 2).reshape(t.shape)
        t = t + a @ b("attn.proj.weight").t() + b("attn.proj.bias")
        h = F.layer_norm(t, (D,), b("norm2.weight"), b("norm2.bias"), 1e-6)
        h = F.gelu(h @ b("mlp.fc1.weight").t() + b("mlp.fc1.bias"))
        t = t + h @ b("mlp.fc2.weight").t() + b("mlp.fc2.bias")
    f = F.layer_norm(t[:, 1:], (D,), g("fc_norm.weight"), g("fc_norm.bias"), 1e-6)
    z = torch.tanh(f @ sd["encode_task_layer.0.weight"].t() + sd["encode_task_layer.0.bias"])
    z = F.normalize(z @ sd["encode_task_layer.2.weight"].t() + sd["encode_task_layer.2.bias"], dim=-1)
    e = sd["quantize.embedding.weight"]
    return ((z[:, :, None, :] - e) ** 2).sum(-1).argmin(-1)


@pytest.fixture
def vqkd_file(tmp_path):
    torch.manual_seed(0)
    tok = VQKDTokenizer(**TINY_VQKD)
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # off the init values, so swapped weights would show
        tok.quantize.embedding.weight.copy_(F.normalize(torch.randn(16, 8), dim=-1))
    path = tmp_path / "vqkd_tiny.pth"
    torch.save({"model": _released_layout(tok)}, path)
    return path


def test_vqkd_loads_a_released_layout_and_matches_the_reference(vqkd_file) -> None:
    # heads cannot be read off the weights: dim / 64 (12 for the released ViT-B) unless given
    assert VQKDTokenizer.from_checkpoint(vqkd_file).encoder.blocks[0].attn.num_heads == 1
    tok = VQKDTokenizer.from_checkpoint(vqkd_file, num_heads=2)
    assert (tok.img_size, tok.patch_size, tok.num_codes, tok.code_dim) == (32, 8, 16, 8)
    assert not any(p.requires_grad for p in tok.parameters())
    sd = torch.load(vqkd_file, weights_only=True)["model"]
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    ids = tok.get_codebook_indices(x)
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    assert torch.equal(ids, _reference_tokens(sd, x, heads=2, patch=8))
    assert len(ids.unique()) > 1  # the comparison is not between two constant maps


def test_vqkd_target_undoes_the_data_normalisation_and_resizes(vqkd_file) -> None:
    target = VQKDTarget(str(vqkd_file), num_codes=16, num_heads=2)
    target.prepare("cpu")
    sd = torch.load(vqkd_file, weights_only=True)["model"]
    pixels = torch.rand(2, 3, 32, 32)
    normalised = (pixels - 0.5) / 0.5  # "inception" mean/std: the tokenizer's [-1, 1] input
    ids = target(normalised, 8, "inception")
    assert torch.equal(ids, _reference_tokens(sd, pixels * 2 - 1, heads=2, patch=8))
    # a model with 4-px patches on 16-px images has the same 4x4 grid: the image is upsampled to 32 px
    assert target(normalised[..., :16, :16], 4, "inception").shape == (2, 16)
    pred = torch.randn(5, 16)
    assert torch.isclose(target.loss(pred, ids[0, :5]), F.cross_entropy(pred, ids[0, :5]))


def test_vqkd_target_errors_name_the_problem(vqkd_file, tmp_path) -> None:
    with pytest.raises(ValueError, match="codebook has 16 codes.*num_codes=8192"):
        VQKDTarget(str(vqkd_file)).prepare("cpu")
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: not a VQ-KD tokenizer state dict"):
        VQKDTarget(str(tmp_path / "bad.pth"), num_codes=16).prepare("cpu")


def test_pretraining_with_vqkd_targets(vqkd_file, make_task, make_data, tmp_path) -> None:
    task = make_task("mhmoe", mim_target=VQKDTarget(str(vqkd_file), num_codes=16, num_heads=2))
    assert task.model.mim_head.out_features == 16
    t = trainer(tmp_path, fast_dev_run=True)
    t.fit(task, datamodule=make_data())
    assert "acc/mim_image" in t.callback_metrics and "val/acc_mim_pair" in t.callback_metrics
    # the frozen tokenizer is not part of the task's weights
    assert not any("tokenizer" in k for k in task.state_dict())


TIMM_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def test_timm_teacher_features_from_a_checkpoint(tmp_path) -> None:
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TIMM_TINY)
    torch.save(net.state_dict(), tmp_path / "teacher.pth")
    target = TeacherTarget("timm", "vit_tiny_patch16_224", str(tmp_path / "teacher.pth"), model_config=TIMM_TINY,
                           image_size=32)
    assert target.out_dim(8, 3) == 32
    target.prepare("cpu")
    pixels = torch.rand(2, 3, 32, 32)
    feats = target((pixels - 0.5) / 0.5, 8, "inception")
    mean = torch.tensor(target.mean_std[0]).view(1, 3, 1, 1)
    std = torch.tensor(target.mean_std[1]).view(1, 3, 1, 1)
    net.eval()
    want = net.forward_features((pixels - mean) / std)[:, 1:]
    assert torch.allclose(feats, want, atol=1e-5)
    # a coarser student grid (16-px patches: 2x2) gets the teacher map resampled to it
    assert target((pixels - 0.5) / 0.5, 16, "inception").shape == (2, 4, 32)
    assert float(target.loss(feats[0], feats[0])) == pytest.approx(0.0, abs=1e-6)


def test_open_clip_teacher_takes_the_image_tower_of_a_full_checkpoint(tmp_path, make_task, make_data) -> None:
    import open_clip

    cfg = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
    )
    torch.manual_seed(0)
    clip = open_clip.CLIP(**cfg)
    torch.save({"state_dict": clip.state_dict()}, tmp_path / "clip.pt")
    target = TeacherTarget("open_clip", None, str(tmp_path / "clip.pt"), model_config=cfg)
    assert target.out_dim(8, 3) == 16  # projected to the joint embedding, as BEiT v2's CLIP teacher
    target.prepare("cpu")
    assert torch.equal(target.net.proj, clip.visual.proj)
    task = make_task("dense", mim_target=target)
    t = trainer(tmp_path, fast_dev_run=True)
    t.fit(task, datamodule=make_data())
    assert math.isfinite(float(t.callback_metrics["loss/mim_image"]))
