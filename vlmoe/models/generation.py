"""Autoregressive decoding: greedy and beam search over any next-token model.

The searches only need a :class:`DecodeState`: ``log_probs(tokens)`` gives the next-token
log-probabilities of every row from the tokens so far, ``reorder(index)`` makes the state follow a
new arrangement of rows (beams picked, or one row per image expanded into ``num_beams`` rows). The
captioning model provides a cached state (the image is encoded once, each step feeds only the new
token and a ``[MASK]`` slot through the blocks: :meth:`~vlmoe.models.VLMoEForCaptioning.decode_state`)
and a naive one (the whole sequence re-encoded every step), which must give the same tokens.

Beam search follows BEiT-3's captioning decoder (the beam search of the early Hugging Face
``generate``): every step takes the ``2 * num_beams`` best (beam, token) continuations of an image
over ``beam score + log p``; a continuation that ends in ``eos`` among the first ``num_beams`` becomes
a finished hypothesis scored ``sum log p / len ** length_penalty`` with ``len`` the hypothesis'
tokens (``bos`` included, ``eos`` not), the others refill the ``num_beams`` live beams. An image is
done when it has ``num_beams`` finished hypotheses and the best live beam, length-normalised at the
current length, cannot beat the worst of them; at ``max_len`` the live beams are finished as they
are. The best-scoring hypothesis is returned.

``max_len`` counts every token of the sequence, ``bos`` and ``eos`` included (as the captions of
training are segmented), so at most ``max_len - 1`` tokens are generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["DecodeState", "GenerationOutput", "beam_search", "generate", "greedy_search"]


class DecodeState(Protocol):
    """What a search needs of a model."""

    def log_probs(self, tokens: Tensor) -> Tensor:
        """``(N, t)`` tokens of every row so far (``bos`` first) -> ``(N, V)`` next-token log-probs."""

    def reorder(self, index: Tensor) -> None:
        """Row ``i`` continues old row ``index[i]`` (``len(index)`` may differ from the rows held)."""


@dataclass
class GenerationOutput:
    """Per input row: the generated ids (no ``bos``, no ``eos``, no padding) and the sequence score
    (greedy: the sum of log-probs; beam: that sum over ``len ** length_penalty``)."""

    tokens: list[list[int]]
    scores: list[float]


def _strip(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos)] if eos in row else row


@torch.no_grad()
def greedy_search(state: DecodeState, batch_size: int, bos: int, eos: int, max_len: int,
                  device: torch.device | str = "cpu") -> GenerationOutput:
    """The most likely token at every step until ``eos`` or ``max_len`` (see the module docstring)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (bos + one token), got {max_len}")
    tokens = torch.full((batch_size, 1), bos, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    score = torch.zeros(batch_size, dtype=torch.float64, device=device)
    for _ in range(max_len - 1):
        lp = state.log_probs(tokens)
        best, nxt = lp.max(dim=-1)
        score += torch.where(done, 0.0, best.double())
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    rows = [_strip(r[1:], eos) for r in tokens.tolist()]
    return GenerationOutput(rows, score.tolist())


class _Hypotheses:
    """The ``num_beams`` best finished hypotheses of one image."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.items: list[tuple[float, list[int]]] = []

    def add(self, tokens: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / len(tokens) ** self.length_penalty
        if len(self.items) < self.num_beams or score > self.worst:
            self.items.append((score, tokens))
            self.items.sort(key=lambda x: -x[0])
            del self.items[self.num_beams :]

    @property
    def worst(self) -> float:
        return self.items[-1][0] if self.items else -float("inf")

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.items) < self.num_beams:
            return False
        return self.worst >= best_sum_logprobs / cur_len**self.length_penalty


@torch.no_grad()
def beam_search(state: DecodeState, batch_size: int, bos: int, eos: int, max_len: int, num_beams: int = 3,
                length_penalty: float = 0.6, device: torch.device | str = "cpu") -> GenerationOutput:
    """Beam search (see the module docstring). The first step runs on one row per image (the state
    is then expanded to ``num_beams`` rows per image), so an image is encoded once."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (bos + one token), got {max_len}")
    B, K = batch_size, num_beams
    tokens = torch.full((B, 1), bos, dtype=torch.long, device=device)
    lp = state.log_probs(tokens).double()  # (B, V)
    V = lp.shape[-1]
    expand = torch.arange(B, device=device).repeat_interleave(K)
    state.reorder(expand)
    tokens, lp = tokens[expand], lp[expand]
    beam_scores = torch.zeros(B, K, dtype=torch.float64, device=device)
    beam_scores[:, 1:] = -float("inf")  # the K copies of an image start as one beam
    hyps = [_Hypotheses(K, length_penalty) for _ in range(B)]
    done = [False] * B
    for _ in range(max_len - 1):
        cur_len = tokens.shape[1]
        # lp (B*K, V) -> (B, K, V), + beam scores (B, K, 1) -> (B, K*V)
        scores = (beam_scores[:, :, None] + lp.view(B, K, V)).view(B, K * V)
        top_scores, top_idx = scores.topk(2 * K, dim=1)
        top_beam, top_tok = (top_idx // V).tolist(), (top_idx % V).tolist()
        top_scores_l = top_scores.tolist()
        next_scores, next_tok, next_src = [], [], []
        rows = tokens.tolist()
        for b in range(B):
            if done[b]:
                next_scores += [0.0] * K
                next_tok += [eos] * K
                next_src += [b * K] * K
                continue
            chosen = 0
            for rank, (s, beam, tok) in enumerate(zip(top_scores_l[b], top_beam[b], top_tok[b])):
                src = b * K + beam
                if tok == eos:
                    if rank < K:
                        hyps[b].add(rows[src], s)
                else:
                    next_scores.append(s)
                    next_tok.append(tok)
                    next_src.append(src)
                    chosen += 1
                if chosen == K:
                    break
            done[b] = hyps[b].is_done(max(top_scores_l[b]), cur_len)
        if all(done):
            break
        src = torch.tensor(next_src, device=device)
        tokens = torch.cat([tokens[src], torch.tensor(next_tok, device=device)[:, None]], dim=1)
        # next_scores (B*K,) -> (B, K)
        beam_scores = torch.tensor(next_scores, dtype=torch.float64, device=device).view(B, K)
        if tokens.shape[1] >= max_len:
            break
        state.reorder(src)
        lp = state.log_probs(tokens).double()
    # images still open at max_len: their live beams are finished as they are
    rows = tokens.tolist()
    for b in range(B):
        if not done[b]:
            for k in range(K):
                if beam_scores[b, k] > -float("inf"):
                    hyps[b].add(rows[b * K + k], float(beam_scores[b, k]))
    out_tokens, out_scores = [], []
    for h in hyps:
        score, best = h.items[0]
        out_tokens.append(_strip(best[1:], eos))
        out_scores.append(score)
    return GenerationOutput(out_tokens, out_scores)


def generate(state: DecodeState, batch_size: int, bos: int, eos: int, max_len: int = 32, num_beams: int = 3,
             length_penalty: float = 0.6, device: torch.device | str = "cpu") -> GenerationOutput:
    """Greedy search for ``num_beams == 1``, beam search otherwise."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams == 1:
        return greedy_search(state, batch_size, bos, eos, max_len, device)
    return beam_search(state, batch_size, bos, eos, max_len, num_beams, length_penalty, device)
