"""Task models on a pure backbone: single-modality backbones, the registry, self-describing exports."""

from __future__ import annotations

import json

import pytest
import torch

from vlmoe.models import (
    TASK_MODELS,
    VLMoE,
    VLMoEConfig,
    VLMoEForPretraining,
    build_task_model,
    create_model,
    load_checkpoint,
    load_pretrained,
    save_pretrained,
)
from vlmoe.models.export import read_export


def _beit3_vision_params(d: int, depth: int, mlp: int, patches: int, patch: int = 16, final_norm: bool = True) -> int:
    """BEiT-3's vision branch counted by hand (torchscale ``BEiT3`` with the ``B`` copies removed)."""
    ln = 2 * d
    block = 3 * (d * d + d) + (d * d + d) + ln + ln + (d * mlp + mlp) + 2 * mlp + (mlp * d + d) + ln
    embed = d * 3 * patch * patch + d + 2 * d + (patches + 3) * d  # patch proj, cls + mask tokens, positions
    return depth * block + embed + (ln if final_norm else 0)


def test_vision_only_model_has_no_text_parameters() -> None:
    model = create_model("tiny", modalities=["vision"])
    names = [n for n, _ in model.named_parameters()]
    assert model.text_embed is None and not [n for n in names if ".text." in n or n.startswith("text_embed")]
    out = model(image=torch.randn(2, 3, 32, 32))
    assert out.hidden_states.shape == (2, 17, 64) and out.text_tokens is None
    with pytest.raises(ValueError, match=r"no text branch \(modalities=\['vision'\]\)"):
        model(text_ids=torch.randint(0, 128, (2, 5)))
    text_only = create_model("tiny_moe", modalities=["text"])
    assert text_only.vision_embed is None and not [n for n, _ in text_only.named_parameters() if ".vision." in n]
    assert text_only(text_ids=torch.randint(0, 128, (2, 5))).hidden_states.shape == (2, 5, 64)


def test_vision_only_base_matches_beit3s_vision_figure() -> None:
    """BEiT-3 base's vision branch: ~87M parameters with the ImageNet head (README of unilm/beit3);
    the backbone alone is the same count minus fc_norm and the 1000-class head."""
    model = VLMoE(VLMoEConfig.from_name("base", modalities=["vision"], final_norm=False))  # as BEiT-3 ImageNet
    n = sum(p.numel() for p in model.parameters())
    assert n == _beit3_vision_params(768, 12, 3072, 196, final_norm=False) == 85_891_584
    head = 2 * 768 + 768 * 1000 + 1000  # fc_norm + head
    assert round((n + head) / 1e6) == 87
    full = sum(p.numel() for p in create_model("base").parameters())
    assert n < 0.4 * full  # the text branch (and its 64010-token embedding) is not built at all


def test_loading_into_a_single_modality_model_skips_the_other_branch(perturb) -> None:
    src = perturb(create_model("tiny"))
    vision = create_model("tiny", modalities=["vision"])
    report = load_checkpoint(vision, src.state_dict())
    assert report.complete and report.branch_skipped and all(
        ".text." in k or k.startswith("text_embed") for k in report.branch_skipped
    )
    assert "keys of a branch this single-modality model does not have (skipped)" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(vision(image=torch.ones(1, 3, 32, 32)).hidden_states,
                                   src(image=torch.ones(1, 3, 32, 32)).hidden_states)


def test_task_models_are_rebuilt_from_their_task_config() -> None:
    model = VLMoEForPretraining(create_model("tiny_moe"), codebook_size=48, pooler=True)
    again = build_task_model(create_model("tiny_moe"), model.task_config())
    assert type(again) is VLMoEForPretraining and again.mim_head.out_features == 48 and again.pooler is not None
    assert "pretraining" in TASK_MODELS and build_task_model(model.backbone, None) is model.backbone
    with pytest.raises(ValueError, match="unknown task type 'nope'"):
        build_task_model(model.backbone, {"type": "nope"})


def test_export_round_trip_reproduces_outputs_and_preprocessing(perturb, tiny_batch, tmp_path) -> None:
    from vlmoe.data import Preprocess, preprocess_dict

    model = perturb(VLMoEForPretraining(create_model("tiny_mhmoe"), codebook_size=192)).eval()
    pre = preprocess_dict(image_size=32, mean_std="inception", tokenizer="clip", max_len=16)
    save_pretrained(model, tmp_path / "m", preprocess=pre)
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert written["task"] == {"type": "pretraining", "codebook_size": 192, "pooler": False}
    assert written["preprocess"] == pre and written["model"]["name"] == "tiny_mhmoe"
    loaded = load_pretrained(tmp_path / "m").eval()
    assert type(loaded) is VLMoEForPretraining and loaded.preprocess == pre
    image, ids, pad = tiny_batch
    with torch.no_grad():
        a, b = model(image=image, text_ids=ids, text_padding_mask=pad), loaded(image=image, text_ids=ids,
                                                                              text_padding_mask=pad)
        assert torch.equal(a.hidden_states, b.hidden_states)
        assert torch.equal(model.mlm_logits(a), loaded.mlm_logits(b)) and torch.equal(model.mim_logits(a),
                                                                                      loaded.mim_logits(b))
    # the preprocessing rebuilds: the same transform as the training recipe's evaluation transform
    from PIL import Image

    from vlmoe.data import build_transform

    img = Image.new("RGB", (50, 40), (200, 30, 90))
    torch.testing.assert_close(Preprocess.from_dict(loaded.preprocess).build_transform()(img),
                               build_transform("eval", 32, mean_std="inception")(img))
    assert Preprocess.from_dict(loaded.preprocess).build_tokenizer().vocab_size == 49410


