"""Captioning and retrieval tasks: BEiT-3's caption masking rules, the label-smoothed loss against its
formula, the training batch, the contrastive loss over 2 gloo ranks == 1 process on the whole batch."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.distributed import run_on_gloo
from vlmoe.data import Collator, caption_mask
from vlmoe.data.tokenizers import ClipBPETokenizer
from vlmoe.tasks.finetune.captioning import CaptionCollator, caption_loss
from vlmoe.tasks.finetune.retrieval import clip_loss

PAD, MASK, BOS, EOS, V = 0, 3, 1, 2, 50


def _rows(lengths: list[int], L: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(lengths), L), PAD)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.cat([torch.tensor([BOS]), torch.arange(10, 10 + n - 2), torch.tensor([EOS])])
    return ids, torch.tensor(lengths)


@pytest.mark.parametrize("prob", [0.6, 0.7, 0.15, 1.0])
def test_caption_masking_follows_beit3s_rules(prob: float) -> None:
    lengths = [2, 3, 4, 7, 12]
    ids, n = _rows(lengths)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        out, pos = caption_mask(ids, n, mask_id=MASK, vocab_size=V, special_ids={PAD, BOS, EOS}, prob=prob, generator=g)
        for r, length in enumerate(lengths):
            want = min(max(int(length * prob + 0.5), 1), length - 1)  # at least one, at most n - 1
            assert int(pos[r].sum()) == want, (length, prob)
            assert not pos[r, 0] and not pos[r, length:].any()  # never the bos, never padding
        assert torch.equal(out[~pos], ids[~pos])
    # a two-token caption: the only choice is its eos (how the model learns to stop)
    out, pos = caption_mask(*_rows([2]), mask_id=MASK, vocab_size=V, special_ids={PAD, BOS, EOS}, generator=g)
    assert pos.tolist()[0][:2] == [False, True]


def test_caption_masking_replaces_80_10_10() -> None:
    ids, n = _rows([12] * 2000)
    g = torch.Generator().manual_seed(1)
    out, pos = caption_mask(ids, n, mask_id=MASK, vocab_size=V, special_ids={PAD, BOS, EOS}, prob=0.5, generator=g)
    chosen, orig = out[pos], ids[pos]
    masked = (chosen == MASK).float().mean().item()
    kept = (chosen == orig).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.02) and kept == pytest.approx(0.1 + 0.1 / (V - 4), abs=0.02)
    assert not torch.isin(chosen[(chosen != MASK) & (chosen != orig)], torch.tensor([PAD, BOS, EOS])).any()


def test_caption_masking_rejects_bad_lengths() -> None:
    ids, _ = _rows([4])
    with pytest.raises(ValueError, match="caption lengths must be in"):
        caption_mask(ids, torch.tensor([1]), mask_id=MASK, vocab_size=V, special_ids={PAD})


def _reference_loss(logits, targets, eps, drop):
    """BEiT-3's BertCaptioningLoss, written out with an explicit smoothed target."""
    n_class = logits.size(1)
    one_hot = torch.zeros_like(logits).scatter(1, targets.view(-1, 1), 1)
    one_hot = one_hot * (1 - eps) + (1 - one_hot) * eps / (n_class - 1)
    loss = F.kl_div(F.log_softmax(logits, dim=1), one_hot, reduction="none").sum(1)
    if drop:
        loss, _ = torch.topk(loss, k=int(loss.shape[0] * (1 - drop)), largest=False)
    return loss.mean()


@pytest.mark.parametrize(("eps", "drop"), [(0.1, 0.0), (0.1, 0.2), (0.0, 0.0), (0.3, 0.5)])
def test_caption_loss_equals_the_formula_and_its_gradient(eps: float, drop: float) -> None:
    torch.manual_seed(0)
    logits = (3 * torch.randn(20, 37, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 37, (20,))
    want = _reference_loss(logits, targets, eps, drop)
    (g_want,) = torch.autograd.grad(want, logits)
    got = caption_loss(logits, targets, eps, drop)
    (g_got,) = torch.autograd.grad(got, logits)
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
    assert torch.allclose(g_got, g_want, atol=1e-12)
    # a perfect prediction costs exactly the smoothed target's entropy gap: 0 when eps = 0
    sure = torch.full((1, 5), -1e4, dtype=torch.float64)
    sure[0, 2] = 0.0
    assert caption_loss(sure, torch.tensor([2]), 0.0).item() == pytest.approx(0.0, abs=1e-9)


def test_training_batch_keeps_the_caption_and_masks_a_copy() -> None:
    tok = ClipBPETokenizer()
    collate = CaptionCollator(Collator(tok, 16), mask_prob=0.6)
    samples = [{"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "image_id": i, "text": t}
               for i, t in enumerate(["a red circle on a light background.", "a big blue square"])]
    batch = collate(samples)
    ids, masked, pos = batch["caption_ids"], batch["text_ids"], batch["masked_positions"]
    assert ids.shape == masked.shape == pos.shape == (2, 16)
    assert torch.equal(ids, tok(["a red circle on a light background.", "a big blue square"], 16)[0])
    assert torch.equal(masked[~pos], ids[~pos]) and pos.any(dim=1).all() and not pos[:, 0].any()
    evals = collate([{"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "image_id": 7, "captions": ["a", "b"]}])
    assert "text_ids" not in evals and evals["image_id"].tolist() == [7]


# ---------------------------------------------------------------------------------------------- retrieval
def _features(n: int = 8, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1),
            F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1))


def _clip_worker(rank: int, world: int, out_dir: str) -> None:
    img, txt = _features()
    part = slice(rank * 4, (rank + 1) * 4)
    i, t = img[part].clone().requires_grad_(), txt[part].clone().requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    loss, _ = clip_loss(i, t, scale)
    loss.backward()
    torch.save({"loss": loss.detach(), "gi": i.grad, "gt": t.grad, "gs": scale.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_contrastive_loss_over_two_ranks_equals_one_process_on_the_whole_batch() -> None:
    img, txt = _features()
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    want, _ = clip_loss(i, t, scale)
    want.backward()
    # the loss by hand: symmetric cross-entropy over s * I T^T
    logits = scale.detach().exp() * img @ txt.t()
    labels = torch.arange(8)
    by_hand = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert want.item() == pytest.approx(by_hand.item())
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run_on_gloo, args=(_clip_worker, 2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        got = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for r, g in enumerate(got):
        part = slice(r * 4, (r + 1) * 4)
        assert g["loss"].item() == pytest.approx(want.item(), abs=1e-12)  # every rank: the global-batch loss
        # the local features' gradients are the whole-batch gradients of those rows
        assert torch.allclose(g["gi"], i.grad[part], atol=1e-12) and torch.allclose(g["gt"], t.grad[part], atol=1e-12)
        # the replicated logit scale gets the full gradient on every rank
        assert g["gs"].item() == pytest.approx(scale.grad.item(), abs=1e-12)
