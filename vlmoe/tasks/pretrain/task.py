"""Masked multimodal pretraining (BEiT-3's masked data modeling) over three streams in every step.

One objective, three inputs (``arXiv 2208.10442``):

- texts: masked language modeling (MLM) over the masked text tokens;
- images: masked image modeling (MIM) over the block-wise masked patches;
- image-text pairs: both at once (masked vision-language modeling): the text tokens of the pair are
  masked at a higher rate and the model sees the other modality unmasked where it is not masked.

The masks are drawn by the data pipeline (``mlm_labels``, ``image_mask``; see
:mod:`vlmoe.data.pretrain`); the MIM target is pluggable (:mod:`vlmoe.tasks.pretrain.targets`).

Loss of a step::

    loss = mlm_weight * (mlm_text + mlm_pair) + mim_weight * (mim_image + mim_pair)
           + aux_loss_weight * mean over the step's forwards of the MoE aux loss

Each term is logged on its own (``loss/mlm_text``, ..., ``aux/balance``, ...), with MLM / MIM
accuracy where the target is a class. A forward per stream (pairs, images, texts): their lengths and
modalities differ, and the multiway blocks route each modality to its own FFN / expert pool anyway.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from vlmoe.data.masking import IGNORE_INDEX
from vlmoe.models import Pooler, VLMoE, VLMoEConfig, VLMoEForPretraining, load_checkpoint
from vlmoe.models.checkpoint import resolve_config
from vlmoe.models.convert import legacy_head_keys
from vlmoe.moe import MoEAux
from vlmoe.moe.config import NO_MOE_CHANGES, MoEOptions

from ..base import VLMoETask, with_moe_options
from .targets import MIMTarget, PixelTarget

__all__ = ["STREAMS", "PretrainTask"]

STREAMS = ("pair", "image", "text")


class PretrainTask(VLMoETask):
    """Masked data modeling on image-text pairs, images and texts.

    Args:
        model: model preset name (``tiny_mhmoe``, ``base_xmoe8``, ...) or a YAML/JSON config path.
        model_overrides: config fields to change (``{"moe": {"top_k": 1}}`` updates field-wise).
        moe: changes to the MoE layers, typed (``--model.moe.top_k 1``; applied after ``model_overrides``).
        vocab_size: text vocabulary (the tokenizer's; linked from the data module by the CLI).
        mean_std: the data's image normalisation (linked from the data module by the CLI); targets
            that need raw pixels undo it.
        mim_target: :class:`~vlmoe.tasks.pretrain.PixelTarget` (default),
            :class:`~vlmoe.tasks.pretrain.VQKDTarget` or :class:`~vlmoe.tasks.pretrain.TeacherTarget`.
        init_checkpoint: weights to start from: a ``vlmoe pretrain`` ``.ckpt``, a ``vlmoe export``
            folder, an official BEiT-3 ``.pth`` or a timm ViT (dense -> MoE upcycling included).
        allow_partial_init: accept an ``init_checkpoint`` that provides under half of the model's
            weights (by default that is an error: the wrong checkpoint would train from random init).
        mlm_weight: weight of the MLM terms.
        mim_weight: weight of the MIM terms.
        controls: validation also scores the masked text of the image-text pairs with each pair's image
            replaced by the next pair's in the batch (``val/acc_mlm_pair_shuffled_images``): the gap to
            ``val/acc_mlm_pair`` is what the image contributes to filling in the caption.
        **kwargs: optimizer / schedule / logging options of :class:`~vlmoe.tasks.base.VLMoETask`.
    """

    def __init__(
        self,
        model: str = "tiny_mhmoe",
        model_overrides: dict[str, Any] | None = None,
        moe: MoEOptions = NO_MOE_CHANGES,
        vocab_size: int | None = None,
        mean_std: str = "inception",
        mim_target: MIMTarget | None = None,
        init_checkpoint: str | None = None,
        allow_partial_init: bool = False,
        mlm_weight: float = 1.0,
        mim_weight: float = 1.0,
        controls: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["mim_target"])
        target = mim_target if mim_target is not None else PixelTarget()
        overrides = dict(model_overrides or {})
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        try:
            base = resolve_config(model)
            config = base.replace(**with_moe_options(overrides, moe, base))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"model.model: {e}") from None
        # the MIM head predicts the target: codebook ids (vqkd), patch pixels, or teacher features
        codebook = target.out_dim(config.patch_size, config.in_chans)
        self.model = VLMoEForPretraining(VLMoE(config), codebook_size=codebook)
        if init_checkpoint:
            report = load_checkpoint(self.model, init_checkpoint, allow_partial=allow_partial_init)
            rank_zero_info(str(report))
        # Not a registered submodule: the frozen target is rebuilt from its own checkpoint, so it stays
        # out of training checkpoints, the optimizer and DDP.
        object.__setattr__(self, "mim_target", target)
        self._target_device: torch.device | None = None
        self.mean_std = mean_std
        self.mlm_weight, self.mim_weight = mlm_weight, mim_weight
        self.controls = controls

    # ------------------------------------------------------------------ helpers
    @property
    def config(self) -> VLMoEConfig:
        return self.model.config

    def data_geometry(self) -> dict[str, int]:
        """What the data module must match: the model's image size and patch size (the MIM grid)."""
        return {"image_size": self.config.img_size, "patch_size": self.config.patch_size}

    def _ensure_target(self) -> None:
        if self._target_device != self.device:
            self.mim_target.prepare(self.device)
            self._target_device = self.device

    def _mlm(self, out: Any, batch: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        labels = batch["mlm_labels"]
        mask = labels != IGNORE_INDEX  # (B, Lt)
        if not bool(mask.any()):
            return None  # nothing masked in this sub-batch (very short texts)
        logits = self.model.mlm_logits(out, mask)  # (M, V): only masked positions reach the head
        target = labels[mask]
        loss = F.cross_entropy(logits.float(), target)
        acc = (logits.detach().argmax(-1) == target).float().mean()
        return loss, acc

    def _mim(self, out: Any, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None] | None:
        mask = batch["image_mask"].bool()  # (B, N)
        if not bool(mask.any()):
            return None
        self._ensure_target()
        targets = self.mim_target(batch["image"], self.config.patch_size, self.mean_std)  # (B, N[, C])
        pred = self.model.mim_logits(out, mask)  # (M, C)
        target = targets[mask]
        loss = self.mim_target.loss(pred, target)
        acc = None
        if self.mim_target.classification:
            acc = (pred.detach().argmax(-1) == target).float().mean()
        return loss, acc

    def forward_streams(
        self, batch: dict[str, dict[str, Any]]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], MoEAux, int]:
        """Run every stream of a pretraining batch.

        Returns:
            ``(loss terms, accuracies, MoE aux averaged over the forwards, samples)``; terms are
            ``mlm_<stream>`` / ``mim_<stream>``.
        """
        terms: dict[str, Tensor] = {}
        accs: dict[str, Tensor] = {}
        auxes: list[MoEAux] = []
        samples = 0
        for stream in STREAMS:
            b = batch.get(stream)
            if b is None:
                continue
            image, ids, pad = b.get("image"), b.get("text_ids"), b.get("text_padding_mask")
            image_mask = b.get("image_mask") if image is not None else None
            out = self.model(image=image, text_ids=ids, text_padding_mask=pad, image_mask=image_mask)
            auxes.append(out.aux)
            if "mlm_labels" in b:
                r = self._mlm(out, b)
                if r is not None:
                    terms[f"mlm_{stream}"], accs[f"mlm_{stream}"] = r
            if image_mask is not None:
                r = self._mim(out, b)
                if r is not None:
                    terms[f"mim_{stream}"] = r[0]
                    if r[1] is not None:
                        accs[f"mim_{stream}"] = r[1]
            samples += (image if image is not None else ids).shape[0]
        if not auxes:
            raise ValueError(f"pretraining batch has none of the streams {STREAMS}: keys {sorted(batch)}")
        aux = sum(auxes[1:], auxes[0])
        # The aux coefficients are calibrated for one forward; average so that three streams per step
        # do not triple the balance pressure.
        k = 1.0 / len(auxes)
        mean_aux = MoEAux(loss=aux.loss * k, losses={n: v * k for n, v in aux.losses.items()}, stats=aux.stats)
        return terms, accs, mean_aux, samples

    def total_loss(self, terms: dict[str, Tensor], aux: MoEAux) -> Tensor:
        """Weighted MDM terms plus the (weighted) MoE aux loss."""
        loss = aux.loss * self.aux_loss_weight
        for name, t in terms.items():
            loss = loss + (self.mlm_weight if name.startswith("mlm") else self.mim_weight) * t
        return loss

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> Tensor:
        terms, accs, aux, samples = self.forward_streams(batch)
        loss = self.total_loss(terms, aux)
        named = {f"loss/{k}": v for k, v in terms.items()}
        named.update(self.aux_terms(aux))
        # before backward: a NaN must never reach the weights (or a checkpoint)
        self.check_terms({**named, "loss": loss}, stats=aux.stats)
        log = dict(batch_size=samples, on_step=True, on_epoch=False)
        self.log("loss", loss.detach(), prog_bar=True, **log)
        self.log_dict({k: v.detach() for k, v in named.items()}, **log)
        self.log_dict({f"acc/{k}": v for k, v in accs.items()}, **log)
        for short in ("mlm_text", "mim_image"):
            if short in terms:
                self.log(short, terms[short].detach(), prog_bar=True, logger=False, **log)
        return loss

    def validation_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> None:
        terms, accs, aux, samples = self.forward_streams(batch)
        loss = self.total_loss(terms, aux)
        self.check_terms({**terms, "loss": loss}, stage="validation", stats=aux.stats)
        log = dict(batch_size=samples, on_step=False, on_epoch=True, sync_dist=True)
        self.log("val/loss", loss, prog_bar=True, **log)
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, **log)
        self.log_dict({f"val/acc_{k}": v for k, v in accs.items()}, **log)
        pair = batch.get("pair")
        if self.controls and pair is not None and "mlm_labels" in pair and pair["image"].shape[0] > 1:
            r = self._mlm(self._shuffled_pair_forward(pair), pair)
            if r is not None:
                n = pair["image"].shape[0]
                control = dict(batch_size=n, on_step=False, on_epoch=True, sync_dist=True)
                self.log("val/mlm_pair_shuffled_images", r[0], **control)
                self.log("val/acc_mlm_pair_shuffled_images", r[1], **control)

    def _shuffled_pair_forward(self, pair: dict[str, Any]) -> Any:
        """The pair stream's forward with every caption seen beside the next pair's image (a roll of
        the batch: no pair keeps its own image; fixed, so repeated validations compare)."""
        image = pair["image"].roll(1, dims=0)
        mask = pair.get("image_mask")
        return self.model(image=image, text_ids=pair["text_ids"], text_padding_mask=pair.get("text_padding_mask"),
                          image_mask=None if mask is None else mask.roll(1, dims=0))

    # ------------------------------------------------------------------ checkpoints
    def migrate_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints of earlier vlmoe versions: the backbone under ``model.`` (now
        ``model.backbone.``) and the heads under ``model.heads.{mlm,mim}.proj`` / ``model.heads.pooler``
        (now ``model.mlm_head`` / ``model.mim_head`` / ``model.pooler``). A pooler in the checkpoint is
        added to the model (its optimizer state is in the checkpoint too), so such runs resume."""
        sd = checkpoint.get("state_dict")
        if not isinstance(sd, dict) or any(k.startswith("model.backbone.") for k in sd):
            return
        renamed = {}
        for k, v in sd.items():
            if k.startswith("model."):
                (name,) = legacy_head_keys({k[len("model.") :]: v})
                head = name.startswith(("mlm_head.", "mim_head.", "pooler."))
                k = f"model.{name}" if head else f"model.backbone.{name}"
            renamed[k] = v
        checkpoint["state_dict"] = renamed
        if any(k.startswith("model.pooler.") for k in renamed) and self.model.pooler is None:
            self.model.pooler = Pooler(self.config.dim, self.config.layernorm_eps).to(self.device)
