"""Optimizer groups, schedule, finiteness check and routing statistics of the task base class."""

from __future__ import annotations

import math

import pytest
import torch

from vlmoe.moe import RoutingStatsAccumulator
from vlmoe.tasks import NonFiniteLossError, param_groups, warmup_cosine


def test_param_groups_layer_decay_and_no_decay(make_task) -> None:
    task = make_task("mhmoe", layer_decay=0.5, weight_decay=0.05, max_steps=10)
    model = task.model
    groups = param_groups(
        task, 0.05, 0.5, layer_id=model.layer_id, num_layers=model.num_layers,
        no_weight_decay=model.no_weight_decay(), prefix="model.",
    )
    seen = [n for g in groups for n in g["names"]]
    assert sorted(seen) == sorted(n for n, _ in task.named_parameters())  # each parameter exactly once
    by_name = {n: g for g in groups for n in g["names"]}
    depth = model.num_layers  # 2
    assert by_name["model.vision_embed.patch_embed.proj.weight"]["lr_scale"] == 0.5 ** (depth + 1)
    assert by_name["model.blocks.0.attn.qkv.vision.weight"]["lr_scale"] == 0.5 ** depth
    assert by_name["model.blocks.1.attn.qkv.vision.weight"]["lr_scale"] == 0.5 ** (depth - 1)
    assert by_name["model.heads.mlm.proj.weight"]["lr_scale"] == 1.0
    # no decay: biases, norms, positions / tokens, and the 2-D MoE "bias-like" parameters
    for name in ("model.blocks.0.attn.qkv.vision.bias", "model.vision_embed.cls_token",
                 "model.text_embed.pos_embed.weight", "model.blocks.0.mlp.vision.experts.b1",
                 "model.blocks.0.mlp.vision.router.expert_embeddings"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["model.blocks.0.mlp.vision.experts.w1"]["weight_decay"] == 0.05
    opt = task.configure_optimizers()["optimizer"]
    lrs = {round(g["initial_lr"] / task.lr, 6) for g in opt.param_groups}  # peak lr (warmup starts at 0)
    assert lrs == {round(0.5**k, 6) for k in range(depth + 2)}


def test_warmup_cosine() -> None:
    f = warmup_cosine(10, 110, min_ratio=0.01)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(110) == pytest.approx(0.01) and f(500) == pytest.approx(0.01)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_schedule_follows_the_trainer_steps(make_task) -> None:
    task = make_task("dense", lr=1e-3, min_lr=1e-5, warmup_steps=4, max_steps=20)
    cfg = task.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(22):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[4] == pytest.approx(1e-3) and lrs[20] == pytest.approx(1e-5)
    assert cfg["lr_scheduler"]["interval"] == "step"


def test_check_terms_names_the_bad_terms(make_task) -> None:
    task = make_task("dense")
    task.check_terms({"loss/a": torch.tensor(1.0), "aux/balance": torch.tensor(0.1)})
    with pytest.raises(NonFiniteLossError, match=r"train step -1: loss/b=inf, aux/z=nan \(finite terms: "):
        task.check_terms({"loss/a": torch.tensor(1.0), "loss/b": torch.tensor(math.inf),
                          "aux/z": torch.tensor(math.nan)})


def test_routing_summary_equals_the_accumulator(make_task) -> None:
    task = make_task("topk")
    acc = RoutingStatsAccumulator(tau=task.activation_tau)
    for _ in range(3):
        out = task.model(image=torch.randn(2, 3, 32, 32), text_ids=torch.randint(0, 100, (2, 6)))
        task.update_routing(out.aux)
        acc.update(out.aux)
    stats = task.routing_summary(sync=False)
    for layer, metrics in acc.per_layer().items():
        for k in ("activation_ratio", "load_entropy", "load_cv", "dropped"):
            assert stats[f"routing/{layer}/{k}"] == pytest.approx(metrics[k]), (layer, k)
    assert stats["routing/mean/activation_ratio"] == pytest.approx(acc.summary()["activation_ratio"])
    assert task.routing_summary(sync=False) == {}  # reset after reading
