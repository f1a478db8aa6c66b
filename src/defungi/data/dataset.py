"""One call from a folder to decoded, filtered, labelled images ready to split and train on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defungi.data.cache import DecodedImages, decode_images
from defungi.data.quality import low_variance, merge_duplicate_specimens
from defungi.data.scan import ImageRecord, class_names, scan
from defungi.data.store import StoredRows
from defungi.errors import DefungiError

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Usable images (outliers and unreadable files removed) with labels and specimens."""

    images: np.ndarray | StoredRows  # (N, S, S, 3) uint8, read from the cache when indexed (data.store)
    labels: np.ndarray  # (N,) int
    specimens: np.ndarray  # (N,) str: specimen, near-duplicates merged
    paths: list[Path]
    classes: list[str]
    excluded: list[dict[str, str]]  # path, label, grey_variance, reason
    keys: np.ndarray  # (N,) each file's content key (data.store.file_keys): what per-image caches look up


def load_dataset(
    root: str | Path,
    image_size: int,
    variance_threshold: float,
    classes: list[str] | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Dataset:
    """Scan, decode (cached), drop unreadable and low-variance images, merge duplicate specimens.

    classes: the class list of a trained model, so that evaluation folders map to the same
    indices; a folder class the model does not know is an error, one class alone is fine. To train
    (no classes), every class needs a usable image.
    """
    training = classes is None
    records: list[ImageRecord] = scan(root, min_classes=2 if training else 1)
    found = class_names(records)
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DefungiError(f"{root}: class folders {unknown} are not classes of this model ({classes})")
    decoded = decode_images(records, image_size, cache_dir=cache_dir, progress=progress)
    for i, why in decoded.errors.items():
        log.warning("skipped %s: %s", records[i].path, why)
    unreadable = np.zeros(len(records), dtype=bool)
    unreadable[list(decoded.errors)] = True
    outlier = low_variance(decoded.variance, variance_threshold) & ~unreadable
    keep = ~(unreadable | outlier)
    _check_usable(root, records, keep, variance_threshold, found if training else [])
    specimens = merge_duplicate_specimens([r.specimen for r in records], decoded.ahash, keep)
    idx = np.flatnonzero(keep)
    log.info(
        "%d images, %d usable, %d outliers, %d unreadable",
        len(records),
        len(idx),
        int(outlier.sum()),
        int(unreadable.sum()),
    )
    return Dataset(
        images=decoded.pixels(idx),
        labels=np.array([classes.index(records[i].label) for i in idx]),
        specimens=np.array([specimens[i] for i in idx]),
        paths=[records[i].path for i in idx],
        classes=list(classes),
        excluded=_excluded(records, decoded, keep, variance_threshold),
        keys=decoded.keys[idx],
    )


def _check_usable(
    root: str | Path, records: list[ImageRecord], keep: np.ndarray, variance_threshold: float, needed: list[str]
) -> None:
    """Refuse a folder with no usable image, or one where a needed class (all of them, to train) has none."""
    if not keep.any():
        raise DefungiError(
            f"{root}: no usable images (all unreadable or under variance threshold {variance_threshold})"
        )
    record_labels = np.array([r.label for r in records])
    empty = [c for c in needed if not keep[record_labels == c].any()]
    if empty:
        raise DefungiError(
            f"{root}: class {', '.join(empty)} has no usable image (all unreadable or under variance threshold "
            f"{variance_threshold:g}; see the warnings above); add images or remove the folder"
        )


def _excluded(
    records: list[ImageRecord], decoded: DecodedImages, keep: np.ndarray, variance_threshold: float
) -> list[dict[str, str]]:
    """Each image left out: its path, label, grey variance and why (its decoding error, or the threshold)."""
    return [
        {
            "path": str(records[i].path),
            "label": records[i].label,
            "grey_variance": "" if np.isnan(decoded.variance[i]) else f"{decoded.variance[i]:.2f}",
            "reason": decoded.errors.get(int(i), f"grey variance under {variance_threshold:g}"),
        }
        for i in np.flatnonzero(~keep)
    ]
