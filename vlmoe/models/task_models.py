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

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from vlmoe.layers import KVCache
from vlmoe.moe import MoEAux

from .backbone import VLMoE
from .generation import GenerationOutput, generate
from .heads import Pooler, TwoLayerMLP, select_tokens, vqa_classifier
from .output import BackboneOutput

__all__ = [
    "TASK_MODELS",
    "TaskModel",
    "VLMoEForCaptioning",
    "VLMoEForImageClassification",
    "VLMoEForNLVR2",
    "VLMoEForPretraining",
    "VLMoEForRetrieval",
    "VLMoEForVQA",
    "build_task_model",
    "captioning_attention_mask",
    "register_task_model",
]

TASK_MODELS: dict[str, type[TaskModel]] = {}


def register_task_model(cls: type[TaskModel]) -> type[TaskModel]:
    """Class decorator: make ``cls`` buildable from its ``task_config()`` (``cls.task`` is the key)."""
    if not cls.task:
        raise ValueError(f"{cls.__name__} has no task name")
    TASK_MODELS[cls.task] = cls
    return cls


def class_count(num_classes: int | None, class_names: list[str] | None, owner: str) -> int:
    """The number of classes a head is given, as ``num_classes`` or as the length of ``class_names``
    (both: they must agree); neither is an error naming ``owner``."""
    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class names")
        num_classes = len(class_names)
    if not num_classes:
        raise ValueError(f"{owner} needs num_classes or class_names")
    return num_classes


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


@register_task_model
class VLMoEForVQA(TaskModel):
    """BEiT-3's VQA model: ``pooler`` over the vision CLS, then ``head`` = ``Linear(D, 2D) -> LN ->
    GELU -> Linear(2D, A)`` over the answer vocabulary (``BEiT3ForVisualQuestionAnswering``).

    Args:
        backbone: the backbone (BEiT-3 builds it with ``final_norm=False`` for VQA).
        answers: the answer vocabulary, in label order (stored in exports; predictions are strings).
    """

    task = "vqa"

    def __init__(self, backbone: VLMoE, answers: list[str]) -> None:
        super().__init__(backbone)
        if not answers:
            raise ValueError("VLMoEForVQA needs a non-empty answer vocabulary")
        c = backbone.config
        self.answers = list(answers)
        self.pooler = Pooler(c.dim, c.layernorm_eps)
        self.head = vqa_classifier(c.dim, len(self.answers), c.layernorm_eps)
        self.init_head(self.pooler, self.head, std=c.init_std)

    def head_config(self) -> dict[str, Any]:
        return {"answers": self.answers}

    def forward(
        self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None, return_aux: bool = False
    ) -> Tensor | tuple[Tensor, MoEAux]:
        """``(B, A)`` answer logits (and the backbone's MoE aux with ``return_aux``)."""
        out = self.backbone(image=image, text_ids=text_ids, text_padding_mask=text_padding_mask)
        logits = self.head(self.pooler(out.vision_cls))
        return (logits, out.aux) if return_aux else logits


