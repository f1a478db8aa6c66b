"""What a data audit (audit.json) holds, as typed records: counts per class, the outliers, clusters
of identical images under more than one specimen number, and what a random split leaks. Written by
`defungi.data.audit`, drawn by `defungi.report.audit`. No torch here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from defungi.results.schema import SCHEMA_VERSION, read_record


@dataclass
class ClassCounts:
    """One class's images and specimens, and how many of its images are usable, outliers or unreadable."""

    images: int
    samples: int
    usable: int
    outliers: int
    unreadable: int


@dataclass
class AuditImage:
    """An image the audit lists: its file, class and specimen; its grey variance where it is an outlier,
    why it could not be read where it is unreadable."""

    path: str
    label: str
    sample: str = ""
    variance: float | None = None
    why: str = ""


@dataclass
class Leakage:
    """A seeded random split's test part against its training part."""

    test_images: int
    with_same_sample_in_training: int
    with_same_sample_or_duplicate_in_training: int  # counting identical images under other sample numbers
    test_samples: int
    test_samples_also_in_training: int


@dataclass
class AuditResult:
    """A data folder before any training (`defungi data audit`)."""

    root: str
    variance_threshold: float
    classes: dict[str, ClassCounts]
    variance: list[float]  # every readable image's grey variance
    outliers: list[AuditImage]
    unreadable: list[AuditImage]
    duplicate_clusters: list[list[AuditImage]]
    random_split_leakage: Leakage
    schema_version: int = SCHEMA_VERSION


def read_audit(path: Path) -> AuditResult:
    """audit.json (see `read_record` for the errors)."""
    return read_record(AuditResult, path)
