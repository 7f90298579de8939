"""The fp32 CPU GEMM backend: oneDNN or ATen's BLAS.

ATen's fp32 ``torch.mm`` / ``F.linear`` call the BLAS PyTorch was built with (MKL on x86-64 builds).
oneDNN ships in the same build (``torch.ops.mkldnn._linear_pointwise``, the kernel Inductor's CPU
backend uses for linears) and computes the same full-fp32 product. Which one is faster depends on the
CPU's maker, because MKL picks its fastest code paths only on Intel's processors:

- AMD EPYC (AVX-512): oneDNN, most of all at the row counts an expert gets in an MoE layer - an fc1
  GEMM of 128 x 768 x 3072 at ~150 GFLOP/s against ~85 through MKL, which reaches its own best
  (~115-170) only from ~512 rows;
- Intel Xeon (AVX-512, 2 cores): MKL, 5-25 % faster than oneDNN on fc1 shapes from 128 to 2,088 rows
  and level on fc2 (``python tools/gemm_efficiency.py``); a whole ``base`` / ``base_moe8`` /
  ``base_mhmoe8`` training step 9-20 % faster (BENCHMARKS.md, "the GEMM library by CPU maker");
- AMD EPYC (Zen 3, AVX2, 2 cores): oneDNN 5-20 % ahead of MKL with an (out, in)
  weight, but a third slower than MKL with a transposed one, which oneDNN reorders in every call - hence
  :func:`onednn_takes`: whichever the backend, a product whose weight is not (out, in)-contiguous takes
  the BLAS (a ``base_moe8`` training step 15 % faster on that VM, the dense ``base`` 3 %).

``VLMOE_CPU_GEMM`` picks the backend: ``auto`` (the default: ATen's BLAS where it is MKL on an Intel
CPU, else oneDNN where it is available on x86-64, else BLAS), ``onednn`` (an error where it is not
available) or ``blas``. :func:`cpu_gemm` sets it for a block of code (benchmarks, tests). What goes
through it: fp32 CPU tensors outside autocast and ``torch.compile`` (Inductor picks its own kernels);
every other dtype or device takes ATen's path.

- :func:`rows_mm` - ``out = a @ b``, the expert kernels' row GEMMs (one expert's block of rows); oneDNN
  only where ``b`` is the transpose of an (out, in) weight (:func:`onednn_takes`), else the BLAS.
- :func:`linear` / :class:`Linear` - ``F.linear`` / ``nn.Linear`` with oneDNN for the forward product
  (bias fused); the input gradient (a product with the transposed weight) and the weight gradient (a
  reduction over all the rows) stay with the BLAS. :class:`Linear` is an ``nn.Linear`` (same parameters
  and state dict); :func:`use_fast_linears` converts a module's ``nn.Linear`` children in place (timm's
  ``Mlp`` builds its own).

``torch.utils.flop_counter.FlopCounterMode`` counts oneDNN's linear as it counts ``aten.mm``: this
module registers its FLOP formula (2 x rows x in x out).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("auto", "onednn", "blas")
_override: str | None = None


@functools.cache
def onednn_available() -> bool:
    """oneDNN's fp32 linear is in this torch build, on x86-64."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), or ``""`` where it cannot be read."""
    return _cpu_vendor()


@functools.cache
def _cpu_vendor() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("vendor_id"):
                return line.partition(":")[2].strip()
    proc = platform.processor()  # Windows: "Intel64 Family 6 ... GenuineIntel"
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in proc), "")


def auto_backend() -> str:
    """What ``auto`` means on this machine: ``"blas"`` where ATen's BLAS is MKL on an Intel CPU (MKL is
    fastest there), else ``"onednn"`` where :func:`onednn_available`, else ``"blas"``."""
    if torch.backends.mkl.is_available() and cpu_vendor() == "GenuineIntel":
        return "blas"
    return "onednn" if onednn_available() else "blas"


def _resolve(mode: str, source: str) -> str:
    mode = mode.strip().lower()
    if mode not in BACKENDS:
        raise ValueError(f"{source}={mode!r}: expected one of {', '.join(BACKENDS)}")
    if mode == "onednn" and not onednn_available():
        raise RuntimeError(f"{source}=onednn: oneDNN's fp32 linear is not available in this torch build / on "
                           f"this machine ({platform.machine()})")
    if mode == "auto":
        return auto_backend()
    return mode


@functools.cache
def _from_env(value: str) -> str:
    return _resolve(value, "VLMOE_CPU_GEMM")


def cpu_gemm_backend() -> str:
    """The backend fp32 CPU GEMMs use now: ``"onednn"`` or ``"blas"``."""
    if _override is not None:
        return _override
    return _from_env(os.environ.get("VLMOE_CPU_GEMM", "auto"))