@register_task_model
class VLMoEForNLVR2(TaskModel):
    """BEiT-3's NLVR2 model (``BEiT3ForVisualReasoning``): both images through the backbone with the
    sentence (one batch of ``2B``), ``cat(vision CLS, first text token)`` per image, the two images'
    features side by side (``4D``) into ``head`` = :class:`TwoLayerMLP` (``4D -> 2D -> 2``) whose
    linears are scaled by ``1e-3`` at init."""

    task = "nlvr2"

    def __init__(self, backbone: VLMoE, init_scale: float = 1e-3) -> None:
        super().__init__(backbone)
        c = backbone.config
        self.init_scale = init_scale
        self.head = TwoLayerMLP(4 * c.dim, 2 * c.dim, 2, norm_input=True, eps=c.layernorm_eps)
        self.init_head(self.head, std=c.init_std)
        with torch.no_grad():
            for lin in (self.head.dense1, self.head.dense2):
                lin.weight.mul_(init_scale)
                lin.bias.mul_(init_scale)

    def head_config(self) -> dict[str, Any]:
        return {"init_scale": self.init_scale}

    def features(
        self, image: Tensor, image2: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, MoEAux]:
        """``(B, 4D)`` ``[cls(a), text(a), cls(b), text(b)]`` for the left (a) and right (b) image, and the
        MoE aux of the joint forward."""
        B = image.shape[0]
        ids = torch.cat([text_ids, text_ids])  # (2B, L): the sentence once per image
        pad = None if text_padding_mask is None else torch.cat([text_padding_mask, text_padding_mask])
        out = self.backbone(image=torch.cat([image, image2]), text_ids=ids, text_padding_mask=pad)
        rep = torch.cat([out.vision_cls, out.text_cls], dim=-1)  # (2B, 2D)
        return torch.cat([rep[:B], rep[B:]], dim=-1), out.aux  # (B, 4D)

    def forward(
        self, image: Tensor, image2: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None,
        return_aux: bool = False,
    ) -> Tensor | tuple[Tensor, MoEAux]:
        """``(B, 2)`` logits (class 1 = the statement is true)."""
        feats, aux = self.features(image, image2, text_ids, text_padding_mask)
        logits = self.head(feats)
        return (logits, aux) if return_aux else logits


@register_task_model
class VLMoEForImageClassification(TaskModel):
    """BEiT-3's classifier (``BEiT3ForImageClassification``): ``fc_norm`` of the mean patch token
    (CLS left out), then a linear ``head`` scaled by ``1e-3`` at init. Vision branch only.

    Args:
        backbone: a backbone (ideally built with ``modalities=["vision"]`` and ``final_norm=False``).
        num_classes: classes (taken from ``class_names`` when those are given).
        class_names: readable class names (stored in exports; predictions carry them).
        init_scale: the head's init scale.
    """

    task = "image_classification"

    def __init__(
        self, backbone: VLMoE, num_classes: int | None = None, class_names: list[str] | None = None,
        init_scale: float = 1e-3,
    ) -> None:
        super().__init__(backbone)
        num_classes = class_count(num_classes, class_names, type(self).__name__)
        c = backbone.config
        self.num_classes, self.class_names, self.init_scale = num_classes, class_names, init_scale
        self.fc_norm = nn.LayerNorm(c.dim, eps=c.layernorm_eps)
        self.head = nn.Linear(c.dim, num_classes)
        self.init_head(self.fc_norm, self.head, std=c.init_std)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)
            self.head.bias.mul_(init_scale)

    def head_config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": self.class_names, "init_scale": self.init_scale}

    def forward(self, image: Tensor, return_aux: bool = False) -> Tensor | tuple[Tensor, MoEAux]:
        """``(B, C)`` class logits."""
        out = self.backbone(image=image)
        logits = self.head(self.fc_norm(out.vision_patches.mean(dim=1)))
        return (logits, out.aux) if return_aux else logits


# ---------------------------------------------------------------------------------------------- captioning
def captioning_attention_mask(num_vision: int, text_len: int, device: torch.device | str | None = None) -> Tensor:
    """BEiT-3's captioning mask over ``[image; text]``, ``(Lv + Lt, Lv + Lt)`` bool, True = *blocked*:
    image -> image full, text -> image full, image -> text blocked, text -> text causal."""
    L = num_vision + text_len
    blocked = torch.ones(L, L, dtype=torch.bool, device=device)
    blocked[:, :num_vision] = False  # everything sees the image
    causal = torch.ones(text_len, text_len, dtype=torch.bool, device=device).tril()
    blocked[num_vision:, num_vision:] = ~causal
    return blocked


