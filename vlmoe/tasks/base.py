"""What every vlmoe LightningModule shares: the optimizer and schedule wired in, the MoE bookkeeping.

:class:`VLMoETask`: a task is a LightningModule with a ``model`` (a task model: backbone + heads, or
anything that holds a :class:`~vlmoe.models.VLMoE` somewhere, e.g. a detector). The base gives it
``configure_optimizers`` (:mod:`vlmoe.tasks.optim`: layer ids and no-decay names found through the
:attr:`~VLMoETask.backbone`, wherever it sits), the MoE auxiliary losses term by term, a finiteness
check naming the step, the term and the first bad MoE layer, a check that a resumed checkpoint fits,
bias balancing once per step and expert parallelism. Routing statistics, throughput and the CPU thread
policy are callbacks (:mod:`vlmoe.tasks.callbacks`) that :meth:`~VLMoETask.configure_callbacks` adds,
usable with any LightningModule.

A subclass declares only its own arguments and passes the rest on (``**kwargs``): LightningCLI (and
jsonargparse) read the base's arguments through ``super().__init__(**kwargs)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from vlmoe.moe import MoEAux, MoEOptions, RoutingStats, apply_bias_updates, defer_bias_updates, defer_finite_checks

from .callbacks import CPUThreads, RoutingStatistics, Throughput, batch_size_and_tokens
from .optim import adamw, param_groups, warmup_cosine

__all__ = ["NonFiniteLossError", "VLMoETask", "adamw", "batch_size_and_tokens", "param_groups", "warmup_cosine"]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; raised before the optimizer could apply it."""


def with_moe_options(overrides: dict[str, Any], moe: MoEOptions | dict[str, Any] | None, base: Any) -> dict[str, Any]:
    """``overrides`` (config fields) with the typed ``moe`` options merged into its ``moe`` entry. Options
    on a model without MoE layers are an error unless they say how many experts to add."""
    if isinstance(moe, dict):  # as a checkpoint's hyper-parameters store it
        moe = MoEOptions(**moe)
    changes = moe.changes() if moe is not None else {}
    if not changes:
        return overrides
    current = overrides.get("moe")
    has_moe = base.moe is not None or current is not None
    if not has_moe and "num_experts" not in changes:
        raise ValueError(f"moe: {sorted(changes)} given, but {base.name!r} has no MoE layers; give "
                         "moe.num_experts (and moe.ffn_dim) to make its FFNs MoE layers")
    merged = {**(current.to_dict() if hasattr(current, "to_dict") else current or {}), **changes}
    return {**overrides, "moe": merged}


