"""Evaluators that reproduce the official protocols (pure Python / pycocotools / pycocoevalcap).

Every evaluator follows :class:`vlmoe.metrics.base.Evaluator` (``reset / update / gather /
compute``, one record per sample id, so DDP padding duplicates never count twice). The datasets'
own rules (answer normalisation, identifiers) are in :mod:`vlmoe.protocols`.
"""

from .base import Evaluator, all_gather_objects

__all__ = ["Evaluator", "all_gather_objects"]
