"""Oracle: a converted torchscale ``BEiT3`` and vlmoe compute the same encoder output (fp32, 1e-4).

torchscale is an optional peer (``pip install --no-deps torchscale fairscale``); without it the
tests skip. Its BEiT3 is built with random weights, and every parameter (including layer norms,
which start at 1 / 0 in both branches) is perturbed so that a swapped A/B or q/k/v would show.
"""

import warnings

import pytest
import torch

torchscale = pytest.importorskip("torchscale")
pytest.importorskip("fairscale")

from vlmoe.models import VLMoEConfig, load_beit3  # noqa: E402

TOL = 1e-4


def _torchscale_beit3(cfg: VLMoEConfig):
    from torchscale.architecture.config import EncoderConfig

    with warnings.catch_warnings():  # torchscale imports timm.models.layers (deprecated path)
        warnings.simplefilter("ignore")
        from torchscale.model.BEiT3 import BEiT3

    # unilm beit3 modeling_utils: EncoderConfig(multiway=True, layernorm_embedding=False,
    # normalize_output=True, no_output_layer=True, ...) ; subln=True is torchscale's default
    args = EncoderConfig(
        img_size=cfg.img_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size, multiway=True,
        layernorm_embedding=False, normalize_output=True, no_output_layer=True,
        encoder_embed_dim=cfg.dim, encoder_attention_heads=cfg.num_heads,
        encoder_ffn_embed_dim=cfg.mlp_dim, encoder_layers=cfg.depth,
    )  # fmt: skip
    model = BEiT3(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _check(cfg: VLMoEConfig, batch: int, text_len: int, mim: bool = True) -> dict[str, float]:
    ts = _torchscale_beit3(cfg)
    sd = {"model": {f"beit3.{k}": v for k, v in ts.state_dict().items()}}  # the released file layout
    model, report = load_beit3(sd, cfg, strict=True)
    model.eval()
    assert report.complete, report

    image = torch.randn(batch, 3, cfg.img_size, cfg.img_size)
    ids = torch.randint(0, cfg.vocab_size, (batch, text_len))
    pad = torch.zeros(batch, text_len, dtype=torch.bool)
    pad[-1, text_len // 2 :] = True  # the last text is padded
    mask = torch.rand(batch, cfg.num_patches) < 0.4
    ts_pair = dict(visual_tokens=image, textual_tokens=ids, text_padding_position=pad)
    cases = {
        "image": (dict(visual_tokens=image), dict(image=image)),
        "image+mim": (
            dict(visual_tokens=image, vision_masked_position=mask),
            dict(image=image, image_mask=mask),
        ),
        "text (padded)": (
            dict(textual_tokens=ids, text_padding_position=pad),
            dict(text_ids=ids, text_padding_mask=pad),
        ),
        "image+text (padded)": (ts_pair, dict(image=image, text_ids=ids, text_padding_mask=pad)),
    }
    if not mim:
        del cases["image+mim"]
    diffs = {}
    with torch.no_grad():
        for name, (ts_in, our_in) in cases.items():
            ref = ts(**ts_in)
            out = model(**our_in)
            assert out.hidden_states.shape == ref["encoder_out"].shape, name
            split = ref["multiway_split_position"]
            assert out.split_position == (out.hidden_states.shape[1] if split == -1 else split), name
            diffs[name] = (out.hidden_states - ref["encoder_out"]).abs().max().item()
    return diffs


def test_parity_tiny():
    cfg = VLMoEConfig.from_name("tiny")
    diffs = _check(cfg, batch=3, text_len=9)
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.slow  # ~10 s on an idle 2-core machine (two 221M-parameter models)
def test_parity_base_shape():
    """BEiT-3 base widths (12 x 768, 12 heads, FFN 3072, vocab 64010, 224 px, 1024 text positions)."""
    cfg = VLMoEConfig.from_name("base")
    diffs = _check(cfg, batch=2, text_len=8, mim=False)
    assert max(diffs.values()) < TOL, diffs
