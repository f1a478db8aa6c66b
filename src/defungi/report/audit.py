"""The data audit page (audit.json -> audit.html and .md with figures), from the file alone."""

from __future__ import annotations

from pathlib import Path

from defungi.layout import AuditLayout
from defungi.report.page import Page, Table
from defungi.report.plots import contact_sheet, plot_variance
from defungi.results.audit import read_audit

HEADERS = {"samples": "specimens"}  # audit.json's field names, as the page heads them


def build_audit_report(out_dir: Path) -> Path:
    """audit.html and audit.md in out_dir from its audit.json; returns the HTML path."""
    layout = AuditLayout(out_dir)
    result = read_audit(layout.result)
    page = Page(f"Data audit: {result.root}")
    keys = ("images", "samples", "usable", "outliers", "unreadable")
    rows = [[c, *(str(getattr(v, k)) for k in keys)] for c, v in result.classes.items()]
    rows.append(["all", *(str(sum(getattr(v, k) for v in result.classes.values())) for k in keys)])
    page.table(Table(["class", *(HEADERS.get(k, k) for k in keys)], rows))
    page.heading("Outliers: grey-level variance under the threshold")
    page.figure(plot_variance(result.variance, result.variance_threshold, layout.figure("variance")))
    outliers = result.outliers
    captions = [f"{o.label} v={o.variance:.1f}" for o in outliers]
    page.figure(contact_sheet([Path(o.path) for o in outliers], captions, layout.figure("outliers"), what="outliers"))
    clusters = result.duplicate_clusters
    page.heading("Identical images under more than one specimen number")
    page.text(
        f"{len(clusters)} clusters of images with the same average hash span more than one specimen number "
        f"({sum(len(c) for c in clusters)} images); a grouped split keeps each cluster in one part."
    )
    if clusters:
        shown = [image for cluster in clusters[:20] for image in cluster]
        page.figure(
            contact_sheet(
                [Path(i.path) for i in shown],
                [f"{i.label} {Path(i.path).name}" for i in shown],
                layout.figure("duplicates"),
                columns=8,
                what=f"images of the first {min(20, len(clusters))} clusters",
            )
        )
        rows = [[str(k + 1), ", ".join(sorted({i.sample for i in c})), str(len(c))] for k, c in enumerate(clusters)]
        page.table(Table(["cluster", "specimens", "images"], rows))
    leak = result.random_split_leakage
    page.heading("What a random split leaks")
    page.text(
        f"In a seeded random split (as the published study), {leak.with_same_sample_in_training} of its "
        f"{leak.test_images} test images have another image of the same specimen in the training part "
        f"({leak.with_same_sample_or_duplicate_in_training} counting identical images under other sample numbers); "
        f"{leak.test_samples_also_in_training} of the {leak.test_samples} specimens in its test part are also "
        "trained on. The grouped split (the default) leaks none of them."
    )
    return page.write(layout.page)
