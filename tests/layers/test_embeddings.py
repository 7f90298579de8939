import pytest
import torch
import torch.nn.functional as F

from vlmoe.layers import PositionEmbedding, TextEmbedding, VisionEmbedding, resample_vision_positions


def test_positions_start_at_row_two():
    pe = PositionEmbedding(10, 4)
    torch.nn.init.normal_(pe.weight)
    assert pe.max_length == 8
    torch.testing.assert_close(pe(3), pe.weight[2:5])
    # explicit positions index the same rows (incremental decoding)
    pos = torch.tensor([[0, 2], [7, 1]])
    torch.testing.assert_close(pe(2, pos), pe.weight[pos + 2])


def test_position_table_too_short_names_table():
    pe = PositionEmbedding(10, 4, name="text_embed.pos_embed.weight")
    with pytest.raises(ValueError, match=r"text_embed\.pos_embed\.weight.*at most 8"):
        pe(9)


def test_vision_embedding_layout_and_mask_token():
    emb = VisionEmbedding(32, 8, 3, 16)
    emb.init_weights()
    assert emb.pos_embed.weight.shape == (2 + 1 + 16, 16)  # BEiT-3: 2 unused rows + CLS + 4x4 patches
    img = torch.randn(2, 3, 32, 32)
    x = emb(img)
    assert x.shape == (2, 17, 16)
    patches = emb.patch_embed(img)
    pos = emb.pos_embed.weight[2:]
    torch.testing.assert_close(x[:, 0], (emb.cls_token[0, 0] + pos[0]).expand(2, -1))
    torch.testing.assert_close(x[:, 1:], patches + pos[1:])

    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 3] = mask[1, 0] = True
    xm = emb(img, mask)
    torch.testing.assert_close(xm[0, 4], emb.mask_token[0, 0] + pos[4])
    torch.testing.assert_close(xm[1, 1], emb.mask_token[0, 0] + pos[1])
    keep = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~mask], 1)
    torch.testing.assert_close(xm[keep], x[keep])


def test_vision_embedding_rejects_wrong_size():
    emb = VisionEmbedding(32, 8, 3, 16)
    with pytest.raises(ValueError, match=r"\(2, 3, 48, 48\).*\(B, 3, 32, 32\)"):
        emb(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match=r"image_mask has shape \(2, 15\).*\(2, 16\)"):
        emb(torch.randn(2, 3, 32, 32), torch.zeros(2, 15, dtype=torch.bool))


def test_set_image_size_resizes_positions_bicubic():
    emb = VisionEmbedding(32, 8, 3, 16)
    emb.init_weights()
    old = emb.pos_embed.weight.detach().clone()
    emb.set_image_size(48)
    assert emb.img_size == (48, 48) and emb.num_patches == 36
    new = emb.pos_embed.weight
    assert new.shape == (3 + 36, 16)
    torch.testing.assert_close(new[:3], old[:3])  # dummy rows and CLS are kept
    grid = old[3:].reshape(1, 4, 4, 16).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)  # BEiT-3's recipe
    torch.testing.assert_close(new[3:], ref.permute(0, 2, 3, 1).reshape(36, 16))
    assert emb(torch.randn(1, 3, 48, 48)).shape == (1, 37, 16)


def test_resample_same_grid_is_identity_and_bad_grid_raises():
    w = torch.randn(3 + 16, 8)
    assert resample_vision_positions(w, (4, 4)) is w
    with pytest.raises(ValueError, match="not a square grid"):
        resample_vision_positions(torch.randn(3 + 15, 8), (4, 4))


def test_text_embedding():
    emb = TextEmbedding(50, 8, max_positions=12)
    emb.init_weights()
    ids = torch.randint(0, 50, (3, 10))
    out = emb(ids)
    torch.testing.assert_close(out, emb.token_embed(ids) + emb.pos_embed.weight[2:12])
    with pytest.raises(ValueError, match=r"11 tokens.*12 rows starting at row 2.*at most 10"):
        emb(torch.randint(0, 50, (1, 11)))
