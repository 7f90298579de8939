"""Checkpoints of expert-parallel runs hold every expert, as an unsharded run's would.

With expert parallelism (:func:`vlmoe.moe.parallel.shard_experts`) each rank keeps only its own
experts, while Lightning writes the checkpoint from rank 0 alone. Before the write, the sharded
parameters (and their AdamW moments) are gathered from all ranks into the full tensors; when a
sharded run loads a checkpoint, each rank cuts its own rows back out. So a checkpoint is the same
whether it was written with or without expert parallelism, on any number of ranks: it exports with
``vlmoe export`` and resumes on another world size.

Every expert tensor (grouped ``(E, ...)`` weights, or the flat per-expert blocks of heterogeneous
experts) is sharded along dim 0 in rank order, so gathering is a rank-ordered concatenation of
dim-0 blocks whose sizes are exchanged first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["gather_expert_state", "is_sharded", "slice_expert_state"]


def is_sharded(p: Tensor) -> bool:
    return bool(getattr(p, "expert_parallel", False))


def _comm_device() -> torch.device:
    from vlmoe.moe.parallel import comm_device

    return comm_device()


def _row_counts(local_rows: int) -> list[int]:
    t = torch.tensor([local_rows], dtype=torch.long, device=_comm_device())
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(x) for x in out]


def gather_rows(local: Tensor) -> Tensor:
    """Concatenate every rank's ``local`` along dim 0 in rank order (dim-0 sizes may differ)."""
    local = local.to(_comm_device())
    counts = _row_counts(local.shape[0])
    width = max(counts)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)


def local_rows(full: Tensor, local_size: int) -> Tensor:
    """This rank's dim-0 block of ``full`` (the inverse of :func:`gather_rows`)."""
    counts = _row_counts(local_size)
    if sum(counts) != full.shape[0]:
        raise ValueError(
            f"checkpoint tensor has {full.shape[0]} rows along dim 0, but the ranks' expert shards hold "
            f"{counts} (sum {sum(counts)}): the checkpoint was written for another expert count"
        )
    start = sum(counts[: dist.get_rank()])
    return full[start : start + local_size].clone()


def gather_expert_state(
    module: nn.Module, checkpoint: dict[str, Any], optimizer_params: Sequence[Sequence[nn.Parameter]]
) -> None:
    """Replace the sharded tensors of ``checkpoint`` (model and optimizer moments) by the full ones.

    Args:
        module: the LightningModule (its ``named_parameters`` names match ``checkpoint["state_dict"]``).
        checkpoint: the dict Lightning is about to write (modified in place, on every rank).
        optimizer_params: per optimizer, its parameters in ``state_dict`` index order.
    """
    sd = checkpoint["state_dict"]
    for name, p in module.named_parameters():
        if is_sharded(p):
            sd[name] = gather_rows(sd[name]).cpu()
    for opt_state, params in zip(checkpoint.get("optimizer_states", []), optimizer_params):
        state = opt_state["state"]
        for idx, p in enumerate(params):
            if not is_sharded(p):
                continue
            # A new dict: the optimizer's state_dict() hands out its live per-parameter dicts, which
            # must keep their local tensors. A moment not created yet joins the collective as zeros.
            entry = dict(state.get(idx, {}))
            for key in ("exp_avg", "exp_avg_sq"):
                local = entry.get(key)
                local = torch.zeros_like(p) if local is None else local
                entry[key] = gather_rows(local).cpu()
            state[idx] = entry
    checkpoint["expert_parallel_gathered"] = True


def slice_expert_state(
    module: nn.Module, checkpoint: dict[str, Any], optimizer_params: Sequence[Sequence[nn.Parameter]]
) -> None:
    """Cut this rank's rows out of the full expert tensors of a checkpoint (in place, every rank)."""
    sd = checkpoint["state_dict"]
    for name, p in module.named_parameters():
        if is_sharded(p) and name in sd:
            sd[name] = local_rows(sd[name], p.shape[0])
    for opt_state, params in zip(checkpoint.get("optimizer_states", []), optimizer_params):
        state = opt_state["state"]
        for idx, p in enumerate(params):
            if not is_sharded(p):
                continue
            entry = state.get(idx, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in entry:
                    entry[key] = local_rows(entry[key], p.shape[0])
