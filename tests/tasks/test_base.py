"""Optimizer groups, schedule, finiteness check and routing statistics of the task base class."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vlmoe.moe import RoutingStatsAccumulator
from vlmoe.tasks import NonFiniteLossError, param_groups, warmup_cosine


def test_param_groups_layer_decay_and_no_decay(make_task) -> None:
    task = make_task("mhmoe", layer_decay=0.5, weight_decay=0.05, max_steps=10)
    groups = task._param_groups()
    seen = [n for g in groups for n in g["names"]]
    assert sorted(seen) == sorted(n for n, _ in task.named_parameters())  # each parameter exactly once
    by_name = {n: g for g in groups for n in g["names"]}
    depth = task.backbone.num_layers  # 2
    assert by_name["model.backbone.vision_embed.patch_embed.proj.weight"]["lr_scale"] == 0.5 ** (depth + 1)
    assert by_name["model.backbone.blocks.0.attn.qkv.vision.weight"]["lr_scale"] == 0.5 ** depth
    assert by_name["model.backbone.blocks.1.attn.qkv.vision.weight"]["lr_scale"] == 0.5 ** (depth - 1)
    assert by_name["model.mlm_head.weight"]["lr_scale"] == 1.0
    # no decay: biases, norms, positions / tokens, and the 2-D MoE "bias-like" parameters
    for name in ("model.backbone.blocks.0.attn.qkv.vision.bias", "model.backbone.vision_embed.cls_token",
                 "model.backbone.text_embed.pos_embed.weight", "model.backbone.blocks.0.mlp.vision.experts.b1",
                 "model.backbone.blocks.0.mlp.vision.router.expert_embeddings"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["model.backbone.blocks.0.mlp.vision.experts.w1"]["weight_decay"] == 0.05
    opt = task.configure_optimizers()["optimizer"]
    lrs = {round(g["initial_lr"] / task.lr, 6) for g in opt.param_groups}  # peak lr (warmup starts at 0)
    assert lrs == {round(0.5**k, 6) for k in range(depth + 2)}
    # the same groups with the generic function and the task model's own layer ids
    model = task.model
    ref = param_groups(task, 0.05, 0.5, layer_id=model.layer_id, num_layers=model.num_layers,
                       no_weight_decay=model.no_weight_decay(), prefix="model.")
    assert [g["names"] for g in ref] == [g["names"] for g in groups]


def test_task_optimizer_is_fused_adamw_with_the_reference_update(make_task) -> None:
    """The tasks' AdamW takes torch's fused kernel on CPU; its steps over the task's groups (layer decay,
    weight decay, the (out, in)-strided expert weights, handed to the kernel as their contiguous
    permutation) equal those of torch's per-tensor loop, and the moments keep the parameters' strides."""
    from vlmoe.tasks.optim import adamw

    task = make_task("tiny_moe", layer_decay=0.5, weight_decay=0.05, max_steps=10)
    for m in task.modules():  # the experts' fc1 stored (out, in) (the faster, non-default layout)
        if hasattr(m, "w1") and m.w1.dim() == 3:
            m.w1.data = m.w1.data.transpose(1, 2).contiguous().transpose(1, 2)
    opt = task.configure_optimizers()["optimizer"]
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"]  # the schedule starts the warmup at 0
    params = [p for g in opt.param_groups for p in g["params"]]
    assert any(not p.is_contiguous() for p in params)  # the experts' (out, in)-stored w1: updated permuted
    start = [p.detach().clone() for p in params]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.AdamW(
        [{**{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")}, "params": ref_params[a:b]}
         for g, a, b in _spans(opt.param_groups)], foreach=False)
    torch.manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, ref_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q, p0 in zip(params, ref_params, start):
        assert not torch.equal(p.detach(), p0)  # every parameter moved
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        assert p.stride() == q.stride() == opt.state[p]["exp_avg"].stride()
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-6, atol=1e-12)
    # parameters the fused kernel does not take (one on the meta device here) fall back to foreach
    opt = adamw([torch.zeros(3, requires_grad=True), torch.zeros(2, dtype=torch.float64, device="meta")])
    assert opt.param_groups[0]["foreach"] and not opt.param_groups[0]["fused"]


@pytest.mark.parametrize("kw", [{"fused": True}, {"foreach": True}, {"foreach": False},
                                {"fused": True, "amsgrad": True}])
def test_adamw_updates_a_permuted_parameter_as_a_contiguous_one(kw, monkeypatch) -> None:
    from vlmoe.tasks import optim as base
    from vlmoe.tasks.optim import AdamW

    handed = []  # what the update receives (torch calls _init_group, which this AdamW wraps, every step)
    order = base._storage_order
    monkeypatch.setattr(base, "_storage_order", lambda t: handed.append(t.stride()) or order(t))

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 5, 4).transpose(1, 2))  # (3, 4, 5) stored (3, 5, 4)
    b = torch.nn.Parameter(a.detach().contiguous())
    opts = [AdamW([a], lr=0.1, weight_decay=0.1, **kw), torch.optim.AdamW([b], lr=0.1, weight_decay=0.1, **kw)]
    for _ in range(3):
        g = torch.randn(3, 4, 5)
        a.grad, b.grad = g.transpose(1, 2).contiguous().transpose(1, 2), g.clone()
        for o in opts:
            o.step()
    assert len(handed) >= 3 and set(handed) == {(20, 1, 4)}  # the wrapper ran at each step (torch calls it)
    assert a.stride() == (20, 1, 4) and opts[0].state[a]["exp_avg"].stride() == a.stride()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opts[0].state[a]["exp_avg_sq"], opts[1].state[b]["exp_avg_sq"])


def test_adamw_fused_with_gradients_and_moments_in_another_layout() -> None:
    """torch's fused kernel pairs elements by memory position: a gradient or a loaded moment in another
    layout than its parameter (an expert-parallel checkpoint's gathered moments are contiguous) would be
    applied to the wrong elements. This AdamW relays them first (torch's own fused AdamW is shown wrong)."""
    from vlmoe.tasks.optim import AdamW

    def run(cls, fused: bool, reload: bool) -> torch.Tensor:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(3, 5, 4).transpose(1, 2))  # (3, 4, 5) stored (3, 5, 4)
        opt = cls([p], lr=0.1, fused=True) if fused else torch.optim.AdamW([p], lr=0.1, foreach=False)
        for step in range(3):
            p.grad = torch.randn(3, 4, 5)  # contiguous, unlike p
            opt.step()
            if reload and step == 0:  # moments as a gathered checkpoint holds them: contiguous
                sd = copy.deepcopy(opt.state_dict())
                sd["state"][0] = {k: v.contiguous() for k, v in sd["state"][0].items()}
                opt = cls([p], lr=0.1, fused=True) if fused else torch.optim.AdamW([p], lr=0.1, foreach=False)
                opt.load_state_dict(sd)
        return p.detach()

    for reload in (False, True):
        want = run(None, fused=False, reload=reload)  # torch's loop indexes every tensor correctly
        torch.testing.assert_close(run(AdamW, fused=True, reload=reload), want, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(run(torch.optim.AdamW, fused=True, reload=reload), want, atol=1e-3)


def test_adamw_keeps_its_implementation_when_loading_a_foreach_state() -> None:
    from vlmoe.tasks.optim import adamw

    torch.manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2))
    with torch.no_grad():
        b.copy_(a)
    old = torch.optim.AdamW([a], lr=0.1, foreach=True)  # what an earlier version of the tasks saved
    a.grad = torch.randn(4, 3)
    old.step()
    new = adamw([b], lr=0.1)
    new.load_state_dict(copy.deepcopy(old.state_dict()))  # as read from a checkpoint (torch shares same-device tensors)
    assert new.param_groups[0]["fused"] and not new.param_groups[0]["foreach"]
    with torch.no_grad():
        b.copy_(a)
    for o, p in ((old, a), (new, b)):
        p.grad = torch.ones(4, 3)
        o.step()
    torch.testing.assert_close(b.detach(), a.detach())  # the loaded moments and step count carried on


