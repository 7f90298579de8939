import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def perturb():
    """Give every parameter a random value (norms and biases are 1 / 0 at init and would hide swaps)."""

    @torch.no_grad()
    def _perturb(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        return model

    return _perturb


@pytest.fixture
def tiny_batch():
    """Inputs for the ``tiny`` presets: 2 images 32x32, 2 texts of 7 tokens, the second padded after 4."""
    image = torch.randn(2, 3, 32, 32)
    ids = torch.randint(0, 128, (2, 7))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    return image, ids, pad