class _CachedCaptioner:
    """Incremental decoding: the image and ``[bos, MASK]`` once, then ``[new token, MASK]`` per step
    through every block with a :class:`~vlmoe.layers.KVCache`; the ``MASK`` slot's keys are dropped
    after each step (BEiT-3's ``incremental_state[...][:, :, :-1]``)."""

    def __init__(self, model: VLMoEForCaptioning, image: Tensor, max_len: int) -> None:
        self.model, self.image = model, image
        self.cache = KVCache(len(model.backbone.blocks), reserve=max_len + 1)
        self.num_vision = model.backbone.vision_embed.num_tokens

    def log_probs(self, tokens: Tensor) -> Tensor:
        m, (N, t) = self.model, tokens.shape
        slot = tokens.new_full((N, 1), m.mask_id)
        if self.cache.length == 0:  # first step: the image, bos and the MASK slot
            if t != 1:
                raise ValueError(f"the first decoding step takes the bos column only; got {t} tokens")
            mask = captioning_attention_mask(self.num_vision, 2, tokens.device)
            out = m.backbone(image=self.image, text_ids=torch.cat([tokens, slot], 1), attn_mask=mask,
                             cache=self.cache)
        else:
            if self.cache.length != self.num_vision + t - 1:
                raise ValueError(f"KV cache holds {self.cache.length} positions; {t} tokens so far need "
                                 f"{self.num_vision + t - 1}")
            blocked = torch.zeros(2, self.cache.length + 2, dtype=torch.bool, device=tokens.device)
            blocked[0, -1] = True  # the new token does not see the MASK slot after it
            positions = torch.arange(t - 1, t + 1, device=tokens.device).expand(N, 2)
            out = m.backbone(text_ids=torch.cat([tokens[:, -1:], slot], 1), text_positions=positions,
                             attn_mask=blocked, cache=self.cache)
        self.cache.truncate(1)
        return F.log_softmax(m.mlm_head(out.text_tokens[:, -1]).float(), dim=-1)

    def reorder(self, index: Tensor) -> None:
        if index.numel() != self.cache.batch_size:
            self.cache.select(index)
        else:  # beams of one image share the image's keys: only the text positions move
            self.cache.reorder(index, start=self.num_vision)


class _NaiveCaptioner:
    """Re-encodes the image and the whole text ``[bos, w1, ..., MASK]`` at every step (the reference)."""

    def __init__(self, model: VLMoEForCaptioning, image: Tensor) -> None:
        self.model, self.image = model, image

    def log_probs(self, tokens: Tensor) -> Tensor:
        m = self.model
        ids = torch.cat([tokens, tokens.new_full((tokens.shape[0], 1), m.mask_id)], 1)
        mask = captioning_attention_mask(m.backbone.vision_embed.num_tokens, ids.shape[1], tokens.device)
        out = m.backbone(image=self.image, text_ids=ids, attn_mask=mask)
        return F.log_softmax(m.mlm_head(out.text_tokens[:, -1]).float(), dim=-1)

    def reorder(self, index: Tensor) -> None:
        self.image = self.image.index_select(0, index)


