"""Typed configuration of one MoE layer.

Every field is a plain scalar / string / list so that configs round-trip through YAML and
jsonargparse. Only :class:`vlmoe.moe.MoE` reads a config; the parts it is built from take explicit
arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ROUTERS = ("softmax", "sigmoid", "xmoe", "xmoe_sigmoid")
EXPERT_TYPES = ("gelu", "swiglu")
BALANCE_LOSSES = ("switch", "gshard", "p_penalty", "none")


@dataclass
class MoEConfig:
    """Configuration of a Mixture-of-Experts FFN layer.

    The defaults give a dropless top-2 softmax router over 8 GELU experts (BEiT-3 FFN shape) with
    the Switch load-balance loss at 1e-2.
    """

    # --- experts ---
    num_experts: int = 8
    """Experts in the layer (per modality in a multiway block)."""
    top_k: int = 2
    """Experts each token is sent to."""
    ffn_dim: int = 3072
    """Hidden width of each expert (homogeneous experts)."""
    expert_type: str = "gelu"
    """``gelu``: fc1 -> GELU -> [sub-LN] -> fc2 (BEiT-3 FFN). ``swiglu``: W2(SiLU(W_g x) * W_u x)."""
    ffn_layernorm: bool = False
    """Sub-LN over the hidden layer of each expert (Magneto / BEiT-3 ``ffn_layernorm``)."""
    bias: bool = True
    """Biases in the expert linears (BEiT-3: yes; LLaMA-style SwiGLU: usually no)."""
    expert_sizes: list[int] | None = None
    """HMoE: hidden width of each expert (heterogeneous experts); its length must equal num_experts and
    ffn_dim is then ignored. See :func:`vlmoe.moe.hmoe_expert_sizes` for the paper's schedules."""
    recompute_experts: bool = False
    """Activation checkpointing of the experts: keep only their input rows for backward and recompute the
    hidden layer there (one more fc1 GEMM per expert: +1/6 of the experts' training FLOPs). Saves the
    (k x tokens, ffn) hidden values per layer - for MH-MoE at FLOP parity 3.5x a top-2 layer's. Values
    and gradients are unchanged."""

    # --- router ---
    top_p: float | None = None
    """Top-p routing (HMoE / "harder tasks need more experts"): activate the smallest set of experts whose
    sorted probabilities reach p (0.6 in HMoE), gates renormalised over them. top_k is then unused."""
    max_experts_per_token: int | None = None
    """Top-p only: an upper bound on the experts a token may activate (None: no bound)."""

    router: str = "softmax"
    """``softmax`` (GShard/Switch), ``sigmoid`` (DeepSeek-V3 style scores), ``xmoe`` / ``xmoe_sigmoid``
    (X-MoE: low-dim projection, cosine against L2-normalised expert embeddings, learnable temperature)."""
    normalize_gates: bool | None = None
    """Renormalise the k selected gate values to sum to 1 (before any capacity dropping).
    ``None``: only when top_k > 1 (GShard); with top_k = 1 the raw gate scales the output (Switch), which
    is what gives the router a gradient from the task loss. ``True`` at top_k = 1 makes every gate 1."""
    router_dim: int | None = None
    """X-MoE routing dimension d_e. ``None``: 16 // heads (the X-MoE / MH-MoE papers' setting), >= 2."""
    router_temperature: float | None = None
    """X-MoE initial learnable temperature. ``None``: 0.3 (softmax) / 0.07 (sigmoid)."""
    balance_temperature: float | None = None
    """X-MoE fixed temperature tau_0 used inside the balance loss. ``None``: 0.3 / 0.07 as above."""
    expert_embedding_norm: float = 0.1
    """X-MoE: expert embeddings are kept at this L2 norm (paper's implementation tip)."""
    router_jitter: float = 0.0
    """Switch-style multiplicative input jitter U(1-eps, 1+eps) on the router input, training only."""
    router_noise: float = 0.0
    """Std of Gaussian noise added to router logits in training (tutel ``gate_noise``)."""
    router_fp32: bool = True
    """Compute router logits/probabilities in float32 under autocast."""

    # --- balancing ---
    balance_loss: str = "switch"
    """``switch``: E * sum_e f_e P_e with f_e over all k assignments; ``gshard``: f_e counts first
    choices only (torchscale / MH-MoE code); ``p_penalty``: the HMoE size-weighted loss
    E * sum_e M_e P_e with M_e the fraction of tokens routed to e times its size / mean size; ``none``."""
    balance_coef: float = 0.01
    entropy_coef: float = 0.0
    """Router entropy loss (mean per-token entropy of the routing distribution, minimised); HMoE uses
    3e-2 with top-p so that tokens do not drift towards activating ever more experts."""
    z_loss_coef: float = 0.0
    """ST-MoE router z-loss coefficient (1e-3 suggested)."""
    bias_balance: bool = False
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to scores for selection only.
    The bias is updated from the load each training forward records: by default at the next training
    forward; trainers running several forwards per backward call ``defer_bias_updates(model)`` once and
    ``apply_bias_updates(model)`` after each backward (the vlmoe tasks do)."""
    bias_update_rate: float = 1e-3

    # --- dispatch ---
    capacity_factor: float | None = None
    """``None``: dropless. Otherwise capacity = ceil(cf * k * tokens / E) per expert in training."""
    eval_capacity_factor: float | None = None
    """Capacity factor in eval mode (``None``: dropless at eval)."""

    # --- multi-head (MH-MoE) ---
    heads: int = 1
    """MH-MoE heads h: each token is split into h sub-tokens of dim/h that are routed independently."""
    head_projections: bool | None = None
    """Multi-head and merge linear layers (d -> d). ``None``: on when heads > 1 (official code)."""

    # --- stratified (Stratified MoE) ---
    strata: list[int] | None = None
    """Stratified MoE: experts per stratum (e.g. [4, 4, 8], summing to num_experts). The router of
    stratum i scores only experts of stratum i or higher; a token's top-1 expert decides its next
    stratum; tokens leave after 1..L passes, each pass with its own residual."""
    strata_layernorm: bool = True
    """Stratified MoE: a LayerNorm on the input of every pass after the first."""

    # --- runtime checks ---
    check_finite: bool = True
    """Raise a ValueError when router logits contain NaN/Inf (costs one device sync per layer on GPU)."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata kept with the config (ignored by the layer)."""

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, why: str) -> ValueError:
            return ValueError(f"MoEConfig.{name}={value!r}: {why}")

        if self.num_experts < 1:
            raise bad("num_experts", self.num_experts, "must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise bad("top_k", self.top_k, f"must be in [1, num_experts={self.num_experts}]")
        if self.ffn_dim < 1:
            raise bad("ffn_dim", self.ffn_dim, "must be >= 1")
        if self.expert_type not in EXPERT_TYPES:
            raise bad("expert_type", self.expert_type, f"choose from {EXPERT_TYPES}")
        if self.router not in ROUTERS:
            raise bad("router", self.router, f"choose from {ROUTERS}")
        if self.balance_loss not in BALANCE_LOSSES:
            raise bad("balance_loss", self.balance_loss, f"choose from {BALANCE_LOSSES}")
        if self.heads < 1:
            raise bad("heads", self.heads, "must be >= 1")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise bad(name, v, "must be > 0, or None for dropless")
        for name in ("balance_coef", "z_loss_coef", "router_jitter", "router_noise", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise bad(name, getattr(self, name), "must be >= 0")
        if self.router_dim is not None and self.router_dim < 1:
            raise bad("router_dim", self.router_dim, "must be >= 1")
        if self.router_temperature is not None and self.router_temperature <= 0:
            raise bad("router_temperature", self.router_temperature, "must be > 0")
        if self.expert_type == "swiglu" and self.ffn_layernorm:
            raise bad("ffn_layernorm", True, "sub-LN is defined for the GELU expert only")
        if self.expert_sizes is not None:
            if len(self.expert_sizes) != self.num_experts:
                raise bad(
                    "expert_sizes", self.expert_sizes,
                    f"has {len(self.expert_sizes)} entries but num_experts={self.num_experts}",
                )
            if min(self.expert_sizes) < 1:
                raise bad("expert_sizes", self.expert_sizes, "every size must be >= 1")
            if self.ffn_layernorm:
                raise bad("ffn_layernorm", True, "sub-LN is not supported with heterogeneous expert_sizes")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if self.max_experts_per_token is not None and not 1 <= self.max_experts_per_token <= self.num_experts:
            raise bad("max_experts_per_token", self.max_experts_per_token, f"must be in [1, {self.num_experts}]")
        if self.entropy_coef < 0:
            raise bad("entropy_coef", self.entropy_coef, "must be >= 0")
        if self.strata is not None:
            if not self.strata or min(self.strata) < 1 or sum(self.strata) != self.num_experts:
                raise bad("strata", self.strata, f"needs positive sizes summing to num_experts={self.num_experts}")
            if self.top_p is not None:
                raise bad("top_p", self.top_p, "top-p routing is not defined for Stratified MoE")
            if self.capacity_factor is not None or self.eval_capacity_factor is not None:
                raise bad("capacity_factor", self.capacity_factor, "Stratified MoE runs dropless")

    # ------------------------------------------------------------------ helpers
    @property
    def use_head_projections(self) -> bool:
        return self.heads > 1 if self.head_projections is None else self.head_projections

    @property
    def resolved_normalize_gates(self) -> bool:
        return self.top_k > 1 if self.normalize_gates is None else self.normalize_gates

    @property
    def resolved_router_dim(self) -> int:
        return self.router_dim if self.router_dim is not None else max(16 // self.heads, 2)

    @property
    def sizes(self) -> list[int]:
        """Hidden width of every expert."""
        return list(self.expert_sizes) if self.expert_sizes is not None else [self.ffn_dim] * self.num_experts

    @property
    def heterogeneous(self) -> bool:
        return self.expert_sizes is not None and len(set(self.expert_sizes)) > 1

    @property
    def sigmoid_scores(self) -> bool:
        return self.router in ("sigmoid", "xmoe_sigmoid")

    def replace(self, **changes: Any) -> MoEConfig:
        """A copy with some fields changed (validated again); an unknown field is an error listing the
        known ones."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        _check_keys(d)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        d = dict(d)
        for name, value in d.items():
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept it for float fields
            if isinstance(value, str) and "float" in str(fields[name].type):
                try:
                    d[name] = float(value)
                except ValueError:
                    raise ValueError(f"MoEConfig.{name}={value!r}: expected a number") from None
        return cls(**d)


def _check_keys(d: dict[str, Any]) -> None:
    known = [f.name for f in dataclasses.fields(MoEConfig)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown MoEConfig key(s) {unknown}; known keys: {sorted(known)}")


def _field_docs(cls: type) -> dict[str, str]:
    """The first sentence of each field's docstring (the string literal under it in the class body)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            text = " ".join(str(after.value.value).split())
            docs[node.target.id] = text.split(". ")[0].rstrip(".")
    return docs


def _options_class() -> type:
    """:class:`MoEConfig`'s fields, each optional (None: keep the model's value): the typed ``--model.moe.*``
    options of ``vlmoe pretrain`` / ``finetune``, so ``--help`` lists them with their types and a wrong
    name or type is refused by the parser."""
    import typing

    hints = typing.get_type_hints(MoEConfig)
    fields = [f.name for f in dataclasses.fields(MoEConfig)]
    docs = _field_docs(MoEConfig)
    doc = ("Changes to the model's MoE layers (``moe``); a field left at None keeps the model's value.\n\n"
           "Args:\n" + "\n".join(f"    {n}: {docs.get(n, n.replace('_', ' '))}." for n in fields))

    def changes(self: Any) -> dict[str, Any]:
        """The fields that are set, as a dict for :meth:`MoEConfig.replace`."""
        return {n: v for n in fields if (v := getattr(self, n)) is not None}

    cls = dataclasses.make_dataclass(
        "MoEOptions", [(n, hints[n] | None, dataclasses.field(default=None)) for n in fields],
        namespace={"__doc__": doc, "changes": changes, "__module__": __name__}, frozen=True,
    )
    return cls


MoEOptions = _options_class()
NO_MOE_CHANGES = MoEOptions()
