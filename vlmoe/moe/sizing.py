"""Sizing helpers: parameter / FLOP counts and MH-MoE configurations matched to a plain MoE.

Counts use the leading (matrix) terms only, as the papers do; biases and norms are ignored.

- :func:`mhmoe_param_parity` - MH-MoE v1 (arXiv 2404.15045, appendix D): keep E and k, widen each
  expert so that total parameters match: 2d^2 (head + merge) + E * 2 (d/h) F' = E * 2 d F, i.e.
  F' = h * (F - d/E)  (= h * beta * F with beta = 1 - d/(E F)). FLOPs are then ~h times higher.
- :func:`expected_moe_flops_per_token` - any layer's FLOPs per token from its config (router included;
  HMoE at the mean width, Stratified MoE at the expected passes, both under uniform routing).
- :func:`mhmoe_flop_parity` - the follow-up (arXiv 2411.16205, eqs. 8-9): keep k, set the expert
  width to d_mh = F - d/k so that FLOPs per token match (4 d^2 + 4 k d d_mh = 4 k d F), and choose
  the expert count from the parameter equation 2 d F E = 2 d^2 + 2 (d/h) d_mh E'.
"""

from __future__ import annotations

from .config import MoEConfig


def _ffn_mats(config: MoEConfig) -> int:
    return 3 if config.expert_type == "swiglu" else 2


def moe_params(dim: int, config: MoEConfig) -> int:
    """Matrix parameters of a layer: experts + MH-MoE projections (router excluded)."""
    sub = dim // config.heads
    proj = 2 * dim * dim if config.use_head_projections else 0
    return proj + sum(_ffn_mats(config) * sub * f for f in config.sizes)


def moe_flops_per_token(dim: int, config: MoEConfig) -> int:
    """Forward multiply-adds x 2 per token: projections + h sub-tokens x k experts (homogeneous top-k)."""
    if config.expert_sizes is not None or config.top_p is not None or config.strata is not None:
        raise ValueError("moe_flops_per_token is defined for homogeneous top-k layers; FLOPs of HMoE / top-p / "
                         "Stratified layers depend on the routing (see RoutingStats.activated_params_per_token)")
    return int(expected_moe_flops_per_token(dim, config, router=False))


def router_flops_per_subtoken(dim: int, config: MoEConfig, num_experts: int | None = None) -> int:
    """Forward FLOPs of scoring one (sub-)token: ``2 d' E`` for linear routers, ``2 d' r + 2 r E`` for the
    X-MoE router (projection to ``r`` dims, then the expert embeddings); ``d' = dim / heads``."""
    sub, E = dim // config.heads, num_experts or config.num_experts
    if config.router.startswith("xmoe"):
        r = config.resolved_router_dim
        return 2 * sub * r + 2 * r * E
    return 2 * sub * E


def expected_passes(config: MoEConfig) -> float:
    """Stratified MoE: the mean expert passes per token if every router chose uniformly among its
    eligible experts (1 for other layers). From stratum s a token picks an expert of stratum j >= s
    with probability n_j / (n_s + ... + n_L) and continues at j + 1."""
    if not config.strata:
        return 1.0
    n = list(config.strata)
    L = len(n)
    after = [0.0] * (L + 1)  # after[s]: expected passes of a token at stratum s (after[L] = 0)
    for s in range(L - 1, -1, -1):
        eligible = sum(n[s:])
        after[s] = 1.0 + sum(n[j] / eligible * after[j + 1] for j in range(s, L))
    return after[0]


