"""Masked-image-modeling targets: what the MIM head predicts at each masked patch.

- :class:`PixelTarget` (``pixel``, the offline default): the patch's pixels, normalised per patch
  (mean 0, variance 1 over the patch's ``p * p * C`` values, as MAE's ``norm_pix_loss``); MSE.
- :class:`VQKDTarget` (``vqkd``): the visual token of a BEiT v2 VQ-KD tokenizer (BEiT-3's target);
  cross-entropy over the codebook. :class:`VQKDTokenizer` is the tokenizer's encoder (a ViT with
  q/v biases and mean-pool ``fc_norm``), its ``encode_task_layer`` (Linear-Tanh-Linear) and the
  l2-normalised codebook lookup, with the parameter names of the released checkpoints
  (``encoder.*``, ``encode_task_layer.*``, ``quantize.embedding.weight``), so
  ``vqkd_encoder_base_decoder_3x768x12_clip`` and friends load as they are; the decoder is not needed.
- :class:`TeacherTarget` (``teacher``): per-patch features of a frozen open_clip or timm image model
  built from a name / config and a checkpoint path; negative cosine similarity (or smooth-L1 / MSE).

Targets are frozen and never saved into training checkpoints (they are rebuilt from their
checkpoint path); their weights load lazily on :meth:`MIMTarget.prepare`, so a config can be parsed
and a model built on a machine without the tokenizer file.

Every target takes the batch's normalised images (``mean_std`` of the data) and returns one target
per patch of the model's grid, ``(B, N)`` ids or ``(B, N, C)`` vectors.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmoe.data.transforms import resolve_mean_std

__all__ = ["MIMTarget", "PixelTarget", "TeacherTarget", "VQKDTarget", "VQKDTokenizer", "patchify"]


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p * p * C)`` in row-major patch order (the model's token order)."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not a multiple of patch size {p}")
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)  # (B, h, w, p, p, C) -> (B, N, p*p*C), N = h*w


def _to_unit_range(images: Tensor, mean_std: str | tuple) -> Tensor:
    """Undo the data's normalisation: normalised images -> pixels in [0, 1]."""
    mean, std = resolve_mean_std(mean_std)
    m = images.new_tensor(mean).view(1, -1, 1, 1)  # (C,) -> (1, C, 1, 1)
    s = images.new_tensor(std).view(1, -1, 1, 1)  # (C,) -> (1, C, 1, 1)
    return (images * s + m).clamp(0.0, 1.0)


