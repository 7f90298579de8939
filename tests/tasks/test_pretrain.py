"""PretrainTask + PretrainDataModule under a real Lightning Trainer on tiny shards."""

from __future__ import annotations

import math

import pytest
import torch

from tests.utils import VARIANTS, trainer
from vlmoe.tasks import NonFiniteLossError, VLMoECheckpoint


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_dev_run_every_moe_variant(variant, make_task, make_data, tmp_path) -> None:
    task = make_task(variant)
    dm = make_data()
    t = trainer(tmp_path, fast_dev_run=True)
    t.fit(task, datamodule=dm)
    logged = t.callback_metrics
    for term in ("loss", "loss/mlm_text", "loss/mim_image", "loss/mlm_pair", "loss/mim_pair"):
        assert term in logged and math.isfinite(float(logged[term])), term
    assert "val/loss" in logged
    # the image's gain on the pairs' masked text: the same captions beside other pairs' images
    assert math.isfinite(float(logged["val/acc_mlm_pair_shuffled_images"]))
    if variant != "dense":
        assert "aux/balance" in logged
        # one step with stats_every=2 has not logged yet; the validation pass has its own summary
        assert any(k.startswith("val/routing/blocks.") and k.endswith("activation_ratio") for k in logged)
    assert t.global_step == 1


def test_loss_falls_on_a_fixed_batch_all_streams(make_task, make_data) -> None:
    torch.manual_seed(0)
    task = make_task("mhmoe", lr=3e-3, warmup_steps=5, max_steps=50)
    dm = make_data()
    dm.image_size, dm.patch_size = 32, 8
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"pair", "image", "text"}
    opt_cfg = task.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    first = last = None
    per_term_first: dict[str, float] = {}
    for step in range(50):
        terms, _, aux, _ = task.forward_streams(batch)
        loss = task.total_loss(terms, aux)
        if step == 0:
            first = float(loss)
            per_term_first = {k: float(v) for k, v in terms.items()}
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        last = float(loss)
    assert set(per_term_first) == {"mlm_pair", "mim_pair", "mim_image", "mlm_text"}
    assert last < 0.5 * first, (first, last)
    terms, _, _, _ = task.forward_streams(batch)
    for k, v in terms.items():  # every stream's term learned, not just the largest
        assert float(v) < per_term_first[k], (k, per_term_first[k], float(v))


def test_checkpoints_every_n_steps_and_at_the_end(make_task, make_data, tmp_path, capsys) -> None:
    ckpt = VLMoECheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3)
    t = trainer(tmp_path, max_steps=7, callbacks=[ckpt], limit_val_batches=0)
    t.fit(make_task("topk"), datamodule=make_data())
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    # top-1 periodic checkpoint is replaced by the final one; last.ckpt is the end of training
    assert names == ["last.ckpt", "step=000007.ckpt"], names
    state = torch.load(tmp_path / "ck" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 7
    assert state["vlmoe_config"]["name"] == "tiny_moe"
    assert "checkpoint (step 7):" in capsys.readouterr().out
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.endswith(".tmp")]


def test_nonfinite_loss_names_step_and_term_and_keeps_last_checkpoint(make_task, make_data, tmp_path) -> None:
    task = make_task("mhmoe")
    original = task._mim

    def poisoned(out, batch):
        loss, acc = original(out, batch)
        if task.trainer.global_step == 4 and batch["image"].shape[0] and "text_ids" not in batch:
            loss = loss * float("nan")
        return loss, acc

    task._mim = poisoned
    ckpt = VLMoECheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2)
    t = trainer(tmp_path, max_steps=10, callbacks=[ckpt], limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match=r"train step 4: loss/mim_image=nan") as err:
        t.fit(task, datamodule=make_data())
    assert "loss=nan" in str(err.value) and "last.ckpt" in str(err.value)
    state = torch.load(tmp_path / "ck" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 4  # the last good step; nothing was saved after the failure
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("variant", ["mhmoe", "hmoe", "stratified"])
def test_nan_router_logits_give_the_one_line_error_naming_the_layer(variant, make_task, make_data, tmp_path) -> None:
    """NaN reaching an MoE router: the same error as a NaN loss (step, layer, last checkpoint), not the
    layer's own exception from the middle of the forward."""
    import lightning.pytorch as pl

    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, idx):
            if trainer.global_step == 3:
                pl_module.model.backbone.vision_embed.patch_embed.proj.weight.data.fill_(float("nan"))

    ckpt = VLMoECheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2)
    t = trainer(tmp_path, max_steps=10, callbacks=[ckpt, Poison()], limit_val_batches=0)
    with pytest.raises(NonFiniteLossError) as err:
        t.fit(make_task(variant), datamodule=make_data())
    msg = str(err.value)
    assert "at train step 3" in msg and "router logits NaN/inf first in MoE layer blocks.0.mlp.vision" in msg, msg
    assert "Last checkpoint:" in msg and "last.ckpt" in msg
    state = torch.load(tmp_path / "ck" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2


def test_workers_capped_by_shards_per_rank(make_data) -> None:
    dm = make_data(num_workers=4, image_size=32, patch_size=8)
    dm.setup("fit")
    # 2 train shards per stream, 1 val shard: a worker without a shard would have nothing to read
    assert dm.train_data.config.num_workers == 2
    assert dm.val_data.config.num_workers == 1


def test_fsdp_strategy_wraps_multiway_blocks() -> None:
    from vlmoe.models import MultiwayBlock
    from vlmoe.tasks.strategies import MultiwayFSDPStrategy

    s = MultiwayFSDPStrategy(activation_checkpointing=True)
    assert s.kwargs["auto_wrap_policy"]._module_classes == {MultiwayBlock}
    assert s._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {MultiwayBlock}
    assert s._state_dict_type == "sharded"
    assert not MultiwayFSDPStrategy()._activation_checkpointing_kwargs


def test_routers_have_no_scalar_parameters(make_task) -> None:
    # FSDP cannot shard 0-d parameters (X-MoE's learnable temperature used to be one)
    for variant in ("xmoe", "mhmoe"):
        assert all(p.dim() > 0 for p in make_task(variant).parameters()), variant


def test_bias_balancing_updates_once_per_step_after_backward(make_task, make_data, tmp_path, monkeypatch) -> None:
    """Three stream forwards then one backward, checkpointed blocks: routers wait for the step's end."""
    from vlmoe.moe import Router

    updates: dict[int, int] = {}
    moved: list[bool] = []
    apply = Router.apply_pending_load

    def counting(self):
        load, before = self.pending_load.clone(), self.expert_bias.clone()
        apply(self)
        if load.sum() > 0:
            updates[id(self)] = updates.get(id(self), 0) + 1
            # the step's whole load moved the bias (two sign steps may cancel, so check each one)
            want = before + self.bias_update_rate * torch.sign(load.mean() - load)
            moved.append(torch.allclose(self.expert_bias, want - want.mean()))

    monkeypatch.setattr(Router, "apply_pending_load", counting)
    task = make_task("tiny_moe", model_overrides={"grad_checkpointing": True,
                                                  "moe": {"bias_balance": True, "bias_update_rate": 0.01}})
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    t.fit(task, datamodule=make_data())
    routers = [m for m in task.model.modules() if isinstance(m, Router)]
    assert routers and all(r.bias_balance and not r.bias_update_on_forward for r in routers)
    assert [updates.get(id(r)) for r in routers] == [2] * len(routers)  # one update per step
    assert moved and all(moved)
    assert all(torch.all(r.pending_load == 0) for r in routers)