def test_a_tokenizer_file_travels_with_the_export(tmp_path) -> None:
    tok = tmp_path / "my.json"
    tok.write_text("{}")  # any file: it is copied, not parsed
    out = save_pretrained(create_model("tiny"), tmp_path / "m", preprocess={"image_size": 32, "tokenizer": str(tok)})
    assert (out / "my.json").read_text() == "{}"
    assert json.loads((out / "config.json").read_text())["preprocess"]["tokenizer"] == "my.json"
    assert read_export(out).preprocess["tokenizer"] == str(out / "my.json")


def test_exports_of_earlier_versions_still_load(perturb, tiny_batch, tmp_path) -> None:
    """A folder written before heads left the backbone: a flat config listing its pretraining heads,
    the heads stored as ``heads.{mlm,mim}.proj.*`` / ``heads.pooler.*``."""
    from safetensors.torch import save_file

    new = perturb(VLMoEForPretraining(create_model("tiny"), codebook_size=64, pooler=True)).eval()
    old_names = {"mlm_head.": "heads.mlm.proj.", "mim_head.": "heads.mim.proj.", "pooler.": "heads.pooler."}
    sd = {}
    for k, v in new.state_dict().items():
        k = k.removeprefix("backbone.")
        for a, b in old_names.items():
            if k.startswith(a):
                k = b + k[len(a) :]
        sd[k] = v.contiguous()
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(sd, folder / "model.safetensors")
    flat = {**new.config.to_dict(), "heads": ["mlm", "mim", "pooler"], "codebook_size": 64}
    flat.pop("modalities")
    (folder / "config.json").write_text(json.dumps(flat))
    loaded = load_pretrained(folder).eval()
    assert type(loaded) is VLMoEForPretraining and loaded.pooler is not None
    for k, v in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------- finetuning heads
def test_vqa_head_is_beit3s(perturb, tiny_batch) -> None:
    from vlmoe.models import VLMoEForVQA

    model = VLMoEForVQA(create_model("tiny", final_norm=False), ["yes", "no", "red"]).eval()
    image, ids, pad = tiny_batch
    logits = model(image, ids, pad)
    out = model.backbone(image=image, text_ids=ids, text_padding_mask=pad)
    pooled = torch.tanh(model.pooler.dense(model.pooler.norm(out.hidden_states[:, 0])))  # the vision CLS
    h = model.head
    ref = h[3](torch.nn.functional.gelu(h[1](h[0](pooled))))
    torch.testing.assert_close(logits, ref)
    assert logits.shape == (2, 3) and [type(m).__name__ for m in h] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert h[0].out_features == 128 and model.task_config() == {"type": "vqa", "answers": ["yes", "no", "red"]}


def test_nlvr2_head_reads_cls_and_first_text_token_of_both_images(tiny_batch) -> None:
    from vlmoe.models import VLMoEForNLVR2

    model = VLMoEForNLVR2(create_model("tiny")).eval()
    # the head's linears start at 1e-3 x BEiT-3's trunc-normal(0.02) init
    assert model.head.dense1.weight.std() < 1e-3 * 0.03 and model.head.dense2.weight.abs().max() < 1e-3 * 0.1
    image, ids, pad = tiny_batch
    image2 = torch.randn_like(image)
    feats, _ = model.features(image, image2, ids, pad)
    a = model.backbone(image=image, text_ids=ids, text_padding_mask=pad).hidden_states
    b = model.backbone(image=image2, text_ids=ids, text_padding_mask=pad).hidden_states
    ref = torch.cat([a[:, 0], a[:, 17], b[:, 0], b[:, 17]], dim=-1)  # vision CLS, first text token
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    assert model(image, image2, ids, pad).shape == (2, 2)


def test_classifier_head_pools_patches_not_cls() -> None:
    from vlmoe.models import VLMoEForImageClassification

    model = VLMoEForImageClassification(create_model("tiny", modalities=["vision"], final_norm=False),
                                        class_names=["circle", "rectangle", "triangle"]).eval()
    assert model.head.weight.abs().max() < 1e-3 * 0.1  # scaled by 1e-3 at init
    image = torch.randn(2, 3, 32, 32)
    out = model.backbone(image=image).hidden_states
    torch.testing.assert_close(model(image), model.head(model.fc_norm(out[:, 1:].mean(1))))
    assert model.num_classes == 3 and model.task_config()["class_names"] == ["circle", "rectangle", "triangle"]


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "image_classification"])
def test_official_beit3_layout_loads_into_each_task_cleanly(task, perturb) -> None:
    """A state dict in the published BEiT-3 key layout (``beit3.*`` + the task's head under BEiT-3's
    names) loads into the task model with every parameter accounted for."""
    from vlmoe.models import VLMoEForImageClassification, VLMoEForNLVR2, VLMoEForVQA, vlmoe_to_beit3

    def build():
        if task == "vqa":
            return VLMoEForVQA(create_model("tiny", final_norm=False), ["a", "b", "c", "d"])
        if task == "nlvr2":
            return VLMoEForNLVR2(create_model("tiny"))
        return VLMoEForImageClassification(create_model("tiny", final_norm=False), num_classes=5)

    src = perturb(build())
    sd = vlmoe_to_beit3(src.state_dict())
    heads = {k for k in sd if not k.startswith("beit3.")}
    assert heads and all(k.split(".")[0] in ("pooler", "head", "fc_norm") for k in heads)
    dst = build()
    report = load_checkpoint(dst, {"model": sd})
    assert report.complete, str(report)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    if task == "image_classification":  # and into a vision-only classifier: the text branch is skipped
        vision = VLMoEForImageClassification(create_model("tiny", final_norm=False, modalities=["vision"]), 5)
        report = load_checkpoint(vision, {"model": sd})
        assert not report.missing and not report.unexpected and report.branch_skipped
