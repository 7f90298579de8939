"""Block-wise MIM masks and MLM masks: exact counts, block shapes, 80/10/10 statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlmoe.data.masking import IGNORE_INDEX, BlockMaskingGenerator, mlm_mask


@pytest.mark.parametrize(("grid", "n"), [(14, 78), (14, 75), ((8, 12), 40), (4, 6), (14, 0), (7, 49)])
def test_block_mask_exact_count(grid, n) -> None:
    gen = BlockMaskingGenerator(grid, num_masking_patches=n, min_num_patches=4 if n < 16 else 16)
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = gen(rng)
        assert m.shape == gen.shape and m.dtype == bool
        assert int(m.sum()) == n


def test_block_mask_ratio_default_is_beit3() -> None:
    gen = BlockMaskingGenerator(14)  # 40% of 196 -> 78
    assert gen.num_masking_patches == 78
    assert gen.batch(3, np.random.default_rng(1)).shape == (3, 196)


def test_block_mask_is_blockwise_not_scattered() -> None:
    # Blocks of >= 16 patches: masked patches mostly have masked 4-neighbours, unlike a random mask.
    gen = BlockMaskingGenerator(14, num_masking_patches=78, min_num_patches=16)
    rng = np.random.default_rng(0)

    def neighbour_fraction(m: np.ndarray) -> float:
        p = np.pad(m, 1)
        nb = p[:-2, 1:-1] & p[1:-1, 1:-1] | p[2:, 1:-1] & p[1:-1, 1:-1]
        nb |= p[1:-1, :-2] & p[1:-1, 1:-1] | p[1:-1, 2:] & p[1:-1, 1:-1]
        return nb.sum() / m.sum()

    block = np.mean([neighbour_fraction(gen(rng)) for _ in range(50)])
    rand = []
    for _ in range(50):
        m = np.zeros(196, bool)
        m[rng.choice(196, 78, replace=False)] = True
        rand.append(neighbour_fraction(m.reshape(14, 14)))
    assert block > 0.95 > np.mean(rand) + 0.1


def test_single_block_shape_follows_area_and_aspect() -> None:
    # With the budget fixed to the block size and a flat aspect range, one block is placed whole.
    gen = BlockMaskingGenerator(14, num_masking_patches=16, min_num_patches=16, min_aspect=1.0, max_aspect=1.0)
    m = gen(np.random.default_rng(3))
    ys, xs = np.nonzero(m)
    assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (4, 4)


def test_block_mask_aspect_ratios_within_bounds() -> None:
    # A first block alone (budget = its max area) has h/w within the aspect range up to rounding.
    gen = BlockMaskingGenerator(14, num_masking_patches=30, min_num_patches=30, min_aspect=0.3)
    rng = np.random.default_rng(5)
    for _ in range(30):
        mask = np.zeros((14, 14), bool)
        gen._place_block(mask, 30, rng)
        ys, xs = np.nonzero(mask)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert h * w == mask.sum()  # one solid rectangle
        assert 0.3 * 0.5 <= h / w <= (1 / 0.3) * 2
        assert abs(h * w - 30) <= h + w  # rounding of sqrt(area*aspect) and sqrt(area/aspect)


def test_block_mask_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockMaskingGenerator(4, num_masking_patches=17)


SPECIAL = [0, 1, 2, 99]  # bos, pad, eos, mask in a toy vocab of 100


def _toy_ids(lengths: list[int], max_len: int = 40) -> torch.Tensor:
    ids = torch.full((len(lengths), max_len), 1)
    g = torch.Generator().manual_seed(0)
    for r, n in enumerate(lengths):
        ids[r, 0] = 0
        ids[r, 1 : n + 1] = torch.randint(3, 99, (n,), generator=g)
        ids[r, n + 1] = 2
    return ids


def test_mlm_exact_counts_and_never_special() -> None:
    lengths = [1, 2, 5, 10, 20, 38, 0]
    ids = _toy_ids(lengths)
    out, labels = mlm_mask(
        ids,
        mask_id=99,
        vocab_size=100,
        special_ids=SPECIAL,
        ratio=0.15,
        generator=torch.Generator().manual_seed(1),
    )
    chosen = labels != IGNORE_INDEX
    for r, n in enumerate(lengths):
        assert int(chosen[r].sum()) == (max(1, round(0.15 * n)) if n else 0)
    assert not torch.isin(ids[chosen], torch.tensor(SPECIAL)).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(out[~chosen], ids[~chosen])  # unchosen positions untouched (pad, bos, eos too)


def test_mlm_80_10_10_statistics() -> None:
    ids = _toy_ids([38] * 2000)
    g = torch.Generator().manual_seed(0)
    out, labels = mlm_mask(ids, mask_id=99, vocab_size=100, special_ids=SPECIAL, ratio=0.5, generator=g)
    chosen = labels != IGNORE_INDEX
    n = int(chosen.sum())
    assert n == 2000 * 19
    masked = (out[chosen] == 99).float().mean().item()
    kept = (out[chosen] == ids[chosen]).float().mean().item()
    # A random replacement may draw the original id (1 / 96): it then counts as "kept".
    randomised = 1 - masked - kept
    tol = 4 * math.sqrt(0.1 * 0.9 / n)
    assert masked == pytest.approx(0.8, abs=4 * math.sqrt(0.16 / n))
    assert randomised == pytest.approx(0.1 * 95 / 96, abs=tol)
    assert kept == pytest.approx(0.1 + 0.1 / 96, abs=tol)
    replaced = out[chosen & (out != 99) & (out != ids)]
    assert not torch.isin(replaced, torch.tensor(SPECIAL)).any()
    assert replaced.min() >= 3 and replaced.max() < 99


def test_mlm_random_tokens_skip_specials_in_the_middle() -> None:
    # Specials scattered inside the vocabulary (SentencePiece/fairseq style) are never drawn.
    ids = torch.full((500, 30), 50)
    special = [0, 1, 2, 3, 10, 20]
    out, labels = mlm_mask(
        ids,
        mask_id=20,
        vocab_size=30,
        special_ids=special,
        ratio=1.0,
        replace_prob=0.0,
        random_prob=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    vals = set(out.unique().tolist())
    assert vals.isdisjoint(special)
    assert vals <= set(range(30))
    assert len(vals) == 30 - len(special)  # all regular ids reachable
