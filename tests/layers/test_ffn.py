import torch
import torch.nn.functional as F

from vlmoe.layers import FeedForward


def test_ffn_is_beit3_ffn():
    """fc1 -> GELU (float32) -> sub-LN -> fc2, as torchscale's FeedForwardNetwork with subln."""
    ffn = FeedForward(16, 48, eps=1e-5)
    with torch.no_grad():
        ffn.norm.weight.normal_()
        ffn.norm.bias.normal_()
    x = torch.randn(3, 5, 16)
    h = F.gelu(F.linear(x, ffn.fc1.weight, ffn.fc1.bias))
    h = F.layer_norm(h, (48,), ffn.norm.weight, ffn.norm.bias, 1e-5)
    torch.testing.assert_close(ffn(x), F.linear(h, ffn.fc2.weight, ffn.fc2.bias))
    assert [n for n, _ in ffn.named_children()][:5] == ["fc1", "act", "drop1", "norm", "fc2"]


def test_ffn_without_sub_ln_and_bf16_gelu_in_fp32():
    ffn = FeedForward(8, 16, sub_ln=False)
    assert isinstance(ffn.norm, torch.nn.Identity)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    h = torch.randn(4, 16, dtype=torch.bfloat16)
    out = ffn.act(h)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.gelu(h.float()).to(torch.bfloat16))
    assert ffn.to(torch.bfloat16)(x).dtype == torch.bfloat16
