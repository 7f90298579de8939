"""Routing statistics and the auxiliary output of MoE layers.

Expert activation ratio (our definition, precise and recomputable)
-------------------------------------------------------------------
For one MoE layer and a set of batches, let ``c_e`` be the number of routed (sub-)token
*assignments* that expert e received (each routed token - or MH-MoE sub-token - contributes k
assignments; padding is never routed; counts are taken before capacity dropping), and
``C = sum_e c_e``. Expert e is *activated* when its share reaches a fraction tau of the uniform share:

    c_e >= tau * C / E          (tau = 0.1 by default)

The layer's activation ratio is the fraction of its E experts that are activated. Counts are
aggregated over batches by summing ``c_e`` *before* thresholding; a model's ratio is the mean over
its MoE layers (``RoutingStatsAccumulator`` reports both). Because the threshold is relative to the
uniform share, the metric does not favour MH-MoE for making h selections per token, which is the flaw
of the loosely defined figure in the MH-MoE paper.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def activation_ratio(counts: Tensor, tau: float = 0.1) -> float:
    """Fraction of experts whose assignment count is >= tau * (uniform share). 0 when nothing routed."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return 0.0
    return float((counts >= tau * total / counts.numel()).double().mean())


def load_entropy(counts: Tensor) -> float:
    """Entropy of the load distribution normalised by log E (1 = perfectly uniform, 0 = one expert)."""
    counts = counts.double()
    E = counts.numel()
    total = counts.sum()
    if total <= 0 or E < 2:
        return 0.0 if total <= 0 else 1.0
    p = counts / total
    h = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return float(h / torch.log(torch.tensor(float(E), dtype=torch.float64)))


def load_cv(counts: Tensor) -> float:
    """Coefficient of variation (std / mean, population std) of the per-expert load."""
    counts = counts.double()
    mean = counts.mean()
    if mean <= 0:
        return 0.0
    return float(counts.std(unbiased=False) / mean)


@dataclass
class RoutingStats:
    """One layer's routing in one forward pass (tensors stay on the layer's device)."""

    tokens_per_expert: Tensor
    """(E,) routed assignments per expert, before capacity dropping."""
    dropped: Tensor
    """() assignments dropped by the capacity limit."""
    routed_tokens: int
    """Routed (non-padding) tokens, or sub-tokens for MH-MoE."""
    top_k: int
    name: str = ""
    expert_params: Tensor | None = None
    """(E,) parameters of each expert (for activated parameters per token; HMoE)."""
    expert_sizes: tuple[int, ...] | None = None
    """Hidden width of each expert (for per-size-class load; HMoE)."""
    passes_per_token: Tensor | None = None
    """(L,) Stratified MoE: number of tokens that went through 1, 2, ..., L expert passes."""
    nonfinite: Tensor | None = None
    """() bool on the layer's device: the router produced NaN / inf logits in this call (recorded
    when the layer defers its finiteness check to the caller, see :func:`defer_finite_checks`)."""
    assignments: Tensor | None = None
    """(T * h, k) expert ids chosen for each routed (sub-)token of this call, in token order (the h
    sub-tokens of a token are consecutive); recorded only while the layer's ``record_assignments`` is
    set (routing analysis), never in training."""

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.numel()

    def activated_params_per_token(self) -> float:
        """Mean expert parameters a routed (sub-)token activates (the HMoE paper's headline)."""
        if self.expert_params is None or self.routed_tokens == 0:
            return 0.0
        c = self.tokens_per_expert.detach().double().cpu()
        return float((c * self.expert_params.double().cpu()).sum() / self.routed_tokens)

    def load_by_size(self) -> dict[int, int]:
        """Routed assignments per expert size class."""
        sizes = self.expert_sizes or (0,) * self.num_experts
        out: dict[int, int] = {}
        for s, c in zip(sizes, self.tokens_per_expert.tolist()):
            out[s] = out.get(s, 0) + int(c)
        return out

    def mean_passes(self) -> float:
        """Stratified MoE: mean number of expert passes per token."""
        if self.passes_per_token is None:
            return float(self.top_k)
        h = self.passes_per_token.double().cpu()
        n = h.sum()
        return float((h * torch.arange(1, h.numel() + 1, dtype=torch.float64)).sum() / n) if n > 0 else 0.0

    def activation_ratio(self, tau: float = 0.1) -> float:
        return activation_ratio(self.tokens_per_expert.detach().cpu(), tau)

    def load_entropy(self) -> float:
        return load_entropy(self.tokens_per_expert.detach().cpu())

    def load_cv(self) -> float:
        return load_cv(self.tokens_per_expert.detach().cpu())


