"""Model configs and presets, the multiway (MoE) backbone, task models and their heads, checkpoint
conversion and export. Pure torch + timm (no Lightning).

from vlmoe.models import create_model, load, VLMoEForPretraining
model = create_model("base_xmoe8")                      # preset + keyword overrides
model, report, _ = load("beit3_base_patch16_224.pth", "base_xmoe8")   # dense -> MoE upcycling
model, report, preprocess = load("out/vqa")             # any checkpoint: export, .ckpt, BEiT-3, timm, hf-hub:
"""

from .backbone import VLMoE, create_model, list_models
from .block import MultiwayBlock
from .checkpoint import load_checkpoint, load_state_dict, read_state_dict, upcycle
from .config import PRESETS, VLMoEConfig
from .convert import beit3_to_vlmoe, detect_format, timm_vit_to_vlmoe, vlmoe_to_beit3
from .detection import ViTDetBackbone, VLMoEForDetection, build_mask_rcnn
from .export import export_beit3, load_pretrained, save_pretrained
from .external import beit3_config, load_beit3, load_timm_vit, timm_vit_config
from .generation import GenerationOutput, beam_search, generate, greedy_search
from .heads import Pooler, TwoLayerMLP, select_tokens, vqa_classifier
from .loading import Source, load, read_source
from .output import BackboneOutput
from .report import LoadReport
from .segmentation import VLMoEForSegmentation
from .task_models import (
    TASK_MODELS,
    TaskModel,
    VLMoEForCaptioning,
    VLMoEForImageClassification,
    VLMoEForNLVR2,
    VLMoEForPretraining,
    VLMoEForRetrieval,
    VLMoEForVQA,
    build_task_model,
    captioning_attention_mask,
    register_task_model,
)

__all__ = [
    "PRESETS",
    "Source",
    "BackboneOutput",
    "GenerationOutput",
    "TASK_MODELS",
    "LoadReport",
    "MultiwayBlock",
    "Pooler",
    "TaskModel",
    "TwoLayerMLP",
    "VLMoEForCaptioning",
    "VLMoEForDetection",
    "VLMoEForImageClassification",
    "VLMoEForNLVR2",
    "VLMoEForPretraining",
    "VLMoEForRetrieval",
    "VLMoEForSegmentation",
    "VLMoEForVQA",
    "VLMoE",
    "VLMoEConfig",
    "ViTDetBackbone",
    "beit3_config",
    "beam_search",
    "beit3_to_vlmoe",
    "build_mask_rcnn",
    "build_task_model",
    "captioning_attention_mask",
    "create_model",
    "detect_format",
    "export_beit3",
    "generate",
    "greedy_search",
    "list_models",
    "load",
    "load_beit3",
    "load_checkpoint",
    "load_pretrained",
    "load_state_dict",
    "load_timm_vit",
    "read_source",
    "read_state_dict",
    "register_task_model",
    "save_pretrained",
    "select_tokens",
    "timm_vit_config",
    "timm_vit_to_vlmoe",
    "upcycle",
    "vlmoe_to_beit3",
    "vqa_classifier",
]
