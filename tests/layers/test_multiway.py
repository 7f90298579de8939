import pytest
import torch
from torch import nn

from vlmoe.layers import FeedForward, Multiway, MultiwayDropPath, MultiwayFFN, Shared
from vlmoe.moe import MoE, MoEConfig


def test_multiway_routes_each_stream_to_its_module():
    mw = Multiway.copies(lambda: nn.Linear(8, 8))
    xv, xt = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    yv, yt = mw(xv, xt)
    torch.testing.assert_close(yv, mw.vision(xv))
    torch.testing.assert_close(yt, mw.text(xt))
    yv_only, none = mw(xv, None)
    assert none is None
    torch.testing.assert_close(yv_only, mw.vision(xv))
    # the concatenated-sequence form equals torchscale's split -> A / B -> cat
    x = torch.cat([xv, xt], 1)
    torch.testing.assert_close(mw.forward_sequence(x, 3), torch.cat([mw.vision(xv), mw.text(xt)], 1))
    torch.testing.assert_close(mw.forward_sequence(x, 8), mw.vision(x))  # all vision (split -1)
    torch.testing.assert_close(mw.forward_sequence(x, 0), mw.text(x))  # all text (split 0)


def test_multiway_vl_way_only_for_pairs():
    mw = Multiway.copies(lambda: nn.Linear(8, 8), vl=True)
    xv, xt = torch.randn(1, 3, 8), torch.randn(1, 2, 8)
    yv, yt = mw(xv, xt)
    torch.testing.assert_close(yv, mw.vl(xv))
    torch.testing.assert_close(yt, mw.vl(xt))
    torch.testing.assert_close(mw(xv, None)[0], mw.vision(xv))
    torch.testing.assert_close(mw(None, xt)[1], mw.text(xt))


def test_shared_uses_one_module():
    sh = Shared(nn.Linear(8, 8))
    xv, xt = torch.randn(1, 3, 8), torch.randn(1, 2, 8)
    yv, yt = sh(xv, xt)
    torch.testing.assert_close(yv, sh.shared(xv))
    torch.testing.assert_close(yt, sh.shared(xt))


def test_drop_path_one_draw_per_sample_across_streams():
    dp = MultiwayDropPath(0.5).train()
    xv, xt = torch.ones(64, 3, 4), torch.ones(64, 2, 4)
    yv, yt = dp(xv, xt)
    kept_v = yv[:, 0, 0] > 0
    assert torch.equal(kept_v, yt[:, 0, 0] > 0)  # a sample's branch is dropped in both modalities
    assert 0 < kept_v.sum() < 64
    torch.testing.assert_close(yv[kept_v], torch.full_like(yv[kept_v], 2.0))  # scaled by 1 / keep
    dp.eval()
    assert dp(xv, xt)[0] is xv


def _moe(dim=16, **kw):
    return MoE(dim, MoEConfig(**{"num_experts": 4, "top_k": 2, "ffn_dim": 32, **kw}))


def test_ffn_per_modality_dense_and_moe():
    ffn = MultiwayFFN(FeedForward(16, 32), _moe())
    xv, xt = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    pad = torch.tensor([[False] * 4, [False, False, True, True]])
    yv, yt, aux = ffn(xv, xt, pad)
    torch.testing.assert_close(yv, ffn.vision(xv))
    ref, _ = ffn.text(xt, padding_mask=pad)
    torch.testing.assert_close(yt, ref)
    assert torch.all(yt[1, 2:] == 0)  # padding is never routed
    assert len(aux.stats) == 1 and aux.stats[0].routed_tokens == 6
    _, _, aux_v = ffn(xv, None)
    assert aux_v is None  # the dense vision FFN has no aux


def test_ffn_shared_pool_routes_all_tokens_together():
    pool = _moe()
    ffn = MultiwayFFN(shared=pool)
    xv, xt = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    pad = torch.tensor([[False] * 4, [False, False, False, True]])
    yv, yt, aux = ffn(xv, xt, pad)
    rows = torch.cat([xv.reshape(6, 16), xt.reshape(8, 16)])
    ref, ref_aux = pool(rows, padding_mask=torch.cat([torch.zeros(6, dtype=torch.bool), pad.reshape(8)]))
    torch.testing.assert_close(torch.cat([yv.reshape(6, 16), yt.reshape(8, 16)]), ref)
    assert len(aux.stats) == 1 and aux.stats[0].routed_tokens == 6 + 7  # one routing call, padding out
    torch.testing.assert_close(aux.loss, ref_aux.loss)


def test_ffn_layout_errors():
    with pytest.raises(ValueError, match="shared"):
        MultiwayFFN(FeedForward(8, 8), FeedForward(8, 8), shared=FeedForward(8, 8))
    with pytest.raises(ValueError, match="needs"):
        MultiwayFFN()
    # a single-modality slot (vision-only models): text tokens get a clear error
    ffn = MultiwayFFN(FeedForward(8, 8))
    yv, yt, _ = ffn(torch.randn(2, 3, 8), None)
    assert yv.shape == (2, 3, 8) and yt is None
    with pytest.raises(ValueError, match="no text branch"):
        ffn(None, torch.randn(2, 3, 8))
