import pytest
import torch
from timm.layers import Attention

from vlmoe.layers import MultiwayAttention, build_attention_mask


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


def _copy_way(attn: MultiwayAttention, way: str, timm_attn: Attention):
    for src, dst in (("qkv", "qkv"), ("norm", "norm"), ("proj", "proj")):
        getattr(timm_attn, dst).load_state_dict(getattr(getattr(attn, src), way).state_dict())


@pytest.mark.parametrize("way", ["vision", "text"])
def test_single_modality_equals_that_branch_alone(way):
    """Multiway attention on one modality == a plain (timm) attention with that branch's weights."""
    attn = MultiwayAttention(32, 4).eval()
    _randomize(attn)
    ref = Attention(32, 4, qkv_bias=True, scale_norm=True, norm_layer=torch.nn.LayerNorm).eval()
    _copy_way(attn, way, ref)
    x = torch.randn(2, 7, 32)
    ov, ot = attn(x, None) if way == "vision" else attn(None, x)
    out = ov if way == "vision" else ot
    assert (ot if way == "vision" else ov) is None
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)


def _reference(attn, xv, xt, allowed):
    """Split/concat reference: per-modality projections, one softmax over the concatenation."""
    qkv = torch.cat([attn.qkv.vision(xv), attn.qkv.text(xt)], 1)
    B, L, _ = qkv.shape
    q, k, v = qkv.view(B, L, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) * attn.head_dim**-0.5
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, -1)
    Lv = xv.shape[1]
    return (
        attn.proj.vision(attn.norm.vision(o[:, :Lv])),
        attn.proj.text(attn.norm.text(o[:, Lv:])),
    )


@pytest.mark.parametrize("fused", [True, False])
def test_pair_matches_reference_with_padding_and_mask(fused):
    attn = MultiwayAttention(32, 4).eval()
    _randomize(attn)
    attn.fused_attn = fused
    xv, xt = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    pad = torch.tensor([[False] * 4, [False, False, True, True]])
    key_pad = torch.cat([torch.zeros(2, 5, dtype=torch.bool), pad], 1)
    block = torch.zeros(9, 9, dtype=torch.bool)
    block[:5, 5:] = True  # image queries may not see text (the BEiT-3 captioning pattern)
    allowed = build_attention_mask(key_pad, block, 9, 2)
    ov, ot = attn(xv, xt, allowed)
    rv, rt = _reference(attn, xv, xt, allowed)
    torch.testing.assert_close(ov, rv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ot, rt, atol=1e-5, rtol=1e-5)
    # with image->text blocked, the image tokens see exactly what an image-only pass sees
    ov_alone, _ = attn(xv, None)
    torch.testing.assert_close(ov, ov_alone, atol=1e-5, rtol=1e-5)


def test_padding_changes_nothing_for_real_tokens():
    attn = MultiwayAttention(32, 4).eval()
    _randomize(attn)
    xv, xt = torch.randn(1, 5, 32), torch.randn(1, 3, 32)
    ov, ot = attn(xv, xt)
    padded = torch.cat([xt, torch.randn(1, 4, 32)], 1)
    pad = torch.tensor([[False] * 3 + [True] * 4])
    allowed = build_attention_mask(torch.cat([torch.zeros(1, 5, dtype=torch.bool), pad], 1), None, 12, 1)
    pv, pt = attn(xv, padded, allowed)
    torch.testing.assert_close(pv, ov, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pt[:, :3], ot, atol=1e-5, rtol=1e-5)


def test_shared_attention_has_one_set_of_weights():
    attn = MultiwayAttention(32, 4, multiway=False).eval()
    names = {n for n, _ in attn.named_parameters()}
    assert names == {
        "qkv.shared.weight",
        "qkv.shared.bias",
        "norm.shared.weight",
        "norm.shared.bias",
        "proj.shared.weight",
        "proj.shared.bias",
    }
    x = torch.randn(2, 6, 32)
    # with shared weights, which tokens count as vision does not matter
    a = torch.cat(attn(x[:, :2], x[:, 2:]), 1)
    b = torch.cat(attn(x[:, :4], x[:, 4:]), 1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_build_attention_mask_conventions_and_errors():
    assert build_attention_mask(None, None, 5, 2) is None
    pad = torch.tensor([[False, True]])
    m = build_attention_mask(pad, None, 2, 1)
    assert m.shape == (1, 1, 1, 2) and m.tolist() == [[[[True, False]]]]
    # float masks: non-zero = blocked (torchscale turns them into -1e8)
    fm = torch.tensor([[0.0, -1.0], [0.0, 0.0]])
    assert build_attention_mask(None, fm, 2, 3).tolist() == [[True, False], [True, True]]
    per_sample = torch.zeros(3, 2, 2, dtype=torch.bool)
    assert build_attention_mask(None, per_sample, 2, 3).shape == (3, 1, 2, 2)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(3, 3\); expected \(2, 2\)"):
        build_attention_mask(None, torch.zeros(3, 3), 2, 1)
    with pytest.raises(ValueError, match=r"key padding mask has shape \(1, 3\); expected \(1, 2\)"):
        build_attention_mask(torch.zeros(1, 3, dtype=torch.bool), None, 2, 1)


def test_dims_must_divide():
    with pytest.raises(ValueError, match="dim=30 is not divisible by num_heads=4"):
        MultiwayAttention(30, 4)
