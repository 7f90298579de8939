"""Evaluators that reproduce the official protocols (pure Python / pycocotools / pycocoevalcap)."""
