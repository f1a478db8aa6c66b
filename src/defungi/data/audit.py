"""What a data folder holds, before any training: counts, outliers, duplicates across specimens, and
how much a random split leaks (plain data; `defungi.report.audit` draws the page)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from defungi.data.cache import decode_images
from defungi.data.quality import low_variance, merge_duplicate_specimens
from defungi.data.scan import class_names, scan
from defungi.data.splits import train_val_test_split
from defungi.results.audit import AuditImage, AuditResult, ClassCounts, Leakage


def audit(
    root: str | Path,
    variance_threshold: float,
    image_size: int = 64,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> AuditResult:
    """Images and specimens per class, grey variances and the outliers under the threshold, clusters of
    identical images (average hash) under more than one specimen number, and random-split leakage."""
    records = scan(root)
    decoded = decode_images(records, image_size)
    classes = class_names(records)
    unreadable = np.zeros(len(records), dtype=bool)
    unreadable[list(decoded.errors)] = True
    outlier = low_variance(decoded.variance, variance_threshold) & ~unreadable
    usable = ~(unreadable | outlier)
    per_class = {
        c: ClassCounts(
            images=sum(r.label == c for r in records),
            samples=len({r.specimen for r in records if r.label == c}),
            usable=int(sum(usable[i] for i, r in enumerate(records) if r.label == c)),
            outliers=int(sum(outlier[i] for i, r in enumerate(records) if r.label == c)),
            unreadable=int(sum(unreadable[i] for i, r in enumerate(records) if r.label == c)),
        )
        for c in classes
    }
    by_hash: dict[bytes, list[int]] = defaultdict(list)
    for i in np.flatnonzero(usable):
        by_hash[decoded.ahash[i].tobytes()].append(int(i))
    clusters = [
        [AuditImage(str(records[i].path), records[i].label, records[i].specimen) for i in members]
        for members in by_hash.values()
        if len({records[i].specimen for i in members}) > 1
    ]
    return AuditResult(
        root=str(root),
        variance_threshold=variance_threshold,
        classes=per_class,
        variance=[float(v) for v in decoded.variance[~unreadable]],
        outliers=[
            AuditImage(str(records[i].path), records[i].label, records[i].specimen, float(decoded.variance[i]))
            for i in np.flatnonzero(outlier)
        ],
        unreadable=[
            AuditImage(str(records[i].path), records[i].label, records[i].specimen, why=why)
            for i, why in decoded.errors.items()
        ],
        duplicate_clusters=clusters,
        random_split_leakage=_leakage(records, decoded.ahash, usable, val_fraction, test_fraction, seed),
    )


def _leakage(
    records: list, ahash: np.ndarray, usable: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> Leakage:
    """How many test images of a seeded random split have an image of the same specimen (or of a
    specimen joined to it by an identical image) in the training part."""
    idx = np.flatnonzero(usable)
    labels = np.array([records[i].label for i in idx])
    specimens = np.array([records[i].specimen for i in idx])
    merged = np.array(merge_duplicate_specimens([r.specimen for r in records], ahash, usable))[idx]
    split = train_val_test_split(
        np.unique(labels, return_inverse=True)[1], specimens, val_fraction, test_fraction, "random", seed
    )
    test, train = split["test"], split["train"]
    same_specimen = np.isin(specimens[test], specimens[train])
    same_cluster = np.isin(merged[test], merged[train])
    return Leakage(
        test_images=int(len(test)),
        with_same_sample_in_training=int(same_specimen.sum()),
        with_same_sample_or_duplicate_in_training=int(same_cluster.sum()),
        test_samples=int(len(np.unique(specimens[test]))),
        test_samples_also_in_training=int(len(np.intersect1d(specimens[test], specimens[train]))),
    )
