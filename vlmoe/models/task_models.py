"""Task models: a backbone plus the heads of one task, plain ``nn.Module`` (no Lightning), so training,
evaluation and inference share them.

Every task model keeps the backbone under ``backbone`` and its heads at the top level under BEiT-3's
names (see :mod:`vlmoe.models.heads`), delegates ``no_weight_decay()`` / ``layer_id()`` (layer-wise lr
decay) to the backbone, and describes itself for exports: :meth:`TaskModel.task_config` is the plain
data that :func:`build_task_model` turns back into the same model.

    backbone = create_model("tiny_mhmoe")
    model = VLMoEForPretraining(backbone, codebook_size=192)
    out = model(image=img, text_ids=ids, text_padding_mask=pad)       # BackboneOutput
    model.mlm_logits(out, mask), model.task_config()                  # {"type": "pretraining", ...}

A new task is a subclass with a ``task`` name, its heads, ``head_config()`` (the constructor
arguments besides the backbone) and ``@register_task_model``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from timm.layers import trunc_normal_
from torch import Tensor, nn

from .backbone import VLMoE
from .heads import Pooler, select_tokens
from .output import BackboneOutput

__all__ = ["TASK_MODELS", "TaskModel", "VLMoEForPretraining", "build_task_model", "register_task_model"]

TASK_MODELS: dict[str, type[TaskModel]] = {}


def register_task_model(cls: type[TaskModel]) -> type[TaskModel]:
    """Class decorator: make ``cls`` buildable from its ``task_config()`` (``cls.task`` is the key)."""
    if not cls.task:
        raise ValueError(f"{cls.__name__} has no task name")
    TASK_MODELS[cls.task] = cls
    return cls


def build_task_model(backbone: VLMoE, task: dict[str, Any] | None) -> nn.Module:
    """The task model a ``task_config()`` describes, on ``backbone`` (the backbone alone for None)."""
    if not task:
        return backbone
    kind = task.get("type")
    if kind not in TASK_MODELS:
        raise ValueError(f"unknown task type {kind!r}; known: {sorted(TASK_MODELS)}")
    return TASK_MODELS[kind].from_task_config(backbone, task)


class TaskModel(nn.Module):
    """Base of task models: ``backbone`` + heads.

    Args:
        backbone: the multiway backbone (its weights are kept as they are).
    """

    task: ClassVar[str] = ""

    def __init__(self, backbone: VLMoE) -> None:
        super().__init__()
        self.backbone = backbone

    # ------------------------------------------------------------------ description
    @property
    def config(self):
        """The backbone's :class:`~vlmoe.models.VLMoEConfig`."""
        return self.backbone.config

    def head_config(self) -> dict[str, Any]:
        """Constructor arguments besides the backbone, as plain data (answer lists, class names...)."""
        return {}

    def task_config(self) -> dict[str, Any]:
        """``{"type": task, **head_config()}``: what an export stores to rebuild this model."""
        return {"type": self.task, **self.head_config()}

    @classmethod
    def from_task_config(cls, backbone: VLMoE, task: dict[str, Any]) -> TaskModel:
        return cls(backbone, **{k: v for k, v in task.items() if k != "type"})

    # ------------------------------------------------------------------ optimisation
    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def no_weight_decay(self) -> set[str]:
        """The backbone's no-decay names (prefixed) plus the heads' own (:meth:`head_no_weight_decay`)."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()} | self.head_no_weight_decay()

    def head_no_weight_decay(self) -> set[str]:
        return set()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer-decay groups (``create_optimizer_v2(model, layer_decay=...)``): the backbone's,
        prefixed; the heads fall into the top group."""
        return dict(
            stem=r"^backbone\.(?:vision_embed|text_embed)\.",
            blocks=[(r"^backbone\.blocks\.(\d+)", None), (r"^backbone\.norm\.", (99999,))],
        )

    def layer_id(self, name: str) -> int:
        """Backbone parameters: the backbone's layer id; heads: the top (``num_layers + 1``)."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone.") :])
        return self.num_layers + 1

    @staticmethod
    def init_head(*modules: nn.Module, std: float = 0.02) -> None:
        """BEiT-3's head init: trunc-normal(std) linears, zero biases, unit LayerNorms."""
        for module in modules:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ forward
    def forward_features(self, *args: Any, **kwargs: Any) -> BackboneOutput:
        """The backbone's output (:meth:`VLMoE.forward_features` arguments)."""
        return self.backbone(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """By default the backbone's output; task models with one obvious output return it instead."""
        return self.backbone(*args, **kwargs)


@register_task_model
class VLMoEForPretraining(TaskModel):
    """Masked data modeling heads: ``mlm_head`` (text tokens -> vocabulary) and ``mim_head`` (patches
    -> the MIM target: codebook ids, pixels or teacher features).

    Args:
        backbone: the backbone.
        codebook_size: MIM head outputs (None: no MIM head, e.g. a text-only model).
        pooler: also a vision-CLS pooler (the pretraining models of earlier vlmoe versions carried one
            for their ``tiny`` presets; their checkpoints resume with it).
    """

    task = "pretraining"

    def __init__(self, backbone: VLMoE, codebook_size: int | None = 8192, pooler: bool = False) -> None:
        super().__init__(backbone)
        c = backbone.config
        self.codebook_size = codebook_size
        self.mlm_head = nn.Linear(c.dim, c.vocab_size) if c.has_text else None
        self.mim_head = nn.Linear(c.dim, codebook_size) if codebook_size and c.has_vision else None
        self.pooler = Pooler(c.dim, c.layernorm_eps) if pooler else None
        self.init_head(*(m for m in (self.mlm_head, self.mim_head, self.pooler) if m is not None), std=c.init_std)

    def head_config(self) -> dict[str, Any]:
        return {"codebook_size": self.codebook_size, "pooler": self.pooler is not None}

    def mlm_logits(self, out: BackboneOutput, mask: Tensor | None = None) -> Tensor:
        """``(B, Lt, V)`` vocabulary logits of the text tokens, or ``(M, V)`` at the ``mask`` positions."""
        if self.mlm_head is None or out.text_tokens is None:
            raise ValueError("mlm_logits needs text tokens and an MLM head")
        return self.mlm_head(select_tokens(out.text_tokens, mask, "MLM"))

    def mim_logits(self, out: BackboneOutput, mask: Tensor | None = None) -> Tensor:
        """``(B, N, K)`` MIM predictions over patches (no CLS), or ``(M, K)`` at the ``mask`` positions."""
        if self.mim_head is None or out.vision_patches is None:
            raise ValueError("mim_logits needs vision tokens and a MIM head")
        return self.mim_head(select_tokens(out.vision_patches, mask, "MIM"))
