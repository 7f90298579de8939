"""`vlmoe analyze routing`: the report's numbers are the MoE layers' own statistics on the same batches;
the pictures exist with their pixel size; the command compares models side by side."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.utils import VARIANTS
from vlmoe.analysis import routing_report, write_routing_report
from vlmoe.models import VLMoEConfig, create_model
from vlmoe.moe import RoutingStatsAccumulator


def _model(variant: str):
    name, overrides = VARIANTS[variant]
    torch.manual_seed(0)
    return create_model(VLMoEConfig.from_name(name, **overrides)).eval()


def _batches(n: int = 2):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(4, 3, 32, 32, generator=g), "text_ids": torch.randint(4, 100, (4, 10), generator=g),
             "text_padding_mask": torch.arange(10).expand(4, 10) >= torch.tensor([[10], [7], [5], [10]])}
            for _ in range(n)]


@pytest.mark.parametrize("variant", ["topk", "mhmoe", "hmoe", "stratified"])
def test_report_numbers_are_the_layers_own_statistics(variant: str) -> None:
    model, batches = _model(variant), _batches()
    rep = routing_report(model, batches)
    acc = RoutingStatsAccumulator()
    with torch.no_grad():
        for b in batches:  # the pairs stream, by hand
            acc.update(model(image=b["image"], text_ids=b["text_ids"], text_padding_mask=b["text_padding_mask"]).aux)
    want = acc.per_layer()
    got = rep["streams"]["pairs"]
    assert set(got) == set(want)
    for name, row in got.items():
        assert row["counts"] == acc.counts[name].tolist()
        assert row["activation_ratio"] == want[name]["activation_ratio"]
        assert row["load_entropy"] == pytest.approx(want[name]["load_entropy"])
        assert row["routed_tokens"] == want[name]["routed_tokens"]
    assert set(rep["streams"]) == {"vision", "text", "pairs"}
    text = rep["streams"]["text"]
    real = (10 + 7 + 5 + 10) * 2  # non-padding text tokens of the two batches: padding is never routed
    heads = 2 if variant == "mhmoe" else 1  # MH-MoE routes sub-tokens
    assert all(r["routed_tokens"] == real * heads for n, r in text.items() if n.endswith(".text"))
    if variant == "hmoe":
        assert all("activated_params_per_token" in r for r in got.values())
    if variant == "stratified":
        assert all(r["mean_passes"] >= 1 for r in got.values())


def test_pictures_index_and_report_are_written(tmp_path) -> None:
    reports = {"X-MoE": routing_report(_model("xmoe"), _batches(1)), "Dense": routing_report(_model("dense"),
                                                                                               _batches(1))}
    written = write_routing_report(reports, tmp_path / "out")
    names = {p.name for p in written}
    assert {"report.json", "index.html", "load_X-MoE_pairs.png", "activation_ratio_vision.png"} <= names
    for p in written:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            w, h = Image.open(p).size
            assert w == 640 and h > 100
    page = (tmp_path / "out" / "index.html").read_text()
    assert "load_X-MoE_pairs.png" in page and "report.json" in page
    assert json.loads((tmp_path / "out" / "report.json").read_text())["Dense"]["streams"] == {}
    with pytest.raises(FileExistsError, match="not empty"):
        write_routing_report(reports, tmp_path / "out")


@pytest.mark.parametrize(("variant", "heads"), [("xmoe", 1), ("mhmoe", 2)])
def test_patch_maps_have_the_models_patch_grid_and_its_first_choices(variant: str, heads: int) -> None:
    from vlmoe.analysis import patch_expert_maps, plot_patch_maps

    model = _model(variant)
    image = _batches(1)[0]["image"][:2]
    maps = patch_expert_maps(model, image)
    gh, gw = model.vision_embed.grid_size
    assert set(maps) == {n for n, m in model.named_modules() if n.endswith("mlp.vision")}
    for m in maps.values():
        assert m.shape == (2, heads, gh, gw) and int(m.max()) < 4
    # the first choices are the router's own top-1 of the same call
    name = next(iter(maps))
    moe = dict(model.named_modules())[name]
    seen = []
    handle = moe.router.register_forward_hook(lambda mod, inp, out: seen.append(out.indices[:, 0].clone()))
    patch_expert_maps(model, image)
    handle.remove()
    top1 = seen[0].view(2, 1 + gh * gw, heads)[:, 1:].permute(0, 2, 1).reshape(2, heads, gh, gw)
    assert torch.equal(top1, maps[name])
    assert all(not m.record_assignments for m in model.modules() if hasattr(m, "record_assignments"))
    fig = plot_patch_maps(image.clamp(-1, 1) * 0.5 + 0.5, maps, {n: 4 for n in maps}, "t")
    assert len(fig.axes) == 2 * (1 + heads * len(maps))
    report = routing_report(model, _batches(1))
    if heads > 1:  # each token's h sub-tokens x top-2 reach between 1 and h*k distinct experts
        assert all(1 <= r["distinct_experts_per_token"] <= 4 for r in report["streams"]["pairs"].values())


@pytest.mark.parametrize("variant", ["topk", "mhmoe"])
def test_choice_by_group_counts_each_group_as_its_own_samples_alone(variant: str) -> None:
    """Group g's counts are the layers' own statistics of a run on group g's samples alone (routing is
    per token; padding is never routed); the mutual information is 0 when two groups are the same
    samples and at most H(group)."""
    from vlmoe.analysis import expert_choice_by_group, plot_choice_by_group

    model, batch = _model(variant), _batches(1)[0]
    batch["group"] = torch.tensor([1, 0, 1, 0])
    res = expert_choice_by_group(model, [batch], ["a", "b"])
    names = {n for n, m in model.named_modules() if n.endswith(("mlp.vision", "mlp.text"))}
    assert set(res["layers"]) == names and res["groups"] == ["a", "b"]
    for g in (0, 1):
        keep = batch["group"] == g
        acc = RoutingStatsAccumulator()
        with torch.no_grad():
            acc.update(model(image=batch["image"][keep], text_ids=batch["text_ids"][keep],
                             text_padding_mask=batch["text_padding_mask"][keep]).aux)
        for name, layer in res["layers"].items():
            assert layer["counts"][g] == acc.counts[name].tolist(), (name, g)
    for layer in res["layers"].values():
        assert 0.0 <= layer["mutual_information_bits"] <= layer["group_entropy_bits"] + 1e-9
        assert all(sum(row) == pytest.approx(1.0) for row in layer["share"])
    same = {"image": batch["image"][:2].repeat(2, 1, 1, 1), "group": torch.tensor([0, 0, 1, 1])}
    res = expert_choice_by_group(model, [same], ["a", "b"])
    assert all(v["mutual_information_bits"] == pytest.approx(0.0, abs=1e-12) for v in res["layers"].values())
    fig = plot_choice_by_group(res, "t")
    assert sum(ax.has_data() for ax in fig.axes) == len(res["layers"]) + 1  # + the colour bar


def test_grouped_demo_batches_label_each_sample(tmp_path) -> None:
    from tests.utils import TOK
    from vlmoe.analysis import grouped_demo_batches

    batches, names = grouped_demo_batches("class", 32, None, num_batches=1, batch_size=12)
    assert names == ["circle", "rectangle", "triangle"] and batches[0]["image"].shape == (12, 3, 32, 32)
    assert set(batches[0]["group"].tolist()) == {0, 1, 2}
    batches, names = grouped_demo_batches("answer_type", 32, TOK, num_batches=1, batch_size=16)
    assert names == ["other", "yes/no"] and batches[0]["text_ids"].shape[0] == 16
    with pytest.raises(ValueError, match="unknown grouping"):
        grouped_demo_batches("colour", 32, TOK)


def test_record_routing_sums_every_layer_and_restores_the_layers() -> None:
    from vlmoe.models import create_model
    from vlmoe.moe import MoE, record_routing

    torch.manual_seed(0)
    model = create_model("tiny_mhmoe").eval()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    seen = []
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), record_routing(model, on_stats=lambda layer, s, a, k: seen.append((layer, s))) as acc:
        assert all(m.record_assignments for m in moes)
        out = model(image=img)
    assert not any(m.record_assignments for m in moes) and not any(m._forward_hooks for m in moes)
    vision = [s for s in out.aux.stats if s.name.endswith(".vision")]
    assert vision and {s.name for _, s in seen} == {s.name for s in vision}
    for s in vision:  # the hook's counts are the layers' own
        assert torch.equal(acc.counts[s.name].cpu(), s.tokens_per_expert.long().cpu())
    rows = acc.layers()
    h = moes[0].config.heads
    assert h > 1 and all(1 <= r["distinct_experts_per_token"] <= h * moes[0].config.top_k for r in rows.values())
    assert all(sum(r["counts"]) == r["routed_tokens"] * moes[0].config.top_k for r in rows.values())  # sub-tokens