@dataclass
class MoEAux:
    """Auxiliary output of one MoE layer, or the sum over several layers (``a + b``).

    ``loss`` is the weighted sum of the auxiliary losses, ready to be added to the task loss;
    ``losses`` holds the weighted components (``balance``, ``z``, ...) for logging; ``stats`` has
    one :class:`RoutingStats` per layer call in the sum.
    """

    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: tuple[RoutingStats, ...] = ()

    @classmethod
    def zero(cls, device: torch.device | str | None = None) -> MoEAux:
        return cls(loss=torch.zeros((), device=device))

    def __add__(self, other: MoEAux) -> MoEAux:
        if not isinstance(other, MoEAux):
            return NotImplemented
        losses = dict(self.losses)
        for k, v in other.losses.items():
            losses[k] = losses[k] + v if k in losses else v
        return MoEAux(loss=self.loss + other.loss, losses=losses, stats=self.stats + other.stats)

    def __radd__(self, other):  # sum([...]) starts from 0
        if isinstance(other, (int, float)) and other == 0:
            return self
        return NotImplemented

    def _single(self) -> RoutingStats:
        if len(self.stats) != 1:
            raise ValueError(
                f"this MoEAux sums {len(self.stats)} layer calls; read aux.stats[i] for one layer"
            )
        return self.stats[0]

    @property
    def tokens_per_expert(self) -> Tensor:
        return self._single().tokens_per_expert

    @property
    def dropped_tokens(self) -> Tensor:
        """Dropped assignments summed over every layer call in this aux."""
        if not self.stats:
            return self.loss.new_zeros((), dtype=torch.long)
        return torch.stack([s.dropped.to(self.loss.device) for s in self.stats]).sum()


