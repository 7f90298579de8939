"""`vlmoe study`: the parity rule (FFN FLOPs per token of the variants within 5 % of each other, from
their configs; the FLOP formula equals what torch's FLOP counter measures), the statistics (Welch's
test against known values, mean / std on crafted results), and resumability with real jobs (a study
stopped after one job resumes without redoing it; unreadable, incomplete or out-of-date result files
are redone)."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmoe.models.flops import ffn_flops_per_token
from vlmoe.moe import MoE, MoEConfig, expected_moe_flops_per_token, expected_passes
from vlmoe.study import (
    VARIANTS,
    aggregate,
    plan,
    read_result,
    run_study,
    variant_config,
    welch_t_test,
    write_report,
)


def test_variants_spend_the_same_ffn_flops_per_token() -> None:
    flops = {v: ffn_flops_per_token(variant_config(v))["mean"] for v in VARIANTS if v != "dense_narrow"}
    lo, hi = min(flops.values()), max(flops.values())
    assert hi / lo <= 1.05, flops
    assert ffn_flops_per_token(variant_config("dense_narrow"))["mean"] == pytest.approx(flops["dense"] / 2)


@pytest.mark.parametrize("config", [
    MoEConfig(num_experts=4, top_k=2, ffn_dim=128),
    MoEConfig(num_experts=4, top_k=2, ffn_dim=96, heads=2, router="xmoe"),
    MoEConfig(num_experts=8, top_k=1, ffn_dim=64, expert_type="swiglu"),
], ids=["top2", "mhmoe", "swiglu-top1"])
def test_flop_formula_is_what_the_layer_computes(config: MoEConfig) -> None:
    """Matrix FLOPs the layer really runs (torch's FLOP counter over its forward) / tokens = the formula."""
    torch.manual_seed(0)
    layer = MoE(64, config).eval()
    x = torch.randn(3, 50, 64)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    assert counter.get_total_flops() / 150 == pytest.approx(expected_moe_flops_per_token(64, config), rel=1e-9)


def test_expected_passes_is_the_mean_of_uniform_routing() -> None:
    assert expected_passes(MoEConfig(num_experts=4, top_k=1)) == 1.0
    assert expected_passes(MoEConfig(num_experts=4, top_k=1, strata=[2, 2])) == pytest.approx(1.5)
    strata = [1, 1, 2]
    rng, total, n = random.Random(0), 0, 200_000
    for _ in range(n):  # tokens choosing uniformly among their eligible experts
        s, passes = 0, 0
        while s < len(strata):
            passes += 1
            eligible = [j for j in range(s, len(strata)) for _ in range(strata[j])]
            s = rng.choice(eligible) + 1
        total += passes
    assert expected_passes(MoEConfig(num_experts=4, top_k=1, strata=strata)) == pytest.approx(total / n, abs=0.01)
    assert expected_passes(MoEConfig(num_experts=4, top_k=1, strata=strata)) == pytest.approx(1 + 1 / 3 + 1 / 4)
    with pytest.raises(ValueError, match="top-p"):
        expected_moe_flops_per_token(64, MoEConfig(num_experts=4, top_k=2, top_p=0.6, ffn_dim=64))


def _t_tail_by_integration(t: float, df: float, n: int = 20_000) -> float:
    """P(|T| >= |t|) for Student's t, by integrating its density (an independent oracle)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    total = 0.0
    for i in range(n):  # x = |t| + u / (1 - u) maps [0, 1) onto [|t|, inf)
        u = (i + 0.5) / n
        x = abs(t) + u / (1 - u)
        total += c * (1 + x * x / df) ** (-(df + 1) / 2) / (1 - u) ** 2
    return 2 * total / n


def test_welch_t_test_matches_known_values() -> None:
    r = welch_t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])  # t = -3.674, df = 4: p = 0.0213 (tables)
    assert r["t"] == pytest.approx(-3.6742, abs=1e-4) and r["df"] == pytest.approx(4.0)
    assert r["p"] == pytest.approx(0.021312, abs=2e-6)
    for a, b in [([0.0, 1.0, 2.0], [1.0, 2.0, 3.0]), ([10.0, 10.5, 9.5, 10.2], [12.0, 8.0, 15.0]),
                 ([0.51, 0.52, 0.50], [0.70, 0.71, 0.69, 0.72])]:
        r = welch_t_test(a, b)
        assert r["p"] == pytest.approx(_t_tail_by_integration(r["t"], r["df"]), abs=1e-6), (a, b)
    assert 2.0 < welch_t_test([10.0, 10.5, 9.5, 10.2], [12.0, 8.0, 15.0])["df"] < 2.1  # Welch's df, not n1 + n2 - 2
    assert math.isnan(welch_t_test([1.0], [2.0, 3.0])["p"])  # one seed: not testable


def test_aggregate_gives_mean_std_and_calls_only_clear_differences() -> None:
    values = {"dense": [0.50, 0.52, 0.51], "xmoe": [0.52, 0.49, 0.53], "mhmoe": [0.70, 0.71, 0.72]}
    res = [{"variant": v, "seed": seed, "task": "vqav2", "metrics": {"accuracy": xs[seed]}}
           for v, xs in values.items() for seed in range(3)]
    agg = aggregate(res)["vqav2"]["accuracy"]
    for v, xs in values.items():
        assert agg[v]["mean"] == pytest.approx(statistics.mean(xs))
        assert agg[v]["std"] == pytest.approx(statistics.stdev(xs))
        assert agg[v]["values"] == xs and agg[v]["n"] == 3
    assert agg["mhmoe"]["vs_reference"]["resolved"] and agg["mhmoe"]["vs_reference"]["difference"] > 0.19
    assert not agg["xmoe"]["vs_reference"]["resolved"]  # within the seeds' spread
    assert "vs_reference" not in agg["dense"]


def test_study_resumes_without_redoing_and_redoes_bad_results(tmp_path, capsys) -> None:
    jobs = plan(tmp_path, ["xmoe"], [0], ["routing"], "smoke")
    assert [j.task for j in jobs] == ["pretrain", "routing"]
    assert run_study(jobs, tmp_path, max_jobs=1) == {"ran": 1, "done": 1, "skipped": 0, "failed": 0}
    first = jobs[0].result.stat().st_mtime_ns
    stored = read_result(jobs[0])
    assert stored["metrics"]["val_loss"] > 0 and stored["command"][:2] == ["vlmoe", "pretrain"]
    assert stored["metrics"]["val_mlm_pair"] > 0 and stored["metrics"]["val_mim_image"] > 0
    assert read_result(jobs[1]) is None
    assert run_study(jobs, tmp_path) == {"ran": 1, "done": 1, "skipped": 1, "failed": 0}  # resumed
    assert jobs[0].result.stat().st_mtime_ns == first  # not redone
    assert 0 < read_result(jobs[1])["metrics"]["activation_ratio"] <= 1
    jobs[1].result.write_text(jobs[1].result.read_text()[:40])  # a truncated result file
    assert run_study(jobs, tmp_path) == {"ran": 1, "done": 1, "skipped": 1, "failed": 0}
    assert "unreadable" in capsys.readouterr().out and read_result(jobs[1]) is not None
    data = json.loads(jobs[0].result.read_text())
    del data["metrics"]["samples_per_s"]
    jobs[0].result.write_text(json.dumps(data))
    assert read_result(jobs[0]) is None and "incomplete" in capsys.readouterr().out
    other = plan(tmp_path, ["xmoe"], [0], ["routing"], "demo")  # other options: the stored result is stale
    jobs[0].result.write_text(json.dumps({**data, "metrics": {**data["metrics"], "samples_per_s": 1.0}}))
    assert read_result(jobs[0]) is not None and read_result(other[0]) is None
    summary = write_report(tmp_path, jobs, ["xmoe"])
    report = (tmp_path / "study.md").read_text()
    assert summary["done"] == 2 and "| pretrain | val loss |" in report and "| pretrain | samples/s |" in report
    assert "| pretrain | val MLM, pairs |" in report and "| pretrain | val MIM, images |" in report  # the terms
    assert (tmp_path / "study.png").stat().st_size > 1000


def test_plan_refuses_unknown_names(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown study variant 'moe'"):
        plan(tmp_path, ["moe"], [0], ["vqav2"], "demo")
    with pytest.raises(ValueError, match="unknown study task"):
        plan(tmp_path, ["dense"], [0], ["vqa"], "demo")
    with pytest.raises(ValueError, match="unknown budget"):
        plan(tmp_path, ["dense"], [0], ["vqav2"], "huge")
