"""Outlier exclusion by grey-level variance, and grouping of near-duplicate images."""

from __future__ import annotations

import numpy as np


def low_variance(variance: np.ndarray, threshold: float) -> np.ndarray:
    """True where an image is an outlier: grey-level variance under threshold (blank or blurred)."""
    return np.nan_to_num(variance, nan=np.inf) < threshold


def merge_duplicate_specimens(specimens: list[str], ahash: np.ndarray, usable: np.ndarray) -> list[str]:
    """Join the specimens of images with identical average hashes, so near-copies share a split part."""
    parent = {g: g for g in specimens}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    first_by_hash: dict[bytes, str] = {}
    for i in np.flatnonzero(usable):
        key = ahash[i].tobytes()
        if key in first_by_hash:
            a, b = find(first_by_hash[key]), find(specimens[i])
            if a != b:
                parent[max(a, b)] = min(a, b)
        else:
            first_by_hash[key] = specimens[i]
    return [find(g) for g in specimens]
