"""Expert parallelism: the experts of a layer sharded across the ranks of a process group.

Every rank routes its own tokens with its (replicated) router, then

1. exchanges per-expert row counts with every other rank (one small all-to-all),
2. sends each row to the rank that owns its expert (all-to-all with variable split sizes, dropless),
3. reorders the received rows by local expert, computes them with the local experts,
4. sends the outputs back (the reverse all-to-all) and combines as usual.

The backward pass runs the same exchanges in reverse (the all-to-all of a gradient is the all-to-all
with send and receive splits swapped). Works with any backend that implements ``all_to_all_single``
with uneven splits - NCCL on GPU, gloo on CPU - and with every layer variant (top-k, MH-MoE, HMoE,
Stratified; Stratified all-reduces its loop bound so that every rank runs the same passes).

Composing with data parallelism
-------------------------------
Expert parameters differ between the ranks of an expert-parallel group, so they must not be
averaged by DDP with the dense parameters: :func:`shard_experts` marks them (``p.expert_parallel =
True``) and :func:`ddp_ignore_expert_params` tells DDP to skip them. Each rank's expert gradient then
already sums the contributions of every rank's tokens; ``grad_scale=1/world`` (the default) turns that
sum into the same average that DDP applies to the dense parameters. When several expert-parallel
groups replicate the same experts (world = ep_size x replicas), call :func:`allreduce_expert_grads`
over the replica group after backward (a Lightning ``on_after_backward`` hook) - see the README.
Gradient-norm clipping must take every rank's experts into the norm: :func:`clip_grad_norm_`.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .experts import GroupedExperts, HeteroExperts


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group, timings: dict) -> Tensor:
        ctx.send, ctx.recv, ctx.group, ctx.timings = send, recv, group, timings
        t0 = time.perf_counter()
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        timings["exchange"] += time.perf_counter() - t0
        timings["exchanged_bytes"] += sum(send) * (x.numel() // max(x.shape[0], 1)) * x.element_size()
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        t0 = time.perf_counter()
        out = g.new_empty(sum(ctx.send), *g.shape[1:])
        dist.all_to_all_single(out, g.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        ctx.timings["exchange"] += time.perf_counter() - t0
        return out, None, None, None, None


class _Permute(torch.autograd.Function):
    """rows[perm]; the backward of a permutation is the inverse permutation (a gather, no scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, g: Tensor):
        (inv,) = ctx.saved_tensors
        return g.contiguous().index_select(0, inv), None, None


class ExpertParallel:
    """Expert sharding state of one MoE layer (created by :func:`shard_experts`)."""

    def __init__(self, group, num_experts: int, local_experts: list[range]) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.ranges = local_experts  # experts owned by each rank (contiguous)
        self.local = local_experts[self.rank]
        self.timings: dict[str, float] = defaultdict(float)

    def reset_timings(self) -> None:
        self.timings.clear()

    def all_reduce_min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t)

    def compute(self, layer, rows: Tensor, plan) -> Tensor:
        """(M, d) rows sorted by global expert -> (M, d) outputs, computed on the owning ranks."""
        t0 = time.perf_counter()
        counts = plan.counts.to("cpu", torch.long)  # (E,) rows this rank sends to each expert
        # 1. counts exchange: recv_counts[src, e_local] = rows src sends to my local expert e_local
        per_rank = torch.stack([counts[r.start : r.stop] for r in self.ranges]) if _even(self.ranges) else None
        if per_rank is not None:
            recv_counts = torch.empty_like(per_rank)
            dist.all_to_all_single(recv_counts, per_rank, group=self.group)
        else:  # uneven shards: pad every rank's slice to the largest
            width = max(len(r) for r in self.ranges)
            padded = torch.zeros(self.world, width, dtype=torch.long)
            for i, r in enumerate(self.ranges):
                padded[i, : len(r)] = counts[r.start : r.stop]
            recv_counts = torch.empty_like(padded)
            dist.all_to_all_single(recv_counts, padded, group=self.group)
            recv_counts = recv_counts[:, : len(self.local)]
        send = [int(counts[r.start : r.stop].sum()) for r in self.ranges]
        recv = [int(c) for c in recv_counts.sum(1).tolist()]
        self.timings["routing"] += time.perf_counter() - t0
        # 2. rows to their owners; received rows are ordered (source rank, local expert)
        got = _AllToAll.apply(rows, send, recv, self.group, self.timings)
        # 3. reorder to (local expert, source rank) so each local expert's rows are contiguous
        perm, inv = _src_major_to_expert_major(recv_counts)
        t1 = time.perf_counter()
        local_rows = _Permute.apply(got, perm, inv)
        out = layer.experts(local_rows, recv_counts.sum(0).to(rows.device))
        out = _Permute.apply(out, inv, perm)
        self.timings["compute"] += time.perf_counter() - t1
        # 4. outputs back to the ranks the rows came from
        return _AllToAll.apply(out, recv, send, self.group, self.timings)


