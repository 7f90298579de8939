"""Where an MoE layer's GEMMs lose throughput on CPU, measured side by side in one process.

    python tools/gemm_efficiency.py --tokens 512 --experts 8 --dim 768 --ffn 3072

Four tables (fp32, GFLOP/s; median of ``--repeats`` interleaved calls):

1. ``rows``: one fc1 / fc2 GEMM shape at a given number of rows (the rows an expert gets), hot weights;
2. ``layer``: the six GEMMs of a top-k layer's forward + backward over its experts' real row counts
   (from a router over random tokens), each expert with its own weights - against the same six GEMMs
   of the ideal (k x a dense FFN over all T rows, one weight set): the part of ``vlmoe bench moe``'s
   gap that is in the BLAS calls themselves (``torch.mm``, whatever ``VLMOE_CPU_GEMM`` says), before any
   routing, dispatch or element-wise work;
3. ``library``: the same fc1 shapes through ATen's BLAS (``torch.mm``: MKL on x86 builds) and through
   oneDNN (``torch.ops.mkldnn._linear_pointwise``, the kernel Inductor's CPU backend uses for linears),
   full fp32 both: which fraction of the machine's floating-point throughput each library reaches;
4. ``layout``: fc1 and fc2 with one weight set per expert through oneDNN with (out, in) weights, oneDNN with
   transposed ones (the experts' (E, in, out) weights, a linear's input gradient), the BLAS, and the
   engine's ``rows_mm`` (which takes the BLAS for a transposed weight: ``vlmoe.moe.gemm.onednn_takes``).
"""

from __future__ import annotations

import argparse
import time

import torch

from vlmoe.moe import MoE, MoEConfig


