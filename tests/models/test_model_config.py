from pathlib import Path

import pytest

from vlmoe.models import PRESETS, VLMoEConfig, create_model, list_models
from vlmoe.moe import MoEConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


def test_base_and_large_are_beit3():
    base = VLMoEConfig.from_name("base")
    assert (base.depth, base.dim, base.num_heads, base.mlp_dim, base.patch_size, base.vocab_size) == (
        12,
        768,
        12,
        3072,
        16,
        64010,
    )
    assert base.subln and base.final_norm and base.layernorm_eps == 1e-5 and base.max_text_positions == 1024
    large = VLMoEConfig.from_name("large")
    assert (large.depth, large.dim, large.num_heads, large.mlp_dim) == (24, 1024, 16, 4096)
    assert base.moe_layer_indices == [] and not base.is_moe


def test_moe_presets():
    x = VLMoEConfig.from_name("base_xmoe8")
    assert x.moe.router == "xmoe" and (x.moe.num_experts, x.moe.top_k) == (8, 2)
    assert x.moe_layer_indices == [1, 3, 5, 7, 9, 11]  # every 2nd block, as torchscale moe_freq=2
    mh = VLMoEConfig.from_name("base_mhmoe8")
    assert mh.moe.heads == 4 and mh.moe.ffn_dim == 3072 - 768 // 2
    assert VLMoEConfig.from_name("base_moe8_shared").moe_multiway == "shared"
    paper = VLMoEConfig.from_name("base_paper")
    assert paper.share_attention and paper.vl_ffn_layers == 3


def test_overrides_and_moe_dict_merge():
    cfg = VLMoEConfig.from_name("base_xmoe8", img_size=384, moe={"top_k": 1, "normalize_gates": True})
    assert cfg.img_size == 384 and cfg.moe.top_k == 1 and cfg.moe.normalize_gates and cfg.moe.router == "xmoe"
    assert VLMoEConfig.from_name("base_xmoe8").moe.top_k == 2  # the preset is untouched
    cfg = VLMoEConfig.from_name("tiny_moe", moe_text={"num_experts": 2, "top_k": 1}, moe_layers=[0])
    assert cfg.moe_text.num_experts == 2 and cfg.moe_text.ffn_dim == cfg.moe.ffn_dim  # merged into `moe`
    assert cfg.moe_layer_indices == [0]
    cfg = VLMoEConfig.from_name("tiny", moe=MoEConfig(num_experts=2, top_k=1, ffn_dim=8), moe_every=1)
    assert cfg.moe_layer_indices == [0, 1]


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(num_heads=5), "num_heads=5: must divide dim=64"),
        (dict(img_size=30), "img_size=30: must be a multiple of patch_size=8"),
        (dict(moe_multiway="mixed"), "moe_multiway='mixed'"),
        (dict(moe_layers=[0, 7]), r"moe_layers=\[0, 7\]: indices \[7\]"),
        (dict(heads=["vqa"]), r"unknown VLMoEConfig field\(s\) \['heads'\]"),  # heads live in task models
        (dict(modalities=["audio"]), r"modalities=\['audio'\]: choose a non-empty subset"),
        (dict(modalities=["vision"], vl_ffn_layers=1), "single-modality model has no VL-FFN"),
        (dict(vl_ffn_layers=3), "vl_ffn_layers=3"),
        (dict(max_text_positions=2), "max_text_positions=2"),
        (dict(colour="red"), r"unknown VLMoEConfig field\(s\) \['colour'\]"),
        (
            dict(
                moe={"num_experts": 4, "top_k": 1, "ffn_dim": 8},
                moe_multiway="shared",
                moe_text={"num_experts": 2, "top_k": 1, "ffn_dim": 8},
            ),
            "moe_text.*per_modality",
        ),
    ],
)
def test_invalid_fields_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        VLMoEConfig.from_name("tiny", **changes)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'; choose from \["):
        VLMoEConfig.from_name("huge")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_and_json_round_trip(name, tmp_path):
    cfg = VLMoEConfig.from_name(name)
    text = cfg.to_yaml(tmp_path / "a.yaml")
    assert VLMoEConfig.from_file(tmp_path / "a.yaml") == cfg
    assert (tmp_path / "a.yaml").read_text() == text
    cfg.to_json(tmp_path / "a.json")
    assert VLMoEConfig.from_file(tmp_path / "a.json") == cfg
    cfg.to_yaml(tmp_path / "b.yaml", full_moe=False)
    assert VLMoEConfig.from_file(tmp_path / "b.yaml") == cfg


