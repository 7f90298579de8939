"""The vlmoe Mixture-of-Experts engine (pure torch; usable in any transformer).

    from vlmoe.moe import MoEConfig, MoE
    layer = MoE(dim=768, config=MoEConfig(num_experts=8, top_k=2, ffn_dim=3072))
    y, aux = layer(x, padding_mask=None)   # aux.loss: scalar; aux.tokens_per_expert: (E,)
"""

import torch.distributed as _dist

if _dist.is_available():
    # torch.distributed.nn.functional binds ``group.WORLD`` into its functions' default arguments when
    # first imported, and DistributedDataParallel imports it lazily: imported after init_process_group,
    # it pins the default group for good, destroy_process_group cannot join gloo's worker threads, and
    # they race the interpreter's shutdown (an intermittent abort at exit, "terminate called without an
    # active exception"). Imported here, before any group exists, its defaults are None.
    import torch.distributed.nn.functional  # noqa: F401

from . import workspace
from .config import MoEConfig, MoEOptions
from .dispatch import DispatchPlan, combine, dispatch, expert_capacity, make_plan
from .experts import GroupedExperts, HeteroExperts
from .grouped import grouped_linear
from .layer import MoE, NonFiniteRoutingError, defer_finite_checks
from .losses import load_balance_loss, p_penalty_loss, router_entropy_loss, router_z_loss
from .recording import record_routing
from .routers import (
    CosineRouter,
    LinearRouter,
    Router,
    RouterOutput,
    apply_bias_updates,
    build_router,
    defer_bias_updates,
)
from .sizing import (
    expected_moe_flops_per_token,
    expected_passes,
    hmoe_expert_sizes,
    mhmoe_flop_parity,
    mhmoe_param_parity,
    moe_flops_per_token,
    moe_params,
)
from .stats import (
    MoEAux,
    RoutingStats,
    RoutingStatsAccumulator,
    activation_ratio,
    load_cv,
    load_entropy,
)

__all__ = [
    "expected_moe_flops_per_token",
    "expected_passes",
    "MoE",
    "NonFiniteRoutingError",
    "defer_finite_checks",
    "MoEAux",
    "MoEConfig",
    "MoEOptions",
    "CosineRouter",
    "DispatchPlan",
    "GroupedExperts",
    "HeteroExperts",
    "LinearRouter",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "RoutingStatsAccumulator",
    "record_routing",
    "activation_ratio",
    "apply_bias_updates",
    "build_router",
    "combine",
    "defer_bias_updates",
    "dispatch",
    "expert_capacity",
    "grouped_linear",
    "hmoe_expert_sizes",
    "load_balance_loss",
    "load_cv",
    "load_entropy",
    "make_plan",
    "mhmoe_flop_parity",
    "mhmoe_param_parity",
    "moe_flops_per_token",
    "moe_params",
    "p_penalty_loss",
    "router_entropy_loss",
    "router_z_loss",
    "workspace",
]
