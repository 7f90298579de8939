"""One loader for every kind of checkpoint: ``vlmoe.models.load(path) -> (model, report, preprocess)``.

    model, report, preprocess = load("out/vqa")                          # a `vlmoe export` folder
    model, report, preprocess = load("runs/finetune/vqav2/demo/checkpoints/last.ckpt")   # training .ckpt
    model, report, _ = load("beit3_base_patch16_224.pth", "base_xmoe8")  # official BEiT-3, upcycled
    model, report, _ = load("vit_base.safetensors")                      # a timm ViT
    model, report, preprocess = load("hf-hub:ORG/NAME")                  # an export folder on the Hub

:func:`read_source` reads a file once and says what it holds (:class:`Source`: its kind, the backbone
config it states or that its tensors imply, the task block, the preprocessing, the state dict); the
finetuning task, ``vlmoe export``, ``vlmoe.load`` and the routing analysis build on it, so a file is
never read twice to learn what model it holds and then to fill it.

``hf-hub:ORG/NAME[@REVISION]`` is an export folder (``config.json`` + ``model.safetensors`` + the
tokenizer, exactly what ``vlmoe export`` writes and ``huggingface_hub.upload_folder`` publishes),
fetched with ``huggingface_hub.snapshot_download``; with ``HF_HUB_OFFLINE=1`` it is read from the local
Hub cache only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vlmoe.io import torch_load

from .backbone import VLMoE
from .checkpoint import (
    is_training_checkpoint,
    load_checkpoint,
    read_state_dict,
    resolve_config,
    split_task_state,
    task_state_dict,
)
from .config import VLMoEConfig
from .convert import StateDict, detect_format, legacy_head_keys, strip_prefix
from .export import CONFIG_NAME, WEIGHTS_NAME, legacy_task, read_export
from .external import beit3_config, load_beit3, load_timm_vit, timm_vit_config
from .report import LoadReport
from .task_models import build_task_model

__all__ = ["HUB_PREFIX", "KINDS", "Source", "hub_folder", "load", "load_into", "read_source"]

HUB_PREFIX = "hf-hub:"
KINDS = ("export", "training", "beit3", "timm", "vlmoe")


@dataclass
class Source:
    """What one checkpoint file holds, read once.

    Attributes:
        kind: ``export`` (a ``vlmoe export`` folder), ``training`` (a ``vlmoe pretrain`` / ``finetune``
            ``.ckpt``), ``beit3`` (an official BEiT-3 checkpoint), ``timm`` (a timm ViT) or ``vlmoe``
            (a bare vlmoe state dict, which states no architecture).
        config: the backbone config it states (export, training) or its tensors imply (BEiT-3, timm);
            None for a bare state dict.
        task: the task block (``{"type": ...}``) of the model it holds, or None.
        preprocess: its preprocessing dict, or None.
        state_dict: its weights (unwrapped, ``module.`` stripped).
        where: the file, for messages and load reports.
    """

    kind: str
    config: VLMoEConfig | None
    task: dict[str, Any] | None
    preprocess: dict[str, Any] | None
    state_dict: StateDict
    where: str

    @property
    def format(self) -> str:
        """The key layout :func:`~vlmoe.models.load_checkpoint` reads it with."""
        return "vlmoe" if self.kind in ("export", "training") else self.kind

    @property
    def is_vlmoe_model(self) -> bool:
        """A model vlmoe wrote with its description (an export folder or a training checkpoint)."""
        return self.kind in ("export", "training")


def hub_folder(spec: str) -> Path:
    """The local folder of ``hf-hub:ORG/NAME[@REVISION]`` (downloaded, or from the cache when offline)."""
    name = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    repo, _, revision = name.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{spec}: expected {HUB_PREFIX}ORG/NAME[@REVISION]")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # an optional dependency
        raise ImportError(f"{spec}: loading from the Hugging Face Hub needs huggingface_hub (pip install "
                          "huggingface_hub)") from e
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision or None))
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; one line naming the repository
        raise FileNotFoundError(f"{spec}: cannot fetch it from the Hugging Face Hub ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None


def read_source(src: str | os.PathLike | Source, *, key: str | None = None, format: str = "auto") -> Source:
    """Read a checkpoint once: a ``vlmoe export`` folder (or its ``model.safetensors``), a training
    ``.ckpt``, a BEiT-3 / timm / vlmoe state dict (``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``), or
    ``hf-hub:ORG/NAME[@REVISION]``.

    Args:
        src: the file, folder or Hub name (a :class:`Source` is returned as it is).
        key: container key to unwrap a state dict from (default: ``model`` / ``module`` / ``state_dict``).
        format: ``auto`` (detected from the keys), ``beit3``, ``timm`` or ``vlmoe`` for a state dict.
    """
    if isinstance(src, Source):
        return src
    if format not in ("auto", "beit3", "timm", "vlmoe"):
        raise ValueError(f"unknown checkpoint format {format!r}; choose from auto, beit3, timm, vlmoe")
    path = hub_folder(str(src)) if str(src).startswith(HUB_PREFIX) else Path(src)
    if not path.exists():
        if path.suffix in (".pth", ".pt", ".bin", ".ckpt", ".safetensors"):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        raise FileNotFoundError(f"{path}: no such model folder or checkpoint file")
    if key is None and _is_export(path):
        info = read_export(path)
        sd, _ = read_state_dict(info.weights)
        return Source("export", info.config, info.task, info.preprocess, sd, str(info.weights))
    obj: Any = None
    if path.suffix == ".ckpt" and key is None:
        obj = torch_load(path)
        if is_training_checkpoint(obj) and "vlmoe_config" in obj:
            config = obj["vlmoe_config"]
            return Source("training", VLMoEConfig.from_dict(config), obj.get("vlmoe_task", legacy_task(config)),
                          obj.get("vlmoe_preprocess"), task_state_dict(obj), str(path))
    sd, where = read_state_dict(obj if obj is not None else path, key)
    where = str(path) if obj is not None else where
    sd = legacy_head_keys(strip_prefix(sd, ("module.",)))
    kind = detect_format(split_task_state(sd)[0]) if format == "auto" else format
    config = beit3_config(sd) if kind == "beit3" else timm_vit_config(sd) if kind == "timm" else None
    return Source(kind, config, None, None, sd, where)


def _is_export(path: Path) -> bool:
    """A model folder (``config.json``, or a ``model.safetensors`` carrying its config), or the weights
    file of one; a folder that is neither is an error."""
    if path.is_dir():
        if (path / CONFIG_NAME).exists() or _has_metadata(path / WEIGHTS_NAME):
            return True
        raise FileNotFoundError(f"{path}: not a model folder (no {CONFIG_NAME}; write one with `vlmoe export`)")
    if path.suffix != ".safetensors":
        return False
    return (path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).exists()) or _has_metadata(path)


def _has_metadata(weights: Path) -> bool:
    """A ``model.safetensors`` that carries its vlmoe config in its metadata (an export without config.json)."""
    if not weights.is_file():
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            return "vlmoe_config" in (f.metadata() or {})
    except SafetensorError:
        return False


def load_into(model: nn.Module, source: Source, *, strict: bool = False, upcycle_noise: float = 0.0,
              allow_partial: bool = False) -> LoadReport:
    """Fill ``model`` (a backbone or a task model) from a :class:`Source` already read (see
    :func:`~vlmoe.models.load_checkpoint`: dense -> MoE upcycling, resized positions, heads)."""
    return load_checkpoint(model, source.state_dict, format=source.format, strict=strict,
                           upcycle_noise=upcycle_noise, allow_partial=allow_partial, source=source.where)


def load(
    src: str | os.PathLike | Source,
    config: str | VLMoEConfig | None = None,
    *,
    strict: bool = False,
    upcycle_noise: float = 0.0,
    key: str | None = None,
    format: str = "auto",
    allow_partial: bool = False,
    **overrides: Any,
) -> tuple[nn.Module, LoadReport, dict[str, Any] | None]:
    """The model a checkpoint holds, filled from it: ``(model, load report, preprocessing or None)``.

    An export folder or a training checkpoint gives its task model (the backbone alone when it has no
    task) and its preprocessing; a BEiT-3, timm or vlmoe state dict gives a backbone (BEiT-3 / timm:
    the architecture read off the tensors unless ``config`` says otherwise, e.g. an MoE preset to
    upcycle into).

    Args:
        src: see :func:`read_source`.
        config: preset name, config file or :class:`VLMoEConfig` to build instead of the checkpoint's
            own architecture (a bare vlmoe state dict needs one).
        strict: raise unless the checkpoint fits the model exactly.
        upcycle_noise: noise std for dense -> MoE copies.
        key / format: see :func:`read_source`.
        allow_partial: accept a checkpoint that provides under half of the backbone's weights.
        overrides: backbone config fields to change (``img_size=384`` resizes the positions).
    """
    source = read_source(src, key=key, format=format)
    if source.kind == "beit3":
        model, report = load_beit3(source.state_dict, config, strict=strict, upcycle_noise=upcycle_noise,
                                   source=source.where, **overrides)
    elif source.kind == "timm":
        model, report = load_timm_vit(source.state_dict, config, strict=strict, source=source.where, **overrides)
    else:
        base = source.config if config is None else resolve_config(config)
        if base is None:
            raise ValueError(f"{source.where}: a bare vlmoe state dict carries no architecture; give a config "
                             "(a preset name or a config file)")
        model = build_task_model(VLMoE(base.replace(**overrides) if overrides else base), source.task)
        if source.kind == "export" and source.task is None and strict:
            _check_no_heads(model, source)
        return model, load_into(model, source, strict=strict, upcycle_noise=upcycle_noise,
                                allow_partial=allow_partial), source.preprocess
    report.source = source.where
    return model, report, None


def _check_no_heads(model: nn.Module, source: Source) -> None:
    """An export without a task block whose weights hold task heads lacks its description: an error."""
    children = dict(model.named_children())
    heads = sorted(k for k in source.state_dict if k.split(".")[0] not in children and k.split(".")[0] != "backbone")
    if heads:
        folder = Path(source.where).parent
        raise ValueError(f"{folder}: its config.json has no 'task' block, but the weights hold task heads "
                         f"({', '.join(heads[:3])}{', ...' if len(heads) > 3 else ''}); the task description is "
                         "missing - export the training checkpoint again with `vlmoe export CKPT DIR`")