def test_config_files_match_presets():
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {f.stem for f in files} == set(PRESETS)
    for f in files:
        assert VLMoEConfig.from_file(f) == PRESETS[f.stem], f


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "eps.yaml"
    path.write_text("layernorm_eps: 1e-6\ndepth: 1\n")
    cfg = VLMoEConfig.from_file(path)
    assert cfg.layernorm_eps == 1e-6 and isinstance(cfg.layernorm_eps, float)


def test_from_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dim: 64\nwidth: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown VLMoEConfig key\(s\) \['width'\]"):
        VLMoEConfig.from_file(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: expected a mapping"):
        VLMoEConfig.from_file(bad)


def test_create_model_from_name_file_and_config(tmp_path):
    assert "base_xmoe8" in list_models()
    m = create_model("tiny", depth=1)
    assert len(m.blocks) == 1
    path = tmp_path / "m.yaml"
    VLMoEConfig.from_name("tiny_moe").to_yaml(path)
    m2 = create_model(str(path), moe_layers=[1])
    assert m2.config.moe_layer_indices == [1]
    assert not hasattr(create_model(VLMoEConfig.from_name("tiny")), "heads")
    # configs written before heads left the backbone still read (their head fields are dropped)
    legacy = {**VLMoEConfig.from_name("tiny").to_dict(), "heads": ["mlm", "mim"], "codebook_size": 64}
    assert VLMoEConfig.from_dict(legacy) == VLMoEConfig.from_name("tiny")


def _attention_logit_std(model, n: int = 512) -> float:
    """The spread of the first block's attention logits q.k / sqrt(d_head) for unit-variance tokens (the
    LayerNorm output a block's attention sees at init), over the vision projection."""
    import torch

    torch.manual_seed(0)
    c = model.config
    w = model.blocks[0].attn.qkv.vision.weight.detach()  # (3D, D): q rows, k rows, v rows
    x = torch.randn(n, c.dim)
    hd = c.dim // c.num_heads
    q, k = (x @ w[: c.dim].T)[:, :hd], (x @ w[c.dim : 2 * c.dim].T)[:, :hd]
    return float((q @ k.T / hd**0.5).std())


def test_demo_presets_start_with_attention_that_discriminates():
    # BEiT-3's init_std 0.02 is calibrated for width 768 (logit std ~ dim * std^2 = 0.31); at width 64 it
    # gives 0.026: softmax(q.k) is flat, every token reads the mean of the others, and the
    # question-image interaction the VQA demo needs has no gradient to grow from.
    base_like = 768 * 0.02**2
    tiny = _attention_logit_std(create_model("tiny"))
    assert tiny < base_like / 5
    for name in ("demo", "demo_xmoe", "demo_mhmoe"):
        m = create_model(name)
        assert _attention_logit_std(m) > base_like, name
        assert m.config.img_size == 64 and m.config.patch_size == 8  # easy-vqa's images at their own size


def test_experts_take_the_model_init_std():
    import torch

    for name, std in (("demo_xmoe", 0.125), ("tiny_moe", 0.02)):
        m = create_model(name)
        experts = m.blocks[0].mlp.vision.experts
        for w in (experts.w1, experts.w2):
            assert abs(float(w.std()) - std) < 0.12 * std, (name, float(w.std()))
    dense = create_model("demo").blocks[0].mlp.vision.fc1.weight
    assert abs(float(dense.std()) - 0.125) < 0.015 and torch.isfinite(dense).all()