def _median(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def _six_gemms(x, h, gy, w1, w2, counts, out):
    """fc1, fc2 and the four backward GEMMs of each expert's block of rows (its own weights)."""
    o1, o2, gw1, gw2, gh, gx = out
    s = 0
    for e, n in enumerate(counts):
        r = slice(s, s + n)
        torch.mm(x[r], w1[e], out=o1[r])
        torch.mm(h[r], w2[e], out=o2[r])
        torch.mm(h[r].t(), gy[r], out=gw2[e])
        torch.mm(gy[r], w2[e].t(), out=gh[r])
        torch.mm(x[r].t(), gh[r], out=gw1[e])
        torch.mm(gh[r], w1[e].t(), out=gx[r])
        s += n


def _layout_calls(xs, w_in_out, w_out_in, out, lin) -> tuple:
    from vlmoe.moe.gemm import rows_mm, use_onednn

    E, dnn = len(xs), use_onednn(xs[0])
    return (
        lambda: [lin(xs[e], w_out_in[e], None, "none", [], "") for e in range(E)],
        lambda: [lin(xs[e], w_in_out[e].t(), None, "none", [], "") for e in range(E)],
        lambda: [torch.mm(xs[e], w_in_out[e], out=out) for e in range(E)],
        lambda: [rows_mm(xs[e], w_in_out[e], out, dnn) for e in range(E)],
    )


def _layout_table(args: argparse.Namespace, lin) -> list[str]:
    """Table 4: oneDNN with an (out, in) weight, with a transposed one, and the BLAS, per product and rows.

    One weight set per expert (``--experts``; cold in cache, as an MoE layer's); ``rows_mm`` is the engine's own
    call with the experts' (E, in, out) weights (:func:`vlmoe.moe.gemm.onednn_takes` picks the library)."""
    from vlmoe.moe.gemm import cpu_gemm_backend

    d, f, E = args.dim, args.ffn, args.experts
    lines = [f"| product | rows | oneDNN, (out, in) weight | oneDNN, transposed weight | BLAS | rows_mm "
             f"({cpu_gemm_backend()}) |", "|---|---:|---:|---:|---:|---:|"]
    for r in [int(v) for v in args.layout_rows.split(",")]:
        for name, i, o in ((f"fc1 ({d} -> {f})", d, f), (f"fc2 ({f} -> {d})", f, d)):
            xs = [torch.randn(r, i) for _ in range(E)]
            w_in_out = torch.randn(E, i, o)  # the experts' layout; its [e].t() is a transposed (out, in) weight
            w_out_in = torch.randn(E, o, i)
            out = torch.empty(r, o)
            ts = [_median(fn, args.repeats) for fn in _layout_calls(xs, w_in_out, w_out_in, out, lin)]
            fl = 2 * E * r * i * o
            lines.append(f"| {name} | {r} | " + " | ".join(f"{fl / t / 1e9:.0f}" for t in ts) + " |")
    return lines


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rows", default="64,128,192,256,512,1024", help="row counts of table 1")
    p.add_argument("--layout-rows", default="128,512,1576", help="row counts of table 4")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    d, f, E, k, T = args.dim, args.ffn, args.experts, args.top_k, args.tokens
    lines = [f"fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, dim={d}, ffn={f}", ""]

    # 1. throughput against the rows of one GEMM
    w1, w2 = torch.randn(d, f), torch.randn(f, d)
    rows = [int(r) for r in args.rows.split(",")]
    big = max(rows)
    x, h, o1, o2 = torch.randn(big, d), torch.randn(big, f), torch.empty(big, f), torch.empty(big, d)
    lines += ["| rows | fc1 (rows x dim x ffn) GFLOP/s | fc2 (rows x ffn x dim) GFLOP/s |", "|---:|---:|---:|"]
    for n in rows:
        fl = 2 * n * d * f
        a = _median(lambda n=n: torch.mm(x[:n], w1, out=o1[:n]), args.repeats)
        b = _median(lambda n=n: torch.mm(h[:n], w2, out=o2[:n]), args.repeats)
        lines.append(f"| {n} | {fl / a / 1e9:.0f} | {fl / b / 1e9:.0f} |")

    # 2. the layer's GEMMs at its real counts, per-expert weights, against the ideal's
    layer = MoE(d, MoEConfig(num_experts=E, top_k=k, ffn_dim=f, check_finite=False))
    with torch.no_grad():
        counts = [int(c) for c in layer(torch.randn(T, d))[1].tokens_per_expert.tolist()]
    M = sum(counts)
    W1, W2 = torch.randn(E, d, f), torch.randn(E, f, d)
    xs, hs, gy = torch.randn(M, d), torch.randn(M, f), torch.randn(M, d)
    bufs = (torch.empty(M, f), torch.empty(M, d), torch.empty(E, d, f), torch.empty(E, f, d), torch.empty(M, f),
            torch.empty(M, d))
    ibufs = (torch.empty(T, f), torch.empty(T, d), torch.empty(1, d, f), torch.empty(1, f, d), torch.empty(T, f),
             torch.empty(T, d))
    xi, hi, gi = xs[:T], hs[:T], gy[:T]
    t_layer = _median(lambda: _six_gemms(xs, hs, gy, W1, W2, counts, bufs), args.repeats)
    t_ideal = k * _median(lambda: _six_gemms(xi, hi, gi, W1[:1], W2[:1], [T], ibufs), args.repeats)
    fl = 6 * 2 * M * d * f
    lines += ["", f"rows per expert (T={T}, top-{k} of {E}): {counts}", "",
              "| GEMMs of fwd + bwd | time (ms) | GFLOP/s | x ideal |", "|---|---:|---:|---:|",
              f"| ideal: {k} x dense FFN over {T} rows | {t_ideal * 1e3:.1f} | {fl / t_ideal / 1e9:.0f} | 1.00 |",
              f"| experts: {E} blocks, own weights | {t_layer * 1e3:.1f} | {fl / t_layer / 1e9:.0f} | "
              f"{t_layer / t_ideal:.2f} |"]

    # 3. the BLAS library against oneDNN on the same shapes
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        lin = torch.ops.mkldnn._linear_pointwise
        w1t = W1.transpose(1, 2).contiguous()  # (E, ffn, dim): the (out, in) layout a linear takes
        ref = xs[: counts[0]].double() @ W1[0].double()
        err_dnn = (lin(xs[: counts[0]], w1t[0], None, "none", [], "").double() - ref).abs().max().item()
        err_mm = (torch.mm(xs[: counts[0]], W1[0]).double() - ref).abs().max().item()

        def experts_mm():
            s = 0
            for e, n in enumerate(counts):
                torch.mm(xs[s : s + n], W1[e], out=bufs[0][s : s + n])
                s += n

        def experts_dnn():
            s = 0
            for e, n in enumerate(counts):
                lin(xs[s : s + n], w1t[e], None, "none", [], "")
                s += n

        fl1 = 2 * M * d * f
        fli = 2 * T * d * f
        rows3 = [
            ("fc1 of the experts (own weights, real counts)", experts_mm, experts_dnn, fl1),
            (f"fc1 over {T} rows (one weight set)",
             lambda: torch.mm(xi, W1[0], out=bufs[0][:T]), lambda: lin(xi, w1t[0], None, "none", [], ""), fli),
        ]
        lines += ["", "| fc1 GEMMs | torch.mm (BLAS) GFLOP/s | oneDNN GFLOP/s | oneDNN / BLAS |",
                  "|---|---:|---:|---:|"]
        for name, a, b, flops in rows3:
            ta, tb = _median(a, args.repeats), _median(b, args.repeats)
            lines.append(f"| {name} | {flops / ta / 1e9:.0f} | {flops / tb / 1e9:.0f} | {ta / tb:.2f} |")
        lines.append(f"\nmax |error| against fp64 on one block: BLAS {err_mm:.1e}, oneDNN {err_dnn:.1e}")
        lines += ["", *_layout_table(args, lin)]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
