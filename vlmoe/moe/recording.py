"""Recording what a model's MoE layers route: one context manager for every analysis.

    with record_routing(model) as acc:          # a RoutingStatsAccumulator summing every MoE layer's stats
        model(image=images)
    acc.layers()                                # counts, load, activation ratio, ... per layer

While active, every :class:`~vlmoe.moe.MoE` layer of ``model`` (or the ``layers`` given) records each
routed (sub-)token's experts (``record_assignments``) and a forward hook adds the layer's statistics to
the accumulator and hands them, with the layer and the forward's arguments, to ``on_stats``; on exit the
hooks are removed and every layer's recording is set back as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .layer import MoE
from .stats import RoutingStats, RoutingStatsAccumulator

__all__ = ["record_routing"]

OnStats = Callable[[MoE, RoutingStats, tuple[Any, ...], dict[str, Any]], None]


@contextmanager
def record_routing(
    model: nn.Module,
    accumulator: RoutingStatsAccumulator | None = None,
    *,
    on_stats: OnStats | None = None,
    layers: Iterable[MoE] | None = None,
    assignments: bool = True,
) -> Iterator[RoutingStatsAccumulator]:
    """Sum the routing statistics of ``model``'s MoE layers over the forwards run inside the block.

    Args:
        model: any module holding MoE layers.
        accumulator: the accumulator to add to (default: a new one); yielded.
        on_stats: called per layer call and statistics record as ``on_stats(layer, stats, args, kwargs)``
            (the layer's forward arguments), e.g. to attribute each token's experts to its sample.
        layers: only these MoE layers (default: every one in ``model``).
        assignments: have the layers record each (sub-)token's experts (``RoutingStats.assignments``).
    """
    acc = accumulator if accumulator is not None else RoutingStatsAccumulator()
    moes = list(layers) if layers is not None else [m for m in model.modules() if isinstance(m, MoE)]

    def hook(module: MoE, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        aux = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        stats = getattr(aux, "stats", None) or ()
        acc.update(list(stats), heads=module.config.heads)
        if on_stats is not None:
            for s in stats:
                on_stats(module, s, args, kwargs)

    before = [m.record_assignments for m in moes]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in moes]
    for m in moes:
        m.record_assignments = assignments
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()
        for m, was in zip(moes, before):
            m.record_assignments = was