class VLMoETask(pl.LightningModule):
    """Base LightningModule of vlmoe tasks. Subclasses set ``self.model``: a task model (backbone + heads).

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
        stats_every: log routing statistics every this many optimizer steps (0: never); see
            :class:`~vlmoe.tasks.callbacks.RoutingStatistics`.
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

    @property
    def backbone(self) -> nn.Module:
        """The :class:`~vlmoe.models.VLMoE` this task trains: ``self.model`` itself, its
        ``backbone``, or the first ``VLMoE`` found inside it (a wrapped backbone, e.g. a detector's)."""
        from vlmoe.models import VLMoE

        model = self.model
        if isinstance(model, VLMoE):
            return model
        inner = getattr(model, "backbone", None)
        if isinstance(inner, VLMoE):
            return inner
        found = next((m for m in model.modules() if isinstance(m, VLMoE)), None)
        if found is None:
            raise AttributeError(f"{type(self).__name__}.model ({type(model).__name__}) holds no VLMoE backbone")
        return found

    def configure_callbacks(self) -> list[pl.Callback]:
        """Routing statistics (every ``stats_every`` steps), throughput and the CPU thread policy."""
        callbacks: list[pl.Callback] = [Throughput(), CPUThreads()]
        if self.stats_every > 0:
            callbacks.insert(0, RoutingStatistics(every_n_steps=self.stats_every, tau=self.activation_tau))
        return callbacks

    def batch_size_and_tokens(self, batch: Any) -> tuple[int, int]:
        """``(samples, tokens)`` of a training batch, for :class:`~vlmoe.tasks.callbacks.Throughput`.

        The default counts a batch dict's ``image`` rows (CLS + patches each) and non-padding
        ``text_ids``; tasks with other batches override it.
        """
        return batch_size_and_tokens(batch, self.backbone.config)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        # several forwards (streams) run before one backward: bias-balanced routers update once per
        # step, after backward (on_train_batch_end), never between a forward and its recomputation
        defer_bias_updates(self.backbone)
        if self.check_finite:
            # MoE layers record NaN router logits for check_terms instead of raising mid-forward
            defer_finite_checks(self.backbone)
        if self._trainer is not None and self.expert_parallel:
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
            shard_experts(self.backbone)
        # expert weights differ per rank: DDP must not average them (their gradients already sum over
        # every rank's tokens, scaled by 1 / world)
        ddp_ignore_expert_params(self)

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
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and self._sharded():
            # experts sharded over the ranks: the norm takes every rank's experts (the same on all ranks)
            from vlmoe.moe.parallel import clip_grad_norm_

            clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], gradient_clip_val)
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
        backbone = self.backbone
        # names as the backbone knows them, whatever the backbone sits under in this task
        inner = {id(p): n for n, p in backbone.named_parameters()}
        names = {n: inner.get(id(p)) for n, p in self.named_parameters()}
        top = backbone.num_layers + 1

        def layer_id(name: str) -> int:
            return backbone.layer_id(names[name]) if names.get(name) is not None else top

        skip = {n for n, p in self.named_parameters() if inner.get(id(p)) in backbone.no_weight_decay()}
        if self.model is not backbone and hasattr(self.model, "no_weight_decay"):
            skip |= {f"model.{n}" for n in self.model.no_weight_decay()}
        return param_groups(
            self, self.weight_decay, self.layer_decay, layer_id=layer_id, num_layers=backbone.num_layers,
            no_weight_decay=skip,
        )

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self._param_groups()
        for g in groups:
            g["lr"] = self.lr * g["lr_scale"]
            del g["names"]
        opt = adamw(groups, lr=self.lr, betas=self.betas, eps=self.eps)
        lam = warmup_cosine(self.warmup_steps, self.total_steps(), self.min_lr / self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ expert-parallel checkpoints
    def _sharded(self) -> bool:
        return any(getattr(p, "expert_parallel", False) for p in self.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hp = checkpoint.get("hyper_parameters")
        if isinstance(hp, dict) and isinstance(hp.get("moe"), MoEOptions):
            # plain data, so the checkpoint loads with weights_only=True
            checkpoint["hyper_parameters"] = {**hp, "moe": hp["moe"].changes()}
        # plain data, so `vlmoe export run.ckpt out/` rebuilds the model (heads, preprocessing)
        # without this class: the backbone config, the task block, the data's preprocessing
        checkpoint["vlmoe_config"] = self.backbone.config.to_dict()
        task_config = getattr(self.model, "task_config", None)
        if callable(task_config):
            checkpoint["vlmoe_task"] = task_config()
        dm = self._trainer.datamodule if self._trainer is not None else None
        preprocess = getattr(dm, "preprocess_config", None)
        if callable(preprocess):
            checkpoint["vlmoe_preprocess"] = preprocess()
        if self._sharded():
            from .expert_parallel import gather_expert_state

            params = [[p for g in opt.param_groups for p in g["params"]] for opt in self.trainer.optimizers]
            gather_expert_state(self, checkpoint, params)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.migrate_checkpoint(checkpoint)
        self.check_checkpoint_fits(checkpoint)
        if self._sharded():
            from .expert_parallel import slice_expert_state

            # the optimizer does not exist yet; its parameter order is that of configure_optimizers
            params = [[p for g in self._param_groups() for p in g["params"]]]
            slice_expert_state(self, checkpoint, params)

    def migrate_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rename what earlier versions of this task wrote (called before the checkpoint is checked
        and loaded; the base has nothing to migrate)."""

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
        their_task = (checkpoint.get("vlmoe_task") or {}).get("type")
        our_task = getattr(getattr(self, "model", None), "task", None)
        if not (their_task and our_task and their_task != our_task):
            their_task = our_task = None  # the task is named only where it differs

        def model(name: str, task: str | None) -> str:
            return f"a {name!r} {task} model" if task else f"a {name!r} model"

        held = model(theirs.get("name", "?"), their_task) if theirs else "another model"
        built = model(ours.name, our_task) if ours is not None else "another model"
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
        values = torch.stack([t.detach().float().reshape(()) for t in terms.values()])  # each term -> (); (n_terms,)
        # () flags; stacked (n_flagged,)
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

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # after this batch's backward: apply the bias-balancing load it recorded (summed over ranks)
        apply_bias_updates(self.backbone)
