"""What every vlmoe LightningModule shares: the optimizer, the schedule, and MoE bookkeeping.

- :func:`param_groups`: AdamW parameter groups with layer-wise lr decay (BEiT / BEiT-3
  ``optim_factory``: ``scale = decay ** (num_layers + 1 - layer_id)``, the layer id read off the
  model's :meth:`~vlmoe.models.VLMoE.layer_id`) and no weight decay for 1-D parameters, biases and
  the names the model lists in ``no_weight_decay()``.
- :func:`warmup_cosine`: linear warmup from 0, then cosine down to ``min_lr`` (BEiT-3
  ``cosine_scheduler``), stepped every optimizer step.
- :class:`VLMoETask`: ``configure_optimizers`` from the above, the MoE auxiliary losses logged term by
  term, per-layer routing statistics (activation ratio, load entropy, load CV, dropped assignments)
  accumulated on the device and logged every ``stats_every`` steps, samples/s and tokens/s, and a
  finiteness check that names the step and the offending loss term.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from vlmoe.moe import (
    MoEAux,
    RoutingStats,
    RoutingStatsAccumulator,
    apply_bias_updates,
    defer_bias_updates,
    defer_finite_checks,
)

__all__ = ["NonFiniteLossError", "VLMoETask", "param_groups", "warmup_cosine"]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; raised before the optimizer could apply it."""


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


