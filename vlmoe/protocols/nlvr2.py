"""NLVR2 identifiers (lil-lab/nlvr ``nlvr2/eval/metrics.py``, the dataset's file layout).

An example ``dev-850-0-1`` is statement 850 of the dev split over image pair 0, sentence variant 1;
its images are ``dev-850-0-img0.png`` / ``-img1.png`` (:func:`image_prefix`). Consistency groups the
examples that share a sentence over different image pairs: the identifier with its third field
blanked, ``dev-850--1`` (:func:`consistency_group`).
"""

from __future__ import annotations

__all__ = ["consistency_group", "image_prefix"]


def image_prefix(identifier: str) -> str:
    """``"dev-850-0-1"`` -> ``"dev-850-0"`` (the image file prefix)."""
    return identifier.rsplit("-", 1)[0]


def consistency_group(identifier: str) -> str:
    """``"dev-850-0-1"`` -> ``"dev-850--1"`` (examples sharing a sentence over different image pairs)."""
    parts = identifier.split("-")
    if len(parts) != 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} does not have 4 dash-separated fields")
    parts[2] = ""
    return "-".join(parts)