@register_task_model
class VLMoEForCaptioning(TaskModel):
    """BEiT-3's captioning model (``BEiT3ForCaptioning``): masked-LM sequence-to-sequence over
    ``[image; caption]`` with :func:`captioning_attention_mask`, ``mlm_head = Linear(D, vocab)``
    predicting the masked caption tokens; decoding predicts from a ``[MASK]`` slot after the tokens
    so far (:meth:`generate`, KV-cached).

    Args:
        backbone: the backbone (BEiT-3 keeps its final norm for captioning).
        bos_id / eos_id / mask_id: the tokenizer's special ids (stored in exports).
    """

    task = "captioning"

    def __init__(self, backbone: VLMoE, bos_id: int, eos_id: int, mask_id: int) -> None:
        super().__init__(backbone)
        c = backbone.config
        if not (c.has_vision and c.has_text):
            raise ValueError(f"captioning needs a vision and a text branch (modalities={c.modalities})")
        self.bos_id, self.eos_id, self.mask_id = int(bos_id), int(eos_id), int(mask_id)
        self.mlm_head = nn.Linear(c.dim, c.vocab_size)
        self.init_head(self.mlm_head, std=c.init_std)

    def head_config(self) -> dict[str, Any]:
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "mask_id": self.mask_id}

    def forward(
        self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None,
        masked_positions: Tensor | None = None, return_aux: bool = False,
    ) -> Tensor | tuple[Tensor, MoEAux]:
        """Vocabulary logits ``(M, V)`` at the ``masked_positions`` (``(B, Lt)`` bool) of the caption, or
        ``(B, Lt, V)`` at every position when None."""
        mask = captioning_attention_mask(self.backbone.vision_embed.num_tokens, text_ids.shape[1], text_ids.device)
        out = self.backbone(image=image, text_ids=text_ids, text_padding_mask=text_padding_mask, attn_mask=mask)
        logits = self.mlm_head(select_tokens(out.text_tokens, masked_positions, "caption"))
        return (logits, out.aux) if return_aux else logits

    def decode_state(self, image: Tensor, cached: bool = True, max_len: int = 32) -> _CachedCaptioner | _NaiveCaptioner:
        """A :class:`~vlmoe.models.generation.DecodeState` for ``image`` (``cached=False``: the naive one)."""
        return _CachedCaptioner(self, image, max_len) if cached else _NaiveCaptioner(self, image)

    @torch.no_grad()
    def generate(self, image: Tensor, max_len: int = 32, num_beams: int = 3, length_penalty: float = 0.6,
                 cached: bool = True) -> GenerationOutput:
        """Captions of ``image`` ``(B, C, H, W)`` as token ids (greedy for ``num_beams=1``), BEiT-3's
        defaults: beam 3, length penalty 0.6, at most 32 tokens with bos and eos."""
        if max_len > self.config.max_text_positions:
            raise ValueError(f"max_len={max_len} exceeds the model's {self.config.max_text_positions} text positions")
        state = self.decode_state(image, cached, max_len)
        return generate(state, image.shape[0], self.bos_id, self.eos_id, max_len, num_beams, length_penalty,
                        device=image.device)


# ---------------------------------------------------------------------------------------------- retrieval
@register_task_model
class VLMoEForRetrieval(TaskModel):
    """BEiT-3's dual encoder (``BEiT3ForRetrieval``): an image-only and a text-only pass through the
    same backbone, ``vision_head`` / ``language_head`` (``Linear(D, D)`` without bias) on the CLS tokens,
    L2-normalised, and a learnable ``logit_scale`` (init ``ln(1 / 0.07)``)."""

    task = "retrieval"

    def __init__(self, backbone: VLMoE) -> None:
        super().__init__(backbone)
        c = backbone.config
        if not (c.has_vision and c.has_text):
            raise ValueError(f"retrieval needs a vision and a text branch (modalities={c.modalities})")
        self.vision_head = nn.Linear(c.dim, c.dim, bias=False)
        self.language_head = nn.Linear(c.dim, c.dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.init_head(self.vision_head, self.language_head, std=c.init_std)

    def head_no_weight_decay(self) -> set[str]:
        return {"logit_scale"}

    def encode_image(self, image: Tensor, return_aux: bool = False) -> Tensor | tuple[Tensor, MoEAux]:
        """``(B, D)`` unit-norm image embeddings."""
        out = self.backbone(image=image)
        emb = F.normalize(self.vision_head(out.vision_cls), dim=-1)
        return (emb, out.aux) if return_aux else emb

    def encode_text(
        self, text_ids: Tensor, text_padding_mask: Tensor | None = None, return_aux: bool = False
    ) -> Tensor | tuple[Tensor, MoEAux]:
        """``(B, D)`` unit-norm text embeddings."""
        out = self.backbone(text_ids=text_ids, text_padding_mask=text_padding_mask)
        emb = F.normalize(self.language_head(out.text_cls), dim=-1)
        return (emb, out.aux) if return_aux else emb

    def forward(
        self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(image embeddings, text embeddings)``."""
        return self.encode_image(image), self.encode_text(text_ids, text_padding_mask)