def _even(ranges: list[range]) -> bool:
    return len({len(r) for r in ranges}) == 1


def _src_major_to_expert_major(recv_counts: Tensor) -> tuple[Tensor, Tensor]:
    """Permutation taking rows ordered (src, expert) to (expert, src), and its inverse."""
    W, E = recv_counts.shape
    # (W, E) -> (W*E,) exclusive cumsum -> (W, E): first row of each (src, expert) block
    starts = (torch.cumsum(recv_counts.reshape(-1), 0) - recv_counts.reshape(-1)).view(W, E)
    pieces = [
        torch.arange(int(starts[s, e]), int(starts[s, e]) + int(recv_counts[s, e]))
        for e in range(E)
        for s in range(W)
    ]
    perm = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return perm, inv


def expert_ranges(num_experts: int, world: int, sizes: list[int] | tuple[int, ...] | None = None) -> list[range]:
    """Contiguous expert ranges per rank.

    Without ``sizes`` the counts differ by at most one. With ``sizes`` (HMoE expert widths) the split
    minimises the largest per-rank total width - the expert compute and memory each rank carries -
    with at least one expert per rank: for widths ``[1, 1, 1, 1, 2, 2, 4, 4]`` on 2 ranks that is
    experts 0-5 and 6-7 (8 + 8) instead of 0-3 and 4-7 (4 + 12).
    """
    if num_experts < world:
        raise ValueError(f"expert parallelism needs num_experts ({num_experts}) >= group size ({world})")
    if sizes is not None and len(sizes) != num_experts:
        raise ValueError(f"expert_ranges: {len(sizes)} sizes for num_experts={num_experts}")
    if sizes is None or len(set(sizes)) == 1:
        base, extra = divmod(num_experts, world)
        out, s = [], 0
        for r in range(world):
            n = base + (1 if r < extra else 0)
            out.append(range(s, s + n))
            s += n
        return out
    E = num_experts
    prefix = [0]
    for w in sizes:
        prefix.append(prefix[-1] + int(w))
    inf = float("inf")
    # best[r][i]: the smallest possible largest total when the first i experts go to r ranks
    best = [[inf] * (E + 1) for _ in range(world + 1)]
    cut = [[0] * (E + 1) for _ in range(world + 1)]
    best[0][0] = 0
    for r in range(1, world + 1):
        for i in range(r, E - (world - r) + 1):
            for j in range(r - 1, i):
                v = max(best[r - 1][j], prefix[i] - prefix[j])
                if v < best[r][i]:
                    best[r][i], cut[r][i] = v, j
    bounds, i = [E], E
    for r in range(world, 0, -1):
        i = cut[r][i]
        bounds.append(i)
    bounds.reverse()
    return [range(bounds[r], bounds[r + 1]) for r in range(world)]


