"""Distributed strategies preconfigured for the multiway backbone (selectable from YAML by class path)."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import FSDPStrategy

from vlmoe.models import MultiwayBlock

__all__ = ["MultiwayFSDPStrategy"]


class MultiwayFSDPStrategy(FSDPStrategy):
    """FSDP with one sharding unit per :class:`~vlmoe.models.MultiwayBlock`.

    Wrapping per block keeps a block's parameters (attention, both modality FFNs / expert pools)
    gathered together for its forward, and frees them before the next block; a YAML file cannot name
    a set of classes for ``auto_wrap_policy``, hence this class.

    Args:
        sharding_strategy: ``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD`` or ``NO_SHARD``.
        activation_checkpointing: recompute each block's activations in backward.
        state_dict_type: ``sharded`` (a folder of per-rank files per checkpoint; resume on the same
            world size) or ``full`` (one file gathered on rank 0).
        **kwargs: other :class:`~lightning.pytorch.strategies.FSDPStrategy` arguments.
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        activation_checkpointing: bool = False,
        state_dict_type: Literal["full", "sharded"] = "sharded",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            sharding_strategy=sharding_strategy,
            auto_wrap_policy={MultiwayBlock},
            activation_checkpointing_policy={MultiwayBlock} if activation_checkpointing else None,
            state_dict_type=state_dict_type,
            **kwargs,
        )