def expected_moe_flops_per_token(dim: int, config: MoEConfig, router: bool = True) -> float:
    """Forward FLOPs per token of any MoE layer under uniform routing, from its config alone.

    Projections (MH-MoE) + h sub-tokens x [router + k experts of the mean expert width], times the
    expected passes of a Stratified layer. Exact (not an expectation) for homogeneous top-k layers,
    where it equals :func:`moe_flops_per_token` plus the router. For HMoE the real cost depends on which
    sizes the router prefers and for Stratified MoE on how many passes tokens take: the routing
    statistics measure both (``activated_params_per_token``, ``passes_per_token``). top-p layers have
    no config-determined expert count and raise.
    """
    if config.top_p is not None:
        raise ValueError("a top-p layer activates a data-dependent number of experts: its FLOPs are not a function "
                         "of the config (measure them: RoutingStats.activated_params_per_token)")
    sub = dim // config.heads
    proj = 2 * 2 * dim * dim if config.use_head_projections else 0
    sizes = config.sizes
    mean_width = sum(sizes) / len(sizes)
    if config.strata:
        per_pass, offset = [], 0
        for n_s in config.strata:  # the routers of the strata score fewer and fewer experts
            per_pass.append(router_flops_per_subtoken(dim, config, config.num_experts - offset) if router else 0)
            offset += n_s
        route = sum(per_pass) / len(per_pass)
    else:
        route = router_flops_per_subtoken(dim, config) if router else 0
    expert = config.top_k * 2 * _ffn_mats(config) * sub * mean_width
    return proj + config.heads * expected_passes(config) * (route + expert)


def mhmoe_param_parity(dim: int, config: MoEConfig, heads: int = 4) -> MoEConfig:
    """MH-MoE v1: same experts and k, expert width widened to match the plain layer's parameters."""
    if dim % heads:
        raise ValueError(f"dim={dim} is not divisible by heads={heads}")
    f = round(heads * (config.ffn_dim - dim / config.num_experts))
    if f < 1:
        raise ValueError(f"no parameter-parity width for dim={dim}, ffn_dim={config.ffn_dim}, E={config.num_experts}")
    return config.replace(heads=heads, ffn_dim=f, head_projections=True)


def mhmoe_flop_parity(dim: int, config: MoEConfig, heads: int = 4) -> MoEConfig:
    """MH-MoE v2 (FLOP parity): d_mh = F - d/k, experts from 2 d F E = 2 d^2 + 2 (d/h) d_mh E'."""
    if dim % heads:
        raise ValueError(f"dim={dim} is not divisible by heads={heads}")
    k = config.top_k
    d_mh = round(config.ffn_dim - dim / k)
    if d_mh < 1:
        raise ValueError(f"no FLOP-parity width: ffn_dim={config.ffn_dim} <= dim/k={dim / k}")
    experts = round(heads * (config.ffn_dim * config.num_experts - dim) / d_mh)
    experts = max(experts, k)
    return config.replace(heads=heads, ffn_dim=d_mh, num_experts=experts, head_projections=True)


HMOE_SCHEDULES = ("arithmetic", "geometric", "hybrid", "uniform")


def hmoe_expert_sizes(schedule: str, num_experts: int = 8, total: int | None = None, multiple: int = 1) -> list[int]:
    """Expert widths for HMoE (arXiv 2408.10681, section 4 / table of schedules), scaled to ``total``.

    - ``arithmetic``: relative sizes 9, 11, 13, ... (the paper's main setting, 9..23 for 8 experts);
      with total=12288 this gives 96 * {9, 11, ..., 23}, with total=32768 {2304, 2816, ..., 5888}.
    - ``geometric``: 1, 2, 4, ... (the paper's worst: small experts starve).
    - ``hybrid``: half the experts at 1, a quarter at 2, a quarter at 4 ({1,1,1,1,2,2,4,4} for 8).
    - ``uniform``: all equal (the homogeneous baseline at the same total width).

    Args:
        total: sum of all widths (e.g. E * the homogeneous expert width, for equal total parameters).
        multiple: round every width to a multiple of this (kernel-friendly sizes); the sum is then
            only approximately ``total``.
    """
    E = num_experts
    if schedule == "arithmetic":
        rel = [9 + 2 * i for i in range(E)]
    elif schedule == "geometric":
        rel = [2**i for i in range(E)]
    elif schedule == "hybrid":
        if E % 4:
            raise ValueError(f"the hybrid schedule needs num_experts divisible by 4, got {E}")
        rel = [1] * (E // 2) + [2] * (E // 4) + [4] * (E // 4)
    elif schedule == "uniform":
        rel = [1] * E
    else:
        raise ValueError(f"unknown HMoE schedule {schedule!r}; choose from {HMOE_SCHEDULES}")
    if total is None:
        return rel
    scale = total / sum(rel)
    sizes = [max(multiple, round(r * scale / multiple) * multiple) for r in rel]
    if multiple == 1:  # make the sum exact: put the rounding remainder on the largest expert
        sizes[-1] += total - sum(sizes)
    return sizes