def _spans(groups):
    a = 0
    for g in groups:
        yield g, a, a + len(g["params"])
        a += len(g["params"])


def test_layer_decay_finds_a_wrapped_backbone(make_task) -> None:
    """A backbone inside another module (a detector's, say) gets its layer ids and no-decay names by
    identity, wherever it sits; the rest is the top layer."""
    from torch import nn

    from vlmoe.tasks import VLMoETask

    class Wrapped(VLMoETask):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.model = nn.ModuleDict({"body": nn.ModuleDict({"vit": make_task("dense").model.backbone}),
                                        "box_head": nn.Linear(4, 4)})

    task = Wrapped(layer_decay=0.5)
    assert task.backbone is task.model["body"]["vit"]
    by_name = {n: g for g in task._param_groups() for n in g["names"]}
    assert by_name["model.body.vit.blocks.1.attn.qkv.vision.weight"]["lr_scale"] == 0.5
    assert by_name["model.body.vit.vision_embed.cls_token"]["weight_decay"] == 0.0
    assert by_name["model.box_head.weight"]["lr_scale"] == 1.0


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


def test_routing_callback_equals_the_accumulator(make_task) -> None:
    """The RoutingStatistics callback (forward hooks on the MoE layers) reports what the layers' own
    statistics give, summed over the forwards since the last report."""
    from vlmoe.tasks.callbacks import RoutingStatistics

    task = make_task("topk")
    cb = RoutingStatistics(every_n_steps=1, tau=task.activation_tau)
    cb.setup(None, task, "fit")
    acc = RoutingStatsAccumulator(tau=task.activation_tau)
    cb._stage = "train"
    for _ in range(3):
        out = task.model(image=torch.randn(2, 3, 32, 32), text_ids=torch.randint(0, 100, (2, 6)))
        acc.update(out.aux)
    stats = cb.summary("train")
    assert acc.per_layer() and set(acc.per_layer()) == {s.name for s in out.aux.stats}
    for layer, metrics in acc.per_layer().items():
        for k in ("activation_ratio", "load_entropy", "load_cv", "dropped"):
            assert stats[f"routing/{layer}/{k}"] == pytest.approx(metrics[k]), (layer, k)
    assert stats["routing/mean/activation_ratio"] == pytest.approx(acc.summary()["activation_ratio"])
    assert cb.summary("train") == {}  # reset after reading
    cb.teardown(None, task, "fit")
    cb._stage = "train"
    task.model(image=torch.randn(2, 3, 32, 32))
    assert cb.summary("train") == {}  # hooks removed