class VLMoETask(pl.LightningModule):
    """Base LightningModule of vlmoe tasks. Subclasses set ``self.model`` (a :class:`~vlmoe.models.VLMoE`).

    Args:
        lr: peak learning rate.
        min_lr: final learning rate of the cosine schedule.
        weight_decay: AdamW weight decay of matrix parameters.
        layer_decay: layer-wise lr decay (1.0: off).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warmup steps.
        max_steps: schedule length; None: the trainer's ``max_steps`` (or its estimated total steps).
        aux_loss_weight: multiplier on the MoE auxiliary losses (whose own coefficients live in the
            model's MoE config: ``balance_coef``, ``z_loss_coef``, ``entropy_coef``).
        stats_every: log routing statistics every this many optimizer steps (0: never).
        activation_tau: threshold of the expert activation ratio (see :mod:`vlmoe.moe.stats`).
        check_finite: raise :class:`NonFiniteLossError` when a loss term is NaN / inf.
        expert_parallel: shard the experts of every MoE layer over the data-parallel ranks (DDP;
            each rank computes its own experts for every rank's tokens; see
            :mod:`vlmoe.moe.parallel`). Checkpoints still hold every expert
            (:mod:`vlmoe.tasks.expert_parallel`).
    """

    model: nn.Module

    def __init__(
        self,
        lr: float = 1e-3,
        min_lr: float = 1e-6,
        weight_decay: float = 0.05,
        layer_decay: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 0,
        max_steps: int | None = None,
        aux_loss_weight: float = 1.0,
        stats_every: int = 50,
        activation_tau: float = 0.1,
        check_finite: bool = True,
        expert_parallel: bool = False,
    ) -> None:
        super().__init__()
        if lr <= 0 or min_lr < 0 or min_lr > lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={lr}, min_lr={min_lr}")
        if not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        self.lr, self.min_lr = lr, min_lr
        self.weight_decay, self.layer_decay = weight_decay, layer_decay
        self.betas, self.eps = tuple(betas), eps
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.aux_loss_weight = aux_loss_weight
        self.stats_every = stats_every
        self.activation_tau = activation_tau
        self.check_finite = check_finite
        self.expert_parallel = expert_parallel
        # routing counts summed on the device between logging steps (no host sync per step)
        self._route_counts: dict[str, dict[str, dict[str, Tensor]]] = {"train": {}, "val": {}}
        self._last_step_end: float | None = None

    @property
    def backbone(self) -> nn.Module:
        """The multiway backbone (``self.model``, or the ``backbone`` of a composed task model)."""
        model = self.model
        return getattr(model, "backbone", model)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        # several forwards (streams) run before one backward: bias-balanced routers update once per
        # step, after backward (on_train_batch_end), never between a forward and its recomputation
        defer_bias_updates(self.model)
        if self.check_finite:
            # MoE layers record NaN router logits for check_terms instead of raising mid-forward
            defer_finite_checks(self.model)
        if self._trainer is not None:
            self._set_cpu_threads()
            if self.expert_parallel:
                self._shard_experts()

    def _shard_experts(self) -> None:
        """Shard experts over the ranks before DDP wraps the module (setup runs before the wrap)."""
        from lightning.pytorch.strategies import DDPStrategy

        from vlmoe.moe.parallel import ddp_ignore_expert_params, shard_experts

        if self.trainer.world_size == 1 or any(getattr(p, "expert_parallel", False) for p in self.parameters()):
            return
        if not isinstance(self.trainer.strategy, DDPStrategy):
            raise ValueError(
                f"expert_parallel needs a DDP strategy (ddp_find_unused_parameters_true), "
                f"not {type(self.trainer.strategy).__name__}"
            )
        # building the local expert modules initialises (then overwrites) weights: keep the global RNG
        # where it was, so sharding does not change the data stream or any later random draw
        with torch.random.fork_rng(devices=[]):
            shard_experts(self.model)
        # expert weights differ per rank: DDP must not average them (their gradients already sum over
        # every rank's tokens, scaled by 1 / world)
        ddp_ignore_expert_params(self)

    def _set_cpu_threads(self) -> None:
        """On CPU, leave one core per DataLoader worker (and per process on the node).

        PyTorch's intra-op threads busy-wait; with more threads than free cores (data workers, other
        ranks) every small GEMM waits for a descheduled thread, which was measured to slow the demo
        run ~4x on 2 cores. An explicit ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` choice wins.
        """
        trainer = self.trainer
        if trainer.strategy.root_device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
            return
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        procs = max(1, int(getattr(trainer, "num_devices", 1) or 1))
        workers = int(getattr(trainer.datamodule, "num_workers", 0) or 0) if trainer.datamodule else 0
        threads = max(1, cores // procs - workers)
        if threads < torch.get_num_threads():
            torch.set_num_threads(threads)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's FSDP precision plugin refuses norm clipping; the FSDP module itself can do it
        # (the norm is computed over all shards).
        from lightning.pytorch.strategies import FSDPStrategy

        if (
            gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
            and isinstance(self.trainer.strategy, FSDPStrategy)
        ):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ optimizer
    def total_steps(self) -> int:
        """Schedule length: ``max_steps`` if set, else the trainer's."""
        if self.max_steps:
            return int(self.max_steps)
        trainer = self._trainer
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        if trainer is not None:
            est = trainer.estimated_stepping_batches
            if est and math.isfinite(est):
                return int(est)
        raise ValueError("cannot tell the schedule length: set model max_steps or trainer.max_steps")

    def _param_groups(self) -> list[dict[str, Any]]:
        backbone = self.model
        return param_groups(
            self,
            self.weight_decay,
            self.layer_decay,
            layer_id=getattr(backbone, "layer_id", None),
            num_layers=getattr(backbone, "num_layers", None),
            no_weight_decay=backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else (),
            prefix="model.",
        )

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self._param_groups()
        for g in groups:
            g["lr"] = self.lr * g["lr_scale"]
            del g["names"]
        # foreach: one fused kernel per group instead of a Python loop over ~hundreds of tensors
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, foreach=True)
        lam = warmup_cosine(self.warmup_steps, self.total_steps(), self.min_lr / self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ expert-parallel checkpoints
    def _sharded(self) -> bool:
        return any(getattr(p, "expert_parallel", False) for p in self.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._sharded():
            from .expert_parallel import gather_expert_state

            params = [[p for g in opt.param_groups for p in g["params"]] for opt in self.trainer.optimizers]
            gather_expert_state(self, checkpoint, params)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint_fits(checkpoint)
        if self._sharded():
            from .expert_parallel import slice_expert_state

            # the optimizer does not exist yet; its parameter order is that of configure_optimizers
            params = [[p for g in self._param_groups() for p in g["params"]]]
            slice_expert_state(self, checkpoint, params)

    def check_checkpoint_fits(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one message, a training checkpoint whose weights do not fit this task's model.

        Called before any weight is loaded. Names the model the checkpoint holds (its preset and the
        first differing shapes) instead of the long size-mismatch report of ``load_state_dict``.
        """
        sd = checkpoint.get("state_dict")
        if not isinstance(sd, dict):
            return
        own = self.state_dict()
        sharded = {n for n, p in self.named_parameters() if getattr(p, "expert_parallel", False)}
        params = {n for n, _ in self.named_parameters()}
        wrong = [
            f"{k}: {tuple(sd[k].shape)} in the checkpoint, {tuple(v.shape)} here"
            for k, v in own.items()
            if k in sd and k not in sharded and tuple(sd[k].shape) != tuple(v.shape)
        ]
        missing = [k for k in params if k not in sd]
        if not wrong and not missing:
            return
        theirs = checkpoint.get("vlmoe_config") or {}
        ours = getattr(getattr(self, "backbone", None), "config", None)
        held = f"a {theirs.get('name', '?')!r} model" if theirs else "another model"
        built = f"a {ours.name!r} model" if ours is not None else "another model"
        detail = "; ".join(wrong[:3]) if wrong else f"weights it lacks, e.g. {missing[:3]}"
        raise ValueError(
            f"the checkpoint {self._ckpt_name()}holds {held} but this run builds {built} ({detail}). "
            "Resume with the checkpoint's model options (see its run's config.yaml), or start a new --run_dir."
        )

    def _ckpt_name(self) -> str:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        return f"{path} " if path else ""

    # ------------------------------------------------------------------ losses
    def aux_terms(self, aux: MoEAux, scale: float = 1.0) -> dict[str, Tensor]:
        """The MoE auxiliary losses as ``{"aux/<name>": weighted term}`` (already coefficient-weighted)."""
        w = self.aux_loss_weight * scale
        return {f"aux/{k}": w * v for k, v in aux.losses.items()}

    def check_terms(
        self, terms: Mapping[str, Tensor], stage: str = "train", stats: Iterable[RoutingStats] = ()
    ) -> None:
        """Raise :class:`NonFiniteLossError` naming the step, each non-finite term and the first MoE
        layer whose router produced NaN / inf logits.

        One device sync for all terms and layers together; the names are only looked up on failure.
        With several data-parallel ranks the verdict is shared (one tiny all-reduce), so every rank
        stops at the same step instead of the healthy ones waiting forever in the gradient all-reduce.

        Args:
            terms: named scalar loss terms.
            stage: ``train``, ``validation``, ...
            stats: the forward's routing statistics (``aux.stats``); their ``nonfinite`` flags are
                recorded by MoE layers whose checks this task defers (see :func:`defer_finite_checks`).
        """
        if not self.check_finite or not terms:
            return
        flagged = [s for s in stats if s.nonfinite is not None]
        values = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
        flags = torch.stack([s.nonfinite.reshape(()) for s in flagged]) if flagged else None
        bad_here = (~torch.isfinite(values)).any().float()
        if flags is not None:
            bad_here = torch.maximum(bad_here, flags.any().float().to(bad_here.device))
        world = self.trainer.world_size if self._trainer is not None else 1
        bad_anywhere = self.trainer.strategy.reduce(bad_here, reduce_op="sum") if world > 1 else bad_here
        if float(bad_anywhere) == 0:
            return
        bad = {k: float(v) for k, v in zip(terms, values.tolist()) if not math.isfinite(v)}
        good = {k: round(float(v), 4) for k, v in zip(terms, values.tolist()) if math.isfinite(v)}
        layers = [s.name or f"layer{i}" for i, s in enumerate(flagged) if bool(s.nonfinite)]
        step = self.trainer.global_step if self._trainer is not None else -1
        where = f"at {stage} step {step}" if stage == "train" else f"in {stage} (after step {step})"
        ckpt = ""
        if self._trainer is not None and stage == "train":
            ckpt = " Checkpoints saved so far are left as they are; resume from the last good one with lower lr."
            last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or ""
            if last:
                ckpt += f" Last checkpoint: {last}."
        routing = f"; router logits NaN/inf first in MoE layer {layers[0]}" if layers else ""
        if not bad and not layers:
            rank = self.trainer.global_rank
            raise NonFiniteLossError(f"non-finite loss {where} on another rank (this is rank {rank}).{ckpt}")
        named = ", ".join(f"{k}={v}" for k, v in bad.items()) or "every loss term finite"
        raise NonFiniteLossError(f"non-finite loss {where}: {named}{routing} (finite terms: {good}).{ckpt}")

    # ------------------------------------------------------------------ routing statistics
    def update_routing(self, aux: MoEAux, key: str = "train") -> None:
        """Add one forward's routing counts to the running per-layer sums (on the device).

        Args:
            aux: the forward's MoE aux output.
            key: which running sum (``train`` or ``val``).
        """
        if self.stats_every <= 0 and key == "train":
            return
        store = self._route_counts.setdefault(key, {})
        for i, s in enumerate(aux.stats):
            name = s.name or f"layer{i}"
            slot = store.get(name)
            counts = s.tokens_per_expert.detach().to(torch.float64)
            # `dropped` may live on the CPU (a layer without capacity limit makes a constant zero)
            dropped = s.dropped.detach().to(counts.device, torch.float64).reshape(())
            if slot is None or slot["counts"].shape != counts.shape:
                store[name] = {"counts": counts.clone(), "dropped": dropped.clone()}
            else:
                slot["counts"] += counts
                slot["dropped"] += dropped

    def routing_summary(self, key: str = "train", reset: bool = True, sync: bool = True) -> dict[str, float]:
        """Per-layer and mean routing metrics of the counts gathered since the last call.

        Args:
            key: which running sum (``train`` or ``val``).
            reset: clear the running counts.
            sync: sum the counts over data-parallel ranks first (every rank must call it).

        Returns:
            ``{"routing/<layer>/<metric>": value, ..., "routing/mean/<metric>": value}``.
        """
        acc = RoutingStatsAccumulator(tau=self.activation_tau)
        store = self._route_counts.setdefault(key, {})
        names = sorted(store)
        if names:
            flat = torch.cat(
                [torch.cat([store[n]["counts"], store[n]["dropped"].reshape(1)]) for n in names]
            )
            if sync and self._trainer is not None and self.trainer.world_size > 1:
                flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
            flat = flat.cpu()
            offset = 0
            for n in names:
                e = store[n]["counts"].numel()
                acc.counts[n] = flat[offset : offset + e].round().long()
                acc.dropped[n] = int(flat[offset + e].round())
                acc.routed[n] = 0
                offset += e + 1
        if reset:
            store.clear()
        out: dict[str, float] = {}
        for layer, metrics in acc.per_layer().items():
            for k in ("activation_ratio", "load_entropy", "load_cv", "dropped"):
                out[f"routing/{layer}/{k}"] = metrics[k]
        for k, v in acc.summary().items():
            out[f"routing/mean/{k}"] = v
        return out

    def maybe_log_routing(self) -> None:
        """Log routing statistics every ``stats_every`` optimizer steps (call at train batch end)."""
        if self.stats_every <= 0 or not self._route_counts.get("train"):
            return
        step = self.trainer.global_step
        if step % self.stats_every != 0:
            return
        stats = self.routing_summary()
        if stats and self.loggers:
            # straight to the loggers: these are already aggregated over the window (and ranks)
            for logger in self.loggers:
                logger.log_metrics(stats, step=step)

    # ------------------------------------------------------------------ throughput
    def log_throughput(self, samples: int, tokens: int) -> None:
        """Log samples/s and tokens/s of this rank, timed from the previous batch end to this one
        (data loading included, as a user measures it)."""
        now = time.perf_counter()
        last, self._last_step_end = self._last_step_end, now
        if last is None:
            return
        dt = max(now - last, 1e-9)
        self.log("perf/samples_per_s", samples / dt, on_step=True, on_epoch=False)
        self.log("perf/tokens_per_s", tokens / dt, on_step=True, on_epoch=False)
        self.log("samples/s", samples / dt, on_step=True, on_epoch=False, prog_bar=True, logger=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # after this batch's backward: apply the bias-balancing load it recorded (summed over ranks)
        apply_bias_updates(self.model)

    def on_train_epoch_start(self) -> None:
        self._last_step_end = None  # the gap across an epoch boundary is not a training step
