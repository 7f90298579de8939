"""The optimizer and schedule of vlmoe's tasks.

- :func:`param_groups`: AdamW parameter groups with layer-wise lr decay (BEiT / BEiT-3
  ``optim_factory``: ``scale = decay ** (num_layers + 1 - layer_id)``, the layer id read off the
  backbone's :meth:`~vlmoe.models.VLMoE.layer_id`) and no weight decay for 1-D parameters, biases and
  the names the model lists in ``no_weight_decay()``.
- :func:`adamw`: ``torch.optim.AdamW`` with its fused kernel where every parameter allows it.
- :func:`warmup_cosine`: linear warmup from 0, then cosine down to ``min_lr`` (BEiT-3
  ``cosine_scheduler``), stepped every optimizer step.

Plain torch (no Lightning): :class:`~vlmoe.tasks.base.VLMoETask` wires them into
``configure_optimizers``; a training loop of one's own can use them as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["AdamW", "adamw", "fused_adamw_takes", "param_groups", "warmup_cosine"]


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    *,
    layer_id: Callable[[str], int] | None = None,
    num_layers: int | None = None,
    no_weight_decay: Iterable[str] = (),
    prefix: str = "",
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise lr decay and selective weight decay.

    Args:
        model: the module whose trainable parameters are grouped.
        weight_decay: decay of the matrix parameters.
        layer_decay: lr multiplier per layer below the top (1.0: off).
        layer_id: parameter name -> layer index (0 = embeddings, ``num_layers + 1`` = heads);
            required when ``layer_decay != 1``.
        num_layers: the number of transformer blocks (``layer_id`` runs to ``num_layers + 1``).
        no_weight_decay: parameter names exempt from weight decay (besides 1-D parameters / biases).
        prefix: stripped from names before ``layer_id`` / ``no_weight_decay`` see them (e.g. the
            attribute the backbone lives under in a task).

    Returns:
        One dict per (layer, decay) combination with ``params``, ``weight_decay``, ``lr_scale``
        and ``names`` (for inspection; optimizers ignore unknown keys).
    """
    if layer_decay != 1.0 and (layer_id is None or num_layers is None):
        raise ValueError("layer_decay != 1 needs layer_id and num_layers")
    skip = set(no_weight_decay)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        short = name[len(prefix) :] if prefix and name.startswith(prefix) else name
        # Norm weights, biases, positions and tokens are 1-D or listed by the model: decaying them
        # only pulls the network towards zero-mean activations without regularising capacity.
        decay = not (p.ndim <= 1 or short.endswith(".bias") or short in skip)
        lid = layer_id(short) if layer_id is not None and num_layers is not None else 0
        key = (lid, decay)
        if key not in groups:
            scale = layer_decay ** ((num_layers or 0) + 1 - lid) if layer_decay != 1.0 else 1.0
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _storage_order(t: Tensor) -> list[int] | None:
    """The permutation of ``t``'s dims that makes it contiguous (None: it is, or no permutation does)."""
    if t.is_contiguous():
        return None
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))
    return order if t.permute(order).is_contiguous() else None


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that hands a dense but permuted parameter - e.g. the experts' ``w1`` stored
    as each expert's (out, in) matrix behind an (E, in, out) view - to the update as the contiguous
    permutation of its memory, together with its gradient and moments when they share its strides.

    The update is element-wise, so nothing changes but speed: torch's fused kernel runs ~6x slower on a
    non-contiguous tensor (8 x 768 x 3072 on CPU: 57 ms, against 9 ms handed over contiguous;
    BENCHMARKS.md, "the optimizer step"). The optimizer's state is the same tensors. Gradients and
    moments in another layout than their parameter are first copied into its layout (see
    :meth:`_match_layouts`).
    """

    def _match_layouts(self, group: dict[str, Any]) -> None:
        """Give every gradient and moment its parameter's strides (copied, where they differ).

        torch's fused AdamW kernel (CPU; 2.14) pairs the elements of a parameter, its gradient and its
        moments by memory position, not by index: a moment in another layout than its parameter is
        updated with the wrong elements, silently. That happens after a resume - moments gathered by
        expert parallelism, or written for another ``w1`` layout, are contiguous, the parameter
        is not - and for a gradient assigned by hand; foreach and the loop index correctly.
        """
        for p in group["params"]:
            if p.grad is None or not (p.is_contiguous() or _storage_order(p) is not None):
                continue
            if p.grad.shape == p.shape and p.grad.stride() != p.stride():
                p.grad = torch.empty_like(p, dtype=p.grad.dtype).copy_(p.grad)
            state = self.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype, device=value.device).copy_(value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the moments and hyperparameters, keeping this optimizer's implementation (``fused`` /
        ``foreach``: a choice of the running process, not state - a checkpoint written by a ``foreach``
        optimizer would otherwise switch a fused one back)."""
        impl = [(g["fused"], g["foreach"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, (fused, foreach) in zip(self.param_groups, impl):
            g["fused"], g["foreach"] = fused, foreach
            for p in g["params"] if fused else ():
                step = self.state.get(p, {}).get("step")
                if isinstance(step, Tensor) and step.device != p.device:  # the fused kernel wants it there
                    self.state[p]["step"] = step.to(p.device, torch.float32)

    def _init_group(self, group, params, grads, *lists):  # noqa: ANN001 - torch's private signature
        self._match_layouts(group)
        out = super()._init_group(group, params, grads, *lists)
        per_param = [params, grads, *(x for x in lists if isinstance(x, list) and len(x) == len(params))]
        for i, p in enumerate(params):
            order = _storage_order(p)
            if order is None:
                continue
            # the parameter-shaped entries (not the step counts): all must share the parameter's strides
            same = [x for x in per_param if isinstance(x[i], Tensor) and x[i].dim() == p.dim()]
            if all(x[i].shape == p.shape and x[i].stride() == p.stride() for x in same):
                for x in same:
                    x[i] = x[i].permute(order)  # p's dims in storage order: a contiguous view
        return out


def fused_adamw_takes(tensors: Iterable[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes every one of ``tensors`` (floating, on the CPU or CUDA)."""
    tensors = list(tensors)
    return bool(tensors) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)


def adamw(params: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """:class:`AdamW` ``(params, **kwargs)`` with ``fused=True`` when every parameter is a floating
    tensor on the CPU or a CUDA device, else ``foreach=True``.

    The fused kernel reads each parameter, its gradient and both moments once and writes them back:
    on CPU it is 2-4x faster than torch's default there (a loop over the tensors) and than
    ``foreach``, which also allocates temporaries the size of the parameters (BENCHMARKS.md, "the
    optimizer step"); the update is the loop's to rounding (``tests/tasks/test_base.py``).
    """
    params = list(params)
    if fused_adamw_takes(p for g in params for p in (g["params"] if isinstance(g, Mapping) else [g])):
        kwargs.setdefault("fused", True)
    else:
        kwargs.setdefault("foreach", True)
    return AdamW(params, **kwargs)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier of step ``s``: ``s / warmup`` during warmup, then cosine from 1 to ``min_ratio``.

    Args:
        warmup_steps: linear warmup length (optimizer steps).
        total_steps: the step at which the cosine reaches ``min_ratio``; later steps stay there.
        min_ratio: final lr / peak lr.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps))

    def f(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