class MIMTarget(nn.Module):
    """Base class of MIM targets.

    Attributes:
        classification: True when targets are class ids (cross-entropy), False for vectors.
    """

    classification: bool = False

    def out_dim(self, patch_size: int, in_chans: int) -> int:
        """Width of the MIM head's output for a model with this patch size."""
        raise NotImplementedError

    def prepare(self, device: torch.device | str) -> None:
        """Load weights (once) and move to ``device``; called before the first batch."""
        self.to(device)

    @torch.no_grad()
    def forward(self, images: Tensor, patch_size: int, mean_std: str | tuple) -> Tensor:
        """Targets of every patch: ``(B, N)`` long or ``(B, N, C)`` float."""
        raise NotImplementedError

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean loss of predictions ``(M, C)`` against targets ``(M,)`` / ``(M, C)`` at masked patches."""
        raise NotImplementedError


class PixelTarget(MIMTarget):
    """Normalised patch pixels (MAE's ``norm_pix_loss``); mean squared error.

    Args:
        norm_per_patch: normalise each patch to mean 0 / variance 1 (else: the data's normalised pixels).
    """

    def __init__(self, norm_per_patch: bool = True) -> None:
        super().__init__()
        self.norm_per_patch = norm_per_patch

    def out_dim(self, patch_size: int, in_chans: int) -> int:
        return patch_size * patch_size * in_chans

    @torch.no_grad()
    def forward(self, images: Tensor, patch_size: int, mean_std: str | tuple) -> Tensor:
        x = patchify(images.float(), patch_size)  # (B, N, p*p*C)
        if self.norm_per_patch:
            mean = x.mean(dim=-1, keepdim=True)
            var = x.var(dim=-1, keepdim=True, unbiased=False)
            # a flat patch (uniform background) has var 0: eps keeps it a finite all-zero target
            x = (x - mean) / (var + 1e-6).sqrt()
        return x

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred.float(), target.float())


# ------------------------------------------------------------------------------------------- VQ-KD
class VQKDTokenizer(nn.Module):
    """The encoding half of BEiT v2's VQ-KD visual tokenizer: image -> codebook ids per patch.

    ``encoder``: ViT (q/v biases, LayerNorm eps 1e-6, no layer scale, abs. positions,
    ``fc_norm`` on the patch tokens); ``encode_task_layer``: Linear(D, D) - Tanh - Linear(D, code_dim);
    then the token is ``argmin_k || l2norm(z) - e_k ||^2`` over the codebook ``quantize.embedding.weight``
    (kept l2-normalised by the tokenizer's EMA training).

    Args:
        img_size: training resolution (positions; other sizes are interpolated bicubically).
        patch_size: encoder patch size.
        dim, depth, num_heads, mlp_ratio: encoder shape (ViT-B/16: 768, 12, 12, 4).
        code_dim: codebook vector width (32).
        num_codes: codebook size (8192).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        code_dim: int = 32,
        num_codes: int = 8192,
    ) -> None:
        super().__init__()
        from timm.models.beit import Beit

        self.img_size, self.patch_size = img_size, patch_size
        self.num_codes, self.code_dim = num_codes, code_dim
        # timm's BEiT with absolute positions, no relative bias and no layer scale is exactly the
        # tokenizer's encoder, down to the parameter names (q_bias / v_bias, fc_norm).
        self.encoder = Beit(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            global_pool="avg",
            embed_dim=dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            use_abs_pos_emb=True,
            use_rel_pos_bias=False,
            use_shared_rel_pos_bias=False,
            init_values=None,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.encode_task_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, code_dim))
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Module()
        self.quantize.embedding.weight = nn.Parameter(
            F.normalize(torch.randn(num_codes, code_dim), dim=-1), requires_grad=False
        )

    @property
    def codebook(self) -> Tensor:
        return self.quantize.embedding.weight

    @classmethod
    def shape_from_state_dict(cls, sd: dict[str, Tensor]) -> dict[str, Any]:
        """The constructor arguments a released checkpoint implies (heads: dim / 64, as ViT-B/L)."""
        try:
            proj = sd["encoder.patch_embed.proj.weight"]  # (D, C, p, p)
            pos = sd["encoder.pos_embed"]  # (1, 1 + N, D)
            code = sd["quantize.embedding.weight"]  # (K, code_dim)
            fc1 = sd["encoder.blocks.0.mlp.fc1.weight"]  # (D * r, D)
        except KeyError as e:
            raise ValueError(f"not a VQ-KD tokenizer state dict: no key {e.args[0]!r}") from None
        dim, patch = proj.shape[0], proj.shape[-1]
        grid = math.isqrt(pos.shape[1] - 1)
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
        return dict(
            img_size=grid * patch,
            patch_size=patch,
            dim=dim,
            depth=depth,
            num_heads=max(1, dim // 64),
            mlp_ratio=fc1.shape[0] / dim,
            code_dim=code.shape[1],
            num_codes=code.shape[0],
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides: Any) -> VQKDTokenizer:
        """Build from a released (or saved) checkpoint; the decoder / teacher weights are ignored.

        Args:
            path: ``.pth`` (``{"model": sd}`` or ``{"state_dict": sd}`` or a bare state dict, read
                with ``weights_only=True``) or ``.safetensors``.
            overrides: constructor arguments that the state dict cannot tell (``num_heads``).
        """
        from vlmoe.models import read_state_dict

        sd, where = read_state_dict(path)
        keep = ("encoder.", "encode_task_layer.", "quantize.embedding.weight")
        sd = {k: v for k, v in sd.items() if k.startswith(keep)}
        try:
            kwargs = {**cls.shape_from_state_dict(sd), **overrides}
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        tok = cls(**kwargs)
        missing, unexpected = tok.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{where}: VQ-KD tokenizer keys do not match: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
        return tok.eval().requires_grad_(False)

    def encode(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(B, N, code_dim)`` l2-normalised codes before lookup."""
        enc = self.encoder
        B, _, H, W = x.shape
        t = enc.patch_embed(x)  # (B, N, D)
        grid = (H // self.patch_size, W // self.patch_size)
        pos = enc.pos_embed
        if grid[0] * grid[1] + 1 != pos.shape[1]:
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(pos, grid, num_prefix_tokens=1)
        t = torch.cat([enc.cls_token.expand(B, -1, -1), t], dim=1) + pos
        for blk in enc.blocks:
            t = blk(t)
        feats = enc.fc_norm(t[:, 1:])  # patch tokens only (the tokenizer's ``return_patch_tokens``)
        z = self.encode_task_layer(feats.float())
        return F.normalize(z, dim=-1)

    @torch.no_grad()
    def get_codebook_indices(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(B, N)`` token ids."""
        z = self.encode(x)  # (B, N, c)
        e = self.codebook.float()  # (K, c)
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e ; ||z||^2 is constant per row and drops out
        d = e.pow(2).sum(-1) - 2 * z @ e.t()  # (B, N, K)
        return d.argmin(dim=-1)


def _require_file(path: str | Path, what: str) -> None:
    """Fail before the model and the data are built (and minutes are spent) when a weights file is absent."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{what} {path}: no such file. Download it and set the path, or pretrain with "
            "`model.mim_target: {class_path: vlmoe.tasks.pretrain.PixelTarget}` (no weights needed)"
        )


class VQKDTarget(MIMTarget):
    """BEiT v2 VQ-KD visual tokens (BEiT-3's MIM target); cross-entropy.

    Args:
        checkpoint: the tokenizer weights (e.g. ``vqkd_encoder_base_decoder_3x768x12_clip-d93179da.pth``).
        num_codes: codebook size, checked against the checkpoint (the MIM head is built before it loads).
        num_heads: encoder heads when not ``dim / 64``.
    """

    classification = True

    def __init__(self, checkpoint: str, num_codes: int = 8192, num_heads: int | None = None) -> None:
        super().__init__()
        _require_file(checkpoint, "VQKDTarget checkpoint (the VQ-KD tokenizer weights)")
        self.checkpoint, self.num_codes, self.num_heads = str(checkpoint), num_codes, num_heads
        self.tokenizer: VQKDTokenizer | None = None

    def out_dim(self, patch_size: int, in_chans: int) -> int:
        return self.num_codes

    def prepare(self, device: torch.device | str) -> None:
        if self.tokenizer is None:
            kw = {"num_heads": self.num_heads} if self.num_heads else {}
            tok = VQKDTokenizer.from_checkpoint(self.checkpoint, **kw)
            if tok.num_codes != self.num_codes:
                raise ValueError(
                    f"{self.checkpoint}: codebook has {tok.num_codes} codes but the MIM head was built for "
                    f"num_codes={self.num_codes}; set mim_target.init_args.num_codes={tok.num_codes}"
                )
            self.tokenizer = tok
        self.to(device)

    @torch.no_grad()
    def forward(self, images: Tensor, patch_size: int, mean_std: str | tuple) -> Tensor:
        if self.tokenizer is None:
            raise RuntimeError("VQKDTarget.prepare() was not called")
        tok = self.tokenizer
        grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
        # the tokenizer sees the same image at its own patch size, so its grid is the model's grid
        size = (grid[0] * tok.patch_size, grid[1] * tok.patch_size)
        x = _to_unit_range(images.float(), mean_std) * 2.0 - 1.0  # the tokenizer's [-1, 1] input
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
        return tok.get_codebook_indices(x)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(pred.float(), target)


# ------------------------------------------------------------------------------------------ teacher
class TeacherTarget(MIMTarget):
    """Per-patch features of a frozen open_clip / timm image model (MVP / EVA / BEiT v2's CLIP target).

    Args:
        source: ``"open_clip"`` or ``"timm"``.
        model_name: an open_clip model name (``ViT-B-16``) or a timm model name
            (``vit_base_patch16_clip_224``); for open_clip also None with ``model_config``.
        checkpoint: weights file (``.pt`` / ``.bin`` / ``.safetensors``); None keeps the random
            initialisation (only sensible in tests).
        model_config: open_clip: ``CLIP(**model_config)`` (``embed_dim``, ``vision_cfg``,
            ``text_cfg``) instead of a name; timm: extra ``create_model`` keyword arguments.
        mean_std: the teacher's input normalisation (default: CLIP's for open_clip, the timm model's
            ``pretrained_cfg`` for timm).
        image_size: the teacher's input resolution (default: the model's own); features are resized
            to the student's grid when the grids differ.
        loss: ``cosine`` (1 - cos, the default), ``smooth_l1`` or ``mse`` (the last two on
            layer-normalised features).
    """

    def __init__(
        self,
        source: str = "open_clip",
        model_name: str | None = "ViT-B-16",
        checkpoint: str | None = None,
        model_config: dict[str, Any] | None = None,
        mean_std: str | None = None,
        image_size: int | None = None,
        loss: str = "cosine",
    ) -> None:
        super().__init__()
        if source not in ("open_clip", "timm"):
            raise ValueError(f"TeacherTarget source={source!r}: choose 'open_clip' or 'timm'")
        if loss not in ("cosine", "smooth_l1", "mse"):
            raise ValueError(f"TeacherTarget loss={loss!r}: choose 'cosine', 'smooth_l1' or 'mse'")
        if checkpoint is not None:
            _require_file(checkpoint, "TeacherTarget checkpoint (the teacher's weights)")
        self.source, self.model_name, self.checkpoint = source, model_name, checkpoint
        self.loss_type = loss
        self._loaded = checkpoint is None
        # built now (randomly initialised) so the head width is known; weights come in prepare()
        if source == "open_clip":
            import open_clip

            if model_config is not None:
                clip = open_clip.CLIP(**model_config)
            elif model_name:
                clip = open_clip.create_model(model_name, pretrained=None)
            else:
                raise ValueError("TeacherTarget(source='open_clip') needs model_name or model_config")
            self.net = clip.visual
            self.net.output_tokens = True
            size = self.net.image_size
            self.image_size = image_size or (size[0] if isinstance(size, tuple | list) else int(size))
            self.mean_std = mean_std or "clip"
            proj = self.net.proj
            self.dim = proj.shape[1] if proj is not None else self.net.transformer.width
        else:
            import timm

            if not model_name:
                raise ValueError("TeacherTarget(source='timm') needs model_name")
            self.net = timm.create_model(model_name, pretrained=False, num_classes=0, **(model_config or {}))
            cfg = getattr(self.net, "pretrained_cfg", {}) or {}
            self.image_size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
            self.mean_std = mean_std or (
                tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            )
            self.dim = self.net.num_features
        self.net.eval().requires_grad_(False)

    def out_dim(self, patch_size: int, in_chans: int) -> int:
        return self.dim

    def prepare(self, device: torch.device | str) -> None:
        if not self._loaded:
            from vlmoe.models import read_state_dict

            sd, where = read_state_dict(self.checkpoint)
            # a full CLIP checkpoint holds both towers; the teacher is the image tower
            if self.source == "open_clip" and any(k.startswith("visual.") for k in sd):
                sd = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
            missing, unexpected = self.net.load_state_dict(sd, strict=False)
            if missing:
                raise ValueError(f"{where}: teacher weights are missing {missing[:8]} (unexpected: {unexpected[:8]})")
            self._loaded = True
        self.to(device)

    def _features(self, x: Tensor) -> Tensor:
        """``(B, 3, S, S)`` teacher input -> ``(B, n, C)`` patch features."""
        if self.source == "open_clip":
            _, tokens = self.net(x)  # tokens: patch tokens after ln_post
            return tokens @ self.net.proj if self.net.proj is not None else tokens
        feats = self.net.forward_features(x)  # (B, prefix + n, C)
        return feats[:, getattr(self.net, "num_prefix_tokens", 1) :]

    @torch.no_grad()
    def forward(self, images: Tensor, patch_size: int, mean_std: str | tuple) -> Tensor:
        x = _to_unit_range(images.float(), mean_std)
        mean, std = resolve_mean_std(self.mean_std)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        # mean / std: (3,) -> (1, 3, 1, 1), broadcast over x (B, 3, S, S)
        x = (x - x.new_tensor(mean).view(1, -1, 1, 1)) / x.new_tensor(std).view(1, -1, 1, 1)
        f = self._features(x).float()  # (B, n, C)
        B, n, C = f.shape
        g = math.isqrt(n)
        grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
        if (g, g) != grid:
            # the teacher's patch grid differs from the student's: resample the feature map
            fm = f.transpose(1, 2).reshape(B, C, g, g)  # (B, n, C) -> (B, C, g, g)
            fm = F.interpolate(fm, size=grid, mode="bilinear", align_corners=False)
            f = fm.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        return f

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        pred, target = pred.float(), target.float()
        if self.loss_type == "cosine":
            return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
        target = F.layer_norm(target, target.shape[-1:])
        if self.loss_type == "smooth_l1":
            return F.smooth_l1_loss(pred, target)
        return F.mse_loss(pred, target)
