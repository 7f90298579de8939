"""The MoE benchmark command runs end to end at toy sizes (it is a script, not a timed test)."""

from __future__ import annotations

import pytest

from vlmoe.bench import moe as bench
from vlmoe.moe import gemm


def test_bench_moe_prints_a_table_with_ideal_and_peers(capsys):
    table = bench.main(["--dim", "32", "--ffn", "64", "--cases", "4x64,mh2:4x64,hmoe-hybrid:4x64",
                        "--repeats", "1"])
    rows = [line for line in table.splitlines() if line.startswith("| E=")]
    impls = {line.split("|")[2].strip() for line in rows}
    assert {"ideal", "vlmoe", "naive loop", "vlmoe plain", "MH-MoE / plain"} <= impls
    try:
        import torchscale  # noqa: F401

        assert "torchscale" in impls
    except ImportError:
        pass
    ideal_rows = [line for line in rows if line.split("|")[2].strip() == "ideal"]
    assert all(line.split("|")[4].strip() == "1.00" for line in ideal_rows)  # ratios are relative to ideal


@pytest.mark.distributed
def test_bench_moe_expert_parallel_split():
    table = bench.main(["--dim", "32", "--ffn", "64", "--cases", "4x64", "--repeats", "1", "--world-size", "2"])
    assert "exchange (ms)" in table and "| E=4, T=64 |" in table


def test_bench_moe_rejects_bad_case():
    with pytest.raises(SystemExit, match="bad case"):
        bench.parse_cases("8by4096")


def test_bench_prints_each_table_line_once(capsys):
    bench.main(["--dim", "32", "--ffn", "64", "--cases", "4x64,8x64", "--repeats", "1", "--no-peers",
                "--recompute-experts", "--sub-ln"])
    out = capsys.readouterr().out.splitlines()
    assert out.count(next(line for line in out if line.startswith("| case |"))) == 1
    recompute = [line for line in out if line.split("|")[2:3] == [" vlmoe recompute "]]
    assert len(recompute) == 2 and all(line.split("|")[7].strip() != "-" for line in recompute)  # with memory
    rows = [line for line in out if line.startswith("| E=")]
    assert len(rows) == len(set(rows)) and {r.split("|")[1].strip() for r in rows} == {"E=4, T=64", "E=8, T=64"}


def test_bench_finetune_runs_every_task_head(capsys):
    from vlmoe.bench import finetune

    table = finetune.main(["--model", "tiny", "--batch", "2", "--image", "32", "--text", "8", "--answers", "13",
                           "--classes", "3", "--repeats", "1"])
    rows = [line for line in table.splitlines() if line.startswith("| ") and "overhead" not in line]
    assert [r.split("|")[1].strip().split(" ")[0] for r in rows] == ["VQA", "NLVR2", "ImageNet"]
    assert all(r.rstrip(" |").endswith("%") for r in rows)


def test_bench_decode_times_cached_and_naive_for_both_searches(capsys):
    from vlmoe.bench import decode

    table = decode.main(["--models", "tiny", "--images", "2", "--tokens", "6", "--lengths", "2,4", "--repeats", "1"])
    rows = [line for line in table.splitlines() if line.startswith("| tiny")]
    assert [r.split("|")[2].strip() for r in rows] == ["greedy", "beam 3"]
    assert all(r.rstrip(" |").endswith("x**") and "est." not in r for r in rows)
    assert capsys.readouterr().out.count("| tiny") == 2  # printed once


def test_bench_predict_compares_the_predictor_with_the_bare_forward(capsys):
    from vlmoe.bench import predict

    table = predict.main(["--models", "tiny", "--images", "4", "--batch-size", "2", "--repeats", "1"])
    rows = [line for line in table.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 1 and rows[0].rstrip(" |").endswith("%")


def test_bench_model_prints_the_flop_ideal_and_times_the_optimizer_step(capsys):
    from vlmoe.bench import model
    from vlmoe.models import VLMoEConfig
    from vlmoe.models.flops import flops_per_token

    table = model.main(["--dense", "tiny", "--moe", "tiny_moe", "--batch", "2", "--text-len", "8", "--repeats", "1",
                        "--no-torchscale", "--no-memory", "--train-step", "--compare-recompute"])
    assert "fwd+bwd+AdamW step" in table
    assert "| vlmoe tiny_moe (recompute_experts=True) |" in table
    row = next(line for line in table.splitlines() if line.startswith("| vlmoe tiny_moe"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    L = 1 + VLMoEConfig.from_name("tiny").num_patches + 8
    ideal = flops_per_token(VLMoEConfig.from_name("tiny_moe"), L)["total"] / flops_per_token(
        VLMoEConfig.from_name("tiny"), L)["total"]
    assert float(cells[4]) == pytest.approx(ideal, abs=0.005)
    assert float(cells[5]) == pytest.approx(float(cells[3]) / ideal, abs=0.02)
    # the AdamW step alone: three implementations on one state, against 28 bytes per parameter at the update rate
    bw = float(table.split("update bandwidth ")[1].split(" GB/s")[0]) * 1e9
    for name in ("tiny", "tiny_moe"):
        row = next(line for line in table.split("AdamW step alone")[1].splitlines()
                   if line.startswith(f"| vlmoe {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        fused, foreach, loop, ideal_ms = (float(c.replace(",", "")) for c in cells[2:6])
        n = VLMoEConfig.from_name(name)
        params = sum(p.numel() for p in model.VLMoE(n).parameters())
        assert ideal_ms == pytest.approx(1e3 * 28 * params / bw, rel=0.06, abs=0.06)
        assert min(fused, foreach, loop) > 0
        # the printed ratio is that of the unrounded times (the cells are rounded to 0.1 ms)
        assert (foreach - 0.05) / (fused + 0.05) - 0.01 <= float(cells[7]) <= (foreach + 0.05) / (fused - 0.05) + 0.01


def test_gemm_efficiency_tool_runs_at_toy_sizes():
    """tools/gemm_efficiency.py (the BLAS-call part of the layer's gap; BLAS against oneDNN) runs end to end."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "gemm_efficiency.py"
    spec = importlib.util.spec_from_file_location("gemm_efficiency", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.main(["--tokens", "32", "--experts", "2", "--dim", "16", "--ffn", "32", "--repeats", "1",
                     "--rows", "4,8", "--layout-rows", "4"])
    assert "| experts: 2 blocks, own weights |" in text and "| 8 |" in text
    if gemm.onednn_available():  # the weight-layout table: both products at the one row count
        assert "| fc1 (16 -> 32) | 4 |" in text and "| fc2 (32 -> 16) | 4 |" in text
    counts = eval(text.split("rows per expert (T=32, top-2 of 2): ")[1].splitlines()[0])
    assert sum(counts) == 64