class RoutingStatsAccumulator:
    """Sums per-layer expert counts over batches; reports per-layer and model-level metrics.

    Counts stay on the device they come from (no host sync per update); :meth:`all_reduce` sums
    them over processes, and the metrics read them once.
    """

    def __init__(self, tau: float = 0.1) -> None:
        self.tau = tau
        self.counts: OrderedDict[str, Tensor] = OrderedDict()
        self.dropped: OrderedDict[str, int] = OrderedDict()
        self.routed: OrderedDict[str, int] = OrderedDict()
        # what some layers also report: expert parameters x routed tokens (HMoE), the histogram of expert
        # passes per token (Stratified), [distinct experts summed over tokens, tokens] (MH-MoE, from the
        # recorded assignments)
        self.params: dict[str, float] = {}
        self.passes: dict[str, Tensor] = {}
        self.distinct: dict[str, list[float]] = {}

    def update(self, aux: MoEAux | RoutingStats | list[RoutingStats], heads: int = 1) -> None:
        """Add one forward's statistics (``heads``: the MH-MoE heads of the layer, to count the distinct
        experts of a token's sub-tokens when the layer recorded its assignments)."""
        items = aux.stats if isinstance(aux, MoEAux) else ([aux] if isinstance(aux, RoutingStats) else aux)
        for i, s in enumerate(items):
            name = s.name or f"layer{i}"
            c = s.tokens_per_expert.detach().long()
            prev = self.counts.get(name)
            self.counts[name] = c.clone() if prev is None or prev.shape != c.shape else prev + c.to(prev.device)
            self.dropped[name] = self.dropped.get(name, 0) + int(s.dropped)  # a CPU scalar: no device sync
            self.routed[name] = self.routed.get(name, 0) + int(s.routed_tokens)
            if s.expert_params is not None and s.routed_tokens:
                self.params[name] = self.params.get(name, 0.0) + s.activated_params_per_token() * s.routed_tokens
            if s.passes_per_token is not None:
                p = s.passes_per_token.detach().long().cpu()
                self.passes[name] = self.passes[name] + p if name in self.passes else p.clone()
            if s.assignments is not None and heads > 1:
                a = s.assignments.reshape(-1, heads * s.assignments.shape[1]).cpu()  # (T, h*k): one row a token
                distinct = (a.sort(dim=1).values.diff(dim=1) != 0).sum(dim=1) + 1
                acc = self.distinct.setdefault(name, [0.0, 0.0])
                acc[0] += float(distinct.sum())
                acc[1] += float(a.shape[0])

    def all_reduce(self, reduce: Callable[[Tensor], Tensor]) -> None:
        """Sum every layer's counts over processes with ``reduce`` (e.g. ``lambda t: strategy.reduce(t,
        reduce_op="sum")``); every process must hold the same layers (it does: they run one model)."""
        names = sorted(self.counts)
        if not names:
            return
        device = self.counts[names[0]].device
        flat = torch.cat(
            [torch.cat([self.counts[n].to(device, torch.float64),
                        torch.tensor([self.dropped[n], self.routed[n]], dtype=torch.float64, device=device)])
             for n in names]
        )
        flat = reduce(flat)
        offset = 0
        for n in names:
            e = self.counts[n].numel()
            self.counts[n] = flat[offset : offset + e].round().long()
            self.dropped[n] = int(flat[offset + e].round())
            self.routed[n] = int(flat[offset + e + 1].round())
            offset += e + 2

    def reset(self) -> None:
        self.counts.clear()
        self.dropped.clear()
        self.routed.clear()
        self.params.clear()
        self.passes.clear()
        self.distinct.clear()

    def layers(self) -> dict[str, dict[str, Any]]:
        """Per layer everything summed: ``counts``, ``load`` (shares), the activation ratio, load entropy
        and CV, ``dropped``, ``routed_tokens``, and where the layer reports them
        ``activated_params_per_token``, ``distinct_experts_per_token``, ``passes_per_token`` (histogram)
        and ``mean_passes``."""
        out = {}
        for name, c in self.counts.items():
            c = c.cpu()
            total = int(c.sum())
            row: dict[str, Any] = {
                "counts": c.tolist(),
                "load": [float(x) / total if total else 0.0 for x in c.tolist()],
                "activation_ratio": activation_ratio(c, self.tau),
                "load_entropy": load_entropy(c),
                "load_cv": load_cv(c),
                "dropped": self.dropped[name],
                "routed_tokens": self.routed[name],
            }
            if name in self.params and self.routed[name]:
                row["activated_params_per_token"] = self.params[name] / self.routed[name]
            if name in self.distinct and self.distinct[name][1]:
                row["distinct_experts_per_token"] = self.distinct[name][0] / self.distinct[name][1]
            if name in self.passes:
                h = self.passes[name].double()
                row["passes_per_token"] = h.tolist()
                row["mean_passes"] = float((h * torch.arange(1, h.numel() + 1)).sum() / h.sum()) if h.sum() else 0.0
            out[name] = row
        return out

    def per_layer(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, c in self.counts.items():
            c = c.cpu()
            out[name] = {
                "activation_ratio": activation_ratio(c, self.tau),
                "load_entropy": load_entropy(c),
                "load_cv": load_cv(c),
                "dropped": float(self.dropped[name]),
                "routed_tokens": float(self.routed[name]),
            }
        return out

    def summary(self) -> dict[str, float]:
        layers = self.per_layer()
        if not layers:
            return {}
        n = len(layers)
        return {
            "activation_ratio": sum(v["activation_ratio"] for v in layers.values()) / n,
            "load_entropy": sum(v["load_entropy"] for v in layers.values()) / n,
            "load_cv": sum(v["load_cv"] for v in layers.values()) / n,
            "dropped": sum(v["dropped"] for v in layers.values()),
        }
