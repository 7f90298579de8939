"""Dense -> MoE upcycling: what holds exactly (see vlmoe.models.upcycling's docstring)."""

import pytest
import torch

from vlmoe.models import create_model, load_beit3, upcycle, vlmoe_to_beit3


@pytest.fixture
def dense(perturb):
    return perturb(create_model("tiny")).eval()


def _compare(dense, moe, batch):
    image, ids, pad = batch
    with torch.no_grad():
        a = dense(image=image, text_ids=ids, text_padding_mask=pad)
        b = moe.eval()(image=image, text_ids=ids, text_padding_mask=pad)
    real = ~b.padding_mask  # MoE layers never route padding (output 0), dense FFNs compute it
    return (a.hidden_states - b.hidden_states)[real].abs().max().item()


def test_top1_with_unit_gates_equals_dense(dense, tiny_batch):
    """Top-1 with normalize_gates=True: every gate is exactly 1 and every expert is the dense FFN."""
    moe, report = upcycle(dense, "tiny_moe", moe={"top_k": 1, "normalize_gates": True})
    assert report.complete and len(report.upcycled) == 4
    assert all(f.endswith("router.gate.weight") for f in report.fresh)
    assert _compare(dense, moe, tiny_batch) < 1e-5
    # and for the text-only and image-only paths too
    image, ids, pad = tiny_batch
    with torch.no_grad():
        torch.testing.assert_close(moe(image=image).hidden_states, dense(image=image).hidden_states, atol=1e-5, rtol=0)
    exp = moe.blocks[1].mlp.text.experts
    assert torch.equal(exp.w1[0], dense.blocks[1].mlp.text.fc1.weight.t()) and torch.equal(exp.w1[0], exp.w1[3])


def test_top2_normalised_gates_equal_dense_up_to_rounding(dense, tiny_batch):
    moe, _ = upcycle(dense, "tiny_moe")  # top-2, gates renormalised to sum to 1
    assert _compare(dense, moe, tiny_batch) < 1e-5


def test_switch_top1_gate_does_not_preserve_the_function(dense, tiny_batch):
    moe, _ = upcycle(dense, "tiny_moe", moe={"top_k": 1})  # raw softmax gate ~ 1/E scales the FFN
    assert _compare(dense, moe, tiny_batch) > 1e-2


def test_noise_breaks_expert_symmetry(dense):
    moe, report = upcycle(dense, "tiny_moe", noise_std=1e-3)
    w1 = moe.blocks[0].mlp.vision.experts.w1
    assert not torch.equal(w1[0], w1[1]) and (w1[0] - w1[1]).abs().max() < 1e-2
    assert "noise std 0.001" in report.upcycled[0]


def test_shared_pool_takes_both_modality_ffns(dense):
    moe, report = upcycle(dense, "tiny_moe", moe_multiway="shared")
    ex = moe.blocks[0].mlp.shared.experts
    fv, ft = dense.blocks[0].mlp.vision.fc1.weight.t(), dense.blocks[0].mlp.text.fc1.weight.t()
    assert torch.equal(ex.w1[0], fv) and torch.equal(ex.w1[1], fv)
    assert torch.equal(ex.w1[2], ft) and torch.equal(ex.w1[3], ft)
    assert report.complete


def test_mhmoe_projections_identity_experts_fresh(dense, tiny_batch):
    moe, report = upcycle(dense, "tiny_mhmoe")
    layer = moe.blocks[0].mlp.vision
    assert torch.equal(layer.head_proj.weight, torch.eye(64)) and torch.equal(layer.merge_proj.bias, torch.zeros(64))
    assert "MH-MoE (h=2) head/merge projections set to identity" in report.upcycled[0]
    assert "blocks.0.mlp.vision.experts.w1" in report.fresh and report.complete
    # everything outside the FFNs came over unchanged
    for k, v in dense.state_dict().items():
        if ".mlp." not in k:
            assert torch.equal(moe.state_dict()[k], v), k


def test_upcycling_from_an_official_layout_checkpoint(dense, tiny_batch):
    sd = {"model": vlmoe_to_beit3(dense.state_dict())}
    moe, report = load_beit3(sd, "tiny_moe", moe={"top_k": 1, "normalize_gates": True}, strict=True)
    assert report.format == "beit3" and len(report.upcycled) == 4
    assert _compare(dense, moe, tiny_batch) < 1e-5


def test_upcycle_shape_errors(dense):
    with pytest.raises(ValueError, match=r"dense fc1\.weight has shape \(128, 64\) but the experts are 64 -> 96"):
        upcycle(dense, "tiny_moe", moe={"ffn_dim": 96})
    with pytest.raises(ValueError, match="has sub-LN but the experts have no"):
        upcycle(dense, "tiny_moe", moe={"ffn_layernorm": False})


def test_stratified_pool_upcycles_and_heterogeneous_is_refused(dense):
    moe, report = upcycle(dense, "tiny_moe", moe={"strata": [2, 2], "top_k": 1})
    assert report.complete and any("strata_routers" in f for f in report.fresh)
    assert torch.equal(moe.blocks[0].mlp.vision.experts.w1[3], dense.blocks[0].mlp.vision.fc1.weight.t())
    with pytest.raises(ValueError, match=r"heterogeneous experts \(MoEConfig\.expert_sizes\)"):
        upcycle(dense, "tiny_moe", moe={"expert_sizes": [64, 128, 128, 192], "ffn_layernorm": False})
