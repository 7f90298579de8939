"""vlmoe: multimodal Mixture-of-Experts transformers."""

__version__ = "0.1.0"
