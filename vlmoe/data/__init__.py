"""Data: tokenizers, transforms, masking, webdataset streams, readers of the official dataset formats,
collation into batch dicts, and the demo-data builder.

Everything between files on disk and the batch dict a model reads (see :mod:`vlmoe.data.collate`
for the dict's keys). Readers import lazily what only they need (pycocotools, easy_vqa).
"""

from vlmoe.data.collate import Collator, collate_detection
from vlmoe.data.controls import ShuffledImages, image_derangement
from vlmoe.data.demo import DemoPaths, build_demo, default_demo_dir
from vlmoe.data.errors import SampleErrors
from vlmoe.data.masking import IGNORE_INDEX, BlockMaskingGenerator, caption_mask, mlm_mask
from vlmoe.data.preprocess import Preprocess, preprocess_dict
from vlmoe.data.pretrain import MultiStream, PretrainData, PretrainDataConfig, split_batch
from vlmoe.data.shards import ShardWriter, count_samples, expand_shards, stream_pipeline
from vlmoe.data.tokenizers import (
    ClipBPETokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)
from vlmoe.data.transforms import build_transform

__all__ = [
    "IGNORE_INDEX",
    "BlockMaskingGenerator",
    "ClipBPETokenizer",
    "Collator",
    "DemoPaths",
    "HFTokenizer",
    "MultiStream",
    "Preprocess",
    "PretrainData",
    "PretrainDataConfig",
    "SampleErrors",
    "SentencePieceTokenizer",
    "ShardWriter",
    "ShuffledImages",
    "Tokenizer",
    "build_demo",
    "build_tokenizer",
    "build_transform",
    "collate_detection",
    "count_samples",
    "default_demo_dir",
    "expand_shards",
    "image_derangement",
    "caption_mask",
    "mlm_mask",
    "preprocess_dict",
    "split_batch",
    "stream_pipeline",
]
