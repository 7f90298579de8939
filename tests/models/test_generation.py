"""Caption decoding: the KV cache, cached == naive decoding (exact tokens, dense and every MoE variant),
beam search against a brute-force search on a hand-made language model, the length penalty."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.utils import VARIANTS
from vlmoe.layers import KVCache
from vlmoe.models import (
    VLMoEConfig,
    VLMoEForCaptioning,
    beam_search,
    captioning_attention_mask,
    create_model,
    greedy_search,
)
from vlmoe.models.generation import _Hypotheses

BOS, EOS, MASK = 1, 2, 3


def test_captioning_mask_is_beit3s_uni_mask() -> None:
    """Hand-built for 3 image and 4 text tokens: 1 = blocked (BEiT-3's ``uni_mask`` after ``1 - mask``)."""
    want = torch.tensor([
        # i  i  i  t  t  t  t
        [0, 0, 0, 1, 1, 1, 1],  # image -> image only
        [0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1],  # text -> image + earlier text (causal)
        [0, 0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(captioning_attention_mask(3, 4), want)


def test_kv_cache_appends_truncates_reorders_and_selects() -> None:
    cache = KVCache(2, reserve=1)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    for layer in cache.layers:
        ka, va = layer.append(k, -k)
        assert torch.equal(ka, k) and torch.equal(va, -k)
    assert cache.length == 3 and cache.batch_size == 2
    new = torch.full((2, 1, 2, 2), 7.0)
    ka, _ = cache[0].append(new, new)  # grows past the reserve
    assert ka.shape == (2, 1, 5, 2) and torch.equal(ka[:, :, :3], k) and torch.equal(ka[:, :, 3:], new)
    cache[1].append(new, new)
    cache.truncate(2)
    assert cache.length == 3
    cache.reorder(torch.tensor([1, 1]), start=1)
    got = cache[0].k[:, :, :3]
    assert torch.equal(got[:, :, 0], k[:, :, 0]) and torch.equal(got[0, :, 1:], k[1, :, 1:])
    cache.select(torch.tensor([0, 0, 1]))
    assert cache.batch_size == 3 and torch.equal(cache[0].k[0], cache[0].k[1])
    with pytest.raises(ValueError, match="cannot drop 4 positions"):
        cache.truncate(4)
    with pytest.raises(ValueError, match="reorder keeps the 3 rows"):
        cache.reorder(torch.tensor([0]))


def _captioner(variant: str, eos_bias: float = 4.0) -> VLMoEForCaptioning:
    name, overrides = VARIANTS[variant]
    torch.manual_seed(0)
    cfg = VLMoEConfig.from_name(name, **overrides).replace(vocab_size=40)
    m = VLMoEForCaptioning(create_model(cfg), bos_id=BOS, eos_id=EOS, mask_id=MASK).double().eval()
    with torch.no_grad():  # a random model that stops at different lengths
        m.mlm_head.weight.mul_(20)
        m.mlm_head.bias[EOS] += eos_bias
    return m


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("beams", [1, 3])
def test_cached_decoding_gives_exactly_the_naive_tokens(variant: str, beams: int) -> None:
    m = _captioner(variant)
    image = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    cached = m.generate(image, max_len=12, num_beams=beams, cached=True)
    naive = m.generate(image, max_len=12, num_beams=beams, cached=False)
    assert cached.tokens == naive.tokens
    assert cached.scores == pytest.approx(naive.scores, abs=1e-9)
    lengths = {len(t) for t in cached.tokens}
    assert len(lengths) > 1 or beams == 3, lengths  # captions of several lengths: eos handled


def test_cached_step_log_probs_equal_full_recomputation() -> None:
    """Every step's distribution, not only the argmax: the cache is exact (fp64)."""
    m = _captioner("mhmoe")
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    cached, naive = m.decode_state(image, cached=True, max_len=8), m.decode_state(image, cached=False)
    tokens = torch.full((2, 1), BOS)
    for step in range(6):
        a, b = cached.log_probs(tokens), naive.log_probs(tokens)
        assert torch.allclose(a, b, atol=1e-10), step
        tokens = torch.cat([tokens, torch.randint(4, 40, (2, 1))], 1)


class BigramLM:
    """log p(next | last token) from a fixed table; stateless (reorder is a no-op)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.logp = table.log_softmax(-1).double()

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logp[tokens[:, -1]]

    def reorder(self, index: torch.Tensor) -> None:
        pass


def _brute_force(lm: BigramLM, max_len: int, alpha: float) -> tuple[list[int], float]:
    """Best ``sum log p / len ** alpha`` over every sequence that ends in eos (or reaches max_len)."""
    V, best = lm.logp.shape[0], (None, -math.inf)
    for n in range(1, max_len):
        for seq in itertools.product(range(V), repeat=n):
            if EOS in seq[:-1]:
                continue
            prev, total = BOS, 0.0
            for t in seq:
                total += float(lm.logp[prev, t])
                prev = t
            ended = seq[-1] == EOS
            if not ended and n < max_len - 1:
                continue
            length = n if ended else n + 1  # bos + tokens (eos not counted)
            score = total / length**alpha
            if score > best[1]:
                best = (list(seq[:-1]) if ended else list(seq), score)
    return best


def test_beam_search_finds_what_greedy_misses_on_a_hand_made_lm() -> None:
    # from bos: 'a' (4) is likelier than 'b' (5), but 'a' continues badly while 'b' ends at once
    V = 6
    table = torch.full((V, V), -20.0)
    table[BOS, 4], table[BOS, 5] = math.log(0.55), math.log(0.45)
    table[4, 0], table[4, 3], table[4, EOS] = math.log(0.34), math.log(0.33), math.log(0.33)
    table[5, EOS] = 0.0
    for t in (0, 3):
        table[t, EOS] = 0.0
    lm = BigramLM(table)
    greedy = greedy_search(lm, 1, BOS, EOS, max_len=5)
    assert greedy.tokens == [[4, 0]]
    beam = beam_search(lm, 1, BOS, EOS, max_len=5, num_beams=3, length_penalty=0.0)
    want, score = _brute_force(lm, 5, 0.0)
    assert beam.tokens == [[5]] == [want] and beam.scores[0] == pytest.approx(score)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_beam_search_matches_brute_force_on_random_lms(alpha: float) -> None:
    torch.manual_seed(1)
    for _ in range(5):
        lm = BigramLM(torch.randn(5, 5) * 2)
        # 125 beams over 5 tokens and at most 3 generated: the search is exhaustive, so it must find the optimum
        out = beam_search(lm, 1, BOS, EOS, max_len=4, num_beams=125, length_penalty=alpha)
        want, score = _brute_force(lm, 4, alpha)
        assert out.scores[0] == pytest.approx(score) and out.tokens[0] == want


def test_length_penalty_arithmetic() -> None:
    h = _Hypotheses(num_beams=2, length_penalty=0.6)
    h.add([BOS, 4, 5], -3.0)  # 3 tokens with bos: -3 / 3 ** 0.6
    h.add([BOS, 4], -2.5)  # -2.5 / 2 ** 0.6
    assert h.items[0][0] == pytest.approx(-3.0 / 3**0.6) and h.items[1][0] == pytest.approx(-2.5 / 2**0.6)
    h.add([BOS], -5.0)  # worse than both: not kept
    assert len(h.items) == 2 and h.worst == pytest.approx(-2.5 / 2**0.6)
    assert h.is_done(best_sum_logprobs=-3.0, cur_len=3) is (h.worst >= -3.0 / 3**0.6)
