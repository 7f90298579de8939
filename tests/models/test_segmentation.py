"""The semantic segmentation model: BEiT's neck + UperNet on the vision branch of a (MoE) backbone."""

from __future__ import annotations

import pytest
import torch

from vlmoe.models import VLMoEForSegmentation, create_model, load_pretrained, save_pretrained
from vlmoe.models.segmentation import default_out_indices


def _model(**kw) -> VLMoEForSegmentation:
    torch.manual_seed(0)
    bb = create_model("tiny_moe", modalities=["vision"], img_size=32, final_norm=False)
    return VLMoEForSegmentation(bb, class_names=["background", "circle", "rectangle", "triangle"], **kw)


def test_logits_at_the_input_size_from_four_levels_with_the_moe_terms() -> None:
    m = _model()
    x = torch.randn(2, 3, 32, 32)
    levels, _ = m.features(x)
    assert [t.shape[-1] for t in levels] == [16, 8, 4, 2]  # strides p/4, p/2, p, 2p of the 4x4 patch grid
    logits, aux_logits, aux = m(x, return_aux=True, return_aux_logits=True)
    assert logits.shape == aux_logits.shape == (2, 4, 32, 32)
    assert aux.loss.requires_grad and len(aux.stats) == 2  # one vision MoE layer per block
    loss = torch.nn.functional.cross_entropy(logits, torch.randint(0, 4, (2, 32, 32))) + 0.4 * aux_logits.mean()
    (loss + aux.loss).backward()
    assert m.backbone.blocks[0].mlp.vision.experts.w1.grad is not None  # the gradient reaches the experts


def test_blocks_read_by_depth_and_refused_when_wrong() -> None:
    assert default_out_indices(12) == (3, 5, 7, 11) and default_out_indices(24) == (7, 11, 15, 23)
    assert default_out_indices(2) == (0, 0, 1, 1) and default_out_indices(8) == (1, 3, 5, 7)
    with pytest.raises(ValueError, match=r"out_indices must be 4 block indices in \[0, 2\)"):
        _model(out_indices=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="needs a vision branch"):
        VLMoEForSegmentation(create_model("tiny", modalities=["text"]), num_classes=3)


def test_export_round_trip(tmp_path) -> None:
    m = _model(decoder_channels=32, aux_channels=16).eval()
    out = save_pretrained(m, tmp_path / "seg")
    back = load_pretrained(out).eval()
    assert back.task_config() == m.task_config() and back.out_indices == (0, 0, 1, 1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x))