@torch.no_grad()
def _local_experts(experts: nn.Module, local: range) -> nn.Module:
    """A new experts module holding only the experts in ``local`` (weights copied)."""
    if isinstance(experts, GroupedExperts):
        new = GroupedExperts(
            len(local), experts.dim, experts.ffn_dim, expert_type=experts.expert_type,
            ffn_layernorm=experts.ln_weight is not None, bias=experts.b1 is not None,
            layernorm_eps=experts.layernorm_eps, recompute=experts.recompute,
        )
        for name in ("w1", "w2", "b1", "b2", "ln_weight", "ln_bias"):
            p = getattr(experts, name)
            if p is not None:
                getattr(new, name).copy_(p[local.start : local.stop])
        return new.to(experts.w1.device, experts.w1.dtype)
    if isinstance(experts, HeteroExperts):
        sizes = [experts.sizes[e] for e in local]
        new = HeteroExperts(experts.dim, sizes, expert_type=experts.expert_type, bias=experts.b1 is not None,
                            recompute=experts.recompute)
        d, o = experts.dim, sum(experts.sizes[: local.start])
        f = sum(sizes)
        new.w1.copy_(experts.w1[d * o : d * (o + f)])
        new.w2.copy_(experts.w2[d * o : d * (o + f)])
        if experts.w3 is not None:
            new.w3.copy_(experts.w3[d * o : d * (o + f)])
        if experts.b1 is not None:
            new.b1.copy_(experts.b1[o : o + f])
            new.b2.copy_(experts.b2[d * local.start : d * local.stop])
            if experts.b3 is not None:
                new.b3.copy_(experts.b3[o : o + f])
        return new.to(experts.w1.device, experts.w1.dtype)
    raise TypeError(f"cannot shard experts of type {type(experts).__name__}")


def shard_experts(model: nn.Module, group=None, grad_scale: float | None = None) -> int:
    """Shard the experts of every MoE layer in ``model`` across ``group`` (default: the world).

    Every rank must call this on a model with identical weights (same seed or a loaded checkpoint);
    each keeps only its own experts. Returns the number of layers sharded.

    Args:
        grad_scale: multiplies expert-parameter gradients (default ``1/world``: the average DDP applies
            to dense parameters, since each rank's expert gradient sums all ranks' token contributions).
    """
    from .layer import MoE

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_experts needs an initialised torch.distributed process group")
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    scale = 1.0 / world if grad_scale is None else grad_scale
    n = 0
    for layer in model.modules():
        if not isinstance(layer, MoE) or layer.expert_parallel is not None:
            continue
        ranges = expert_ranges(layer.num_experts, world, layer.config.expert_sizes)
        ep = ExpertParallel(group, layer.num_experts, ranges)
        layer.experts = _local_experts(layer.experts, ep.local)
        for p in layer.experts.parameters():
            p.expert_parallel = True
            if scale != 1.0:
                p.register_hook(lambda g, s=scale: g * s)
        layer.expert_parallel = ep
        n += 1
    return n


def expert_param_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if getattr(p, "expert_parallel", False)]


def ddp_ignore_expert_params(model: nn.Module) -> None:
    """Tell DistributedDataParallel (also under Lightning) not to all-reduce expert parameters."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))


def allreduce_expert_grads(model: nn.Module, replica_group) -> None:
    """Average expert gradients over ranks that hold the same experts (EP inside a larger DP world)."""
    n = dist.get_world_size(replica_group)
    for p in model.parameters():
        if getattr(p, "expert_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=replica_group)
            p.grad.div_(n)


def comm_device(group=None) -> torch.device:
    """Where ``group``'s backend moves tensors: NCCL the current CUDA device, gloo the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, group=None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model whose experts are sharded over ``group``.

    The norm must be the same on every rank and equal to the unsharded model's: dense gradients
    (identical on every rank after DDP's all-reduce) count once, expert gradients (each rank holds
    different experts) are summed - or, for the inf-norm, maxed - over ``group``. Clipping each
    rank by its local norm instead gives the ranks different coefficients, so their dense weights
    drift apart and the run no longer matches plain data parallelism. Returns the total norm.
    """
    norm_type = float(norm_type)
    dense, sharded = [], []
    for p in parameters:
        if p.grad is not None:
            (sharded if getattr(p, "expert_parallel", False) else dense).append(p.grad)
    grads = dense + sharded
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32

    def local(gs: list[Tensor]) -> Tensor:
        if not gs:
            return torch.zeros((), device=device, dtype=acc)
        norms = torch.stack([torch.linalg.vector_norm(g, norm_type, dtype=acc).to(device) for g in gs])
        return norms.max() if norm_type == float("inf") else (norms**norm_type).sum()

    d, s = local(dense), local(sharded)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        op = dist.ReduceOp.MAX if norm_type == float("inf") else dist.ReduceOp.SUM
        t = s.to(comm_device(group))
        dist.all_reduce(t, op=op, group=group)
        s = t.to(device)
    total = torch.maximum(d, s) if norm_type == float("inf") else (d + s) ** (1.0 / norm_type)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
    return total