@contextlib.contextmanager
def cpu_gemm(mode: str) -> Iterator[str]:
    """Use ``mode`` (``auto``, ``onednn`` or ``blas``) for the GEMMs run inside the block."""
    global _override
    before, _override = _override, _resolve(mode, "cpu_gemm")
    try:
        yield _override
    finally:
        _override = before


def use_onednn(t: Tensor) -> bool:
    """Whether a GEMM on ``t`` goes through oneDNN now."""
    return (
        not torch.compiler.is_compiling()  # first: under torch.compile nothing below is traced
        and t.dtype == torch.float32
        and t.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and cpu_gemm_backend() == "onednn"
    )


def _dnn(a: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """a @ w.T + b through oneDNN (``w``: (out, in), any strides)."""
    return torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")


def onednn_takes(b: Tensor, onednn: bool) -> bool:
    """Whether ``a @ b`` goes through oneDNN (``onednn``: the backend the caller decided): only where ``b.t()``,
    the (out, in) weight oneDNN reads, is contiguous. oneDNN's linear reorders a transposed weight in every
    call and loses a third of its throughput to it (an fc1 GEMM of 128 x 768 x 3072 with eight weight sets:
    57-64 GFLOP/s against 83-122 with (out, in) weights, on an AMD EPYC VM), where the BLAS reads either
    layout at ~75-110; so a row-major (in, out) ``b`` - the experts' stacked weights in forward, a linear's
    weight in its input gradient - takes the BLAS."""
    return onednn and b.t().is_contiguous()


def rows_mm(a: Tensor, b: Tensor, out: Tensor, onednn: bool | None = None, bias: Tensor | None = None) -> Tensor:
    """``out = a @ b (+ bias)`` for 2-D ``a`` (M, K), ``b`` (K, N), ``out`` (M, N), ``bias`` (N,); returns ``out``.

    ``onednn``: the backend decided by the caller (an autograd function decides once in its forward, so
    its backward runs on the same one); None decides from ``a``. oneDNN (where :func:`onednn_takes` ``b``)
    fuses the bias; on the BLAS, ``mm`` then ``add_`` (~1.5x faster on CPU than ``addmm(out=)``, which
    copies the broadcast bias into the output and runs a beta=1 GEMM)."""
    if onednn_takes(b, use_onednn(a) if onednn is None else onednn):
        return out.copy_(_dnn(a, b.t(), bias))  # oneDNN has no out= variant; the copy is of one block
    torch.mm(a, b, out=out)
    return out if bias is None else out.add_(bias)


def rows_product(a: Tensor, b: Tensor, scratch: Tensor | None, onednn: bool, bias: Tensor | None = None) -> Tensor:
    """``a @ b (+ bias)``: through oneDNN its own fresh result, on the BLAS written into ``scratch`` (M, N)
    (a fresh tensor where it is None: pass one wherever ``onednn_takes(b, onednn)`` is False).

    For a product that is used where it is made: skips :func:`rows_mm`'s copy of oneDNN's result into a
    buffer, a pass over (M, N) that costs a quarter of the GEMM at an expert FFN's hidden width."""
    if onednn_takes(b, onednn):
        return _dnn(a, b.t(), bias)
    if scratch is None:
        scratch = a.new_empty(a.shape[0], b.shape[1])
    return rows_mm(a, b, scratch, False, bias)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _dnn(x, w, b)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = torch.mm(g, w) if need_x else None  # w.t() is transposed for oneDNN (see onednn_takes)
        gw = torch.mm(g.t(), x) if need_w else None
        gb = g.sum(0) if need_b and ctx.has_bias else None
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` (``x @ weight.T + bias``), through oneDNN for fp32 CPU tensors (see the module)."""
    if not (use_onednn(x) and weight.dtype == torch.float32 and x.dim() >= 1 and weight.dim() == 2
            and weight.is_contiguous() and (bias is None or bias.dtype == torch.float32)):
        return F.linear(x, weight, bias)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input of shape {tuple(x.shape)} does not match a weight of shape "
                         f"{tuple(weight.shape)} (in_features {weight.shape[1]})")
    lead = x.shape[:-1]
    y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)  # (*lead, in) -> (N, in)
    return y.view(*lead, weight.shape[0])  # (N, out) -> (*lead, out)


class Linear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU product goes through :func:`linear` (same parameters and state dict)."""

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)


def use_fast_linears(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` in ``module`` (itself included) a :class:`Linear`, in place.

    Only the class changes - parameters, buffers, hooks and the state dict stay as they are."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return module


def _register_flop_formula() -> None:
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(op)
    def _linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(out_shape) * x_shape[-1]  # (rows x out) outputs, each an in-long dot product


_register_flop_formula()
