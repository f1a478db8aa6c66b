"""Figures from results already computed: no training happens here."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from defungi.results.history import EpochRow  # noqa: E402
from defungi.results.run import FoldScores, Reliability  # noqa: E402
from defungi.results.search import GridRow, LearningCurve  # noqa: E402
from defungi.results.trust import RiskCoverage  # noqa: E402
from defungi.utils import atomic_write_binary  # noqa: E402

DPI = 110  # the figures' pixels per inch


def _save(fig: plt.Figure, path: Path, dpi: int = DPI, tight: bool = True, compress: int = 6) -> Path:
    """Save as PNG atomically (a uniquely named temporary file, then a rename: two commands drawing
    the same figure at once each write a whole one) and close. tight: cropped to what is drawn (which
    draws the figure twice); otherwise the figure as laid out. compress: zlib's level (1: fastest)."""
    bbox, png = "tight" if tight else None, {"compress_level": compress}
    try:
        atomic_write_binary(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi, bbox_inches=bbox, pil_kwargs=png))
    finally:
        plt.close(fig)
    return path


def plot_history(history: Sequence[EpochRow], path: Path, title: str = "") -> Path:
    """Loss and validation macro-F1 per epoch."""
    epochs = [h.epoch for h in history]
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [h.train_loss for h in history], label="train")
    ax_loss.plot(epochs, [h.val_loss for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_f1.plot(epochs, [h.train_accuracy for h in history], label="train accuracy", alpha=0.6)
    ax_f1.plot(epochs, [h.val_accuracy for h in history], label="validation accuracy", alpha=0.6)
    ax_f1.plot(epochs, [h.val_f1 for h in history], label="validation macro-F1", lw=2)
    ax_f1.set(xlabel="epoch", ylabel="score", title="scores", ylim=(0, 1))
    for ax in (ax_loss, ax_f1):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Confusion matrix with counts, rows normalised for the colour."""
    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=9,
            )
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
    )
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def contact_sheet(
    paths: Sequence[Path],
    captions: Sequence[str],
    path: Path,
    thumb: int = 128,
    columns: int = 10,
    limit: int = 100,
    what: str = "excluded",
) -> Path:
    """A grid of thumbnails (e.g. the excluded outliers) with a caption of one or more lines over each
    and, right above them, a title that counts them; no wider than the thumbnails shown (up to
    `columns`). Laid out in pixels and drawn with PIL (matplotlib took a second for the text of a
    sheet of 100), in matplotlib's own font, the thumbnails placed as they are (nothing resampled)."""
    from PIL import Image, ImageDraw

    from defungi.data.cache import DECODE_ERRORS, open_image, square

    shown = list(zip(paths, captions, strict=True))[:limit]
    columns = max(1, min(columns, len(shown)))
    lines = max((caption.count("\n") + 1 for _, caption in shown), default=1)
    margin = thumb // 10  # about one caption line: beside each thumbnail, and between a row and the captions under it
    rows, band = max(1, -(-len(shown) // columns)), margin * lines  # the band above a thumbnail holds its caption
    grid = (columns * (thumb + margin), rows * (thumb + band + margin) - margin)
    title = f"{len(paths)} {what}" + (f" (first {limit} shown)" if len(paths) > limit else "")
    # the grid centred under a band that holds its title (about 8 pixels a letter), with 11 pixels of
    # white on either side
    wide, head = max(grid[0], 8 * len(title)) + 22, 33
    side = (wide - grid[0]) // 2
    sheet = Image.new("RGB", (wide, grid[1] + head), "white")
    draw = ImageDraw.Draw(sheet)
    small = _font(round(6 * DPI / 72))  # 6 points, as the figures' smallest text
    draw.text((wide / 2, head - 5), title, fill="black", font=_font(round(9 * DPI / 72)), anchor="md")
    for k, (p, caption) in enumerate(shown):
        top, left = head + (k // columns) * (thumb + band + margin) + band, side + (k % columns) * (thumb + margin)
        try:
            sheet.paste(square(open_image(Path(p), thumb), thumb), (left, top))
        except DECODE_ERRORS:
            draw.text((left + thumb / 2, top + thumb / 2), "(unreadable)", fill="black", font=small, anchor="mm")
        draw.multiline_text((left + thumb / 2, top - 2), caption, fill="black", font=small, anchor="md", align="center")
    if not shown:
        draw.text((side, head + grid[1] / 2), f"nothing {what}", fill="black", font=_font(15), anchor="lm")
    # a photograph: zlib's best saves little, at 3x the time
    atomic_write_binary(path, lambda fh: sheet.save(fh, format="PNG", compress_level=1))
    return path


@functools.cache
def _font(pixels: int) -> Any:
    """matplotlib's default font (DejaVu Sans, shipped with it) at a size in pixels, for PIL."""
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont(font_manager.FontProperties()), pixels)


def plot_class_counts(counts: dict[str, dict[str, int]], path: Path, title: str = "class counts") -> Path:
    """Grouped bars: one bar per series (e.g. before / after balancing) for every class."""
    series = list(counts)
    classes = list(next(iter(counts.values())))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for k, name in enumerate(series):
        values = [counts[name][c] for c in classes]
        bars = ax.bar(np.arange(len(classes)) + k * width, values, width, label=name)
        ax.bar_label(bars, fontsize=7)
    ax.set(
        xticks=np.arange(len(classes)) + width * (len(series) - 1) / 2,
        xticklabels=classes,
        ylabel="images",
        title=title,
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_learning_curve(curves: dict[str, LearningCurve], path: Path, title: str = "learning curve") -> Path:
    """Macro-F1 and loss against training-set size, mean and spread over folds, per named curve."""
    fig, (ax_f1, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, curve in curves.items():
        sizes = np.nanmean(np.asarray(curve.train_size), axis=0)
        for who, style, f1, loss in (
            ("validation", "-o", curve.val_f1, curve.val_loss),
            ("training", "--s", curve.train_f1, curve.train_loss),
        ):
            for ax, scores in ((ax_f1, f1), (ax_loss, loss)):
                values = np.asarray(scores)
                mean, spread = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
                ax.plot(sizes, mean, style, label=f"{label}: {who}", ms=4)
                if values.shape[0] > 1:
                    ax.fill_between(sizes, mean - spread, mean + spread, alpha=0.2)
    ax_f1.set(xlabel="training images", ylabel="macro-F1", ylim=(0, 1), title="macro-F1")
    ax_loss.set(xlabel="training images", ylabel="cross-entropy", title="loss")
    for ax in (ax_f1, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_epoch_curves(
    histories: Sequence[Sequence[EpochRow]],
    labels: Sequence[str],
    path: Path,
    title: str = "per-epoch validation macro-F1",
) -> Path:
    """Validation macro-F1 and training loss per epoch for several fits."""
    fig, (ax_f1, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.4))
    for history, label in zip(histories, labels, strict=True):
        epochs = [h.epoch for h in history]
        ax_f1.plot(epochs, [h.val_f1 for h in history], "-o", ms=3, label=label)
        ax_loss.plot(epochs, [h.train_loss for h in history], "-o", ms=3, label=label)
    ax_f1.set(xlabel="epoch", ylabel="validation macro-F1", ylim=(0, 1))
    ax_loss.set(xlabel="epoch", ylabel="training loss")
    for ax in (ax_f1, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_grid(rows: Sequence[GridRow], x: str, y: str, path: Path, title: str = "grid search") -> Path:
    """Heat map of validation macro-F1 over the x and y grid keys, best cell outlined."""
    xs = sorted({r.cell[x] for r in rows})
    ys = sorted({r.cell[y] for r in rows})
    grid = np.full((len(ys), len(xs)), np.nan)
    for r in rows:
        grid[ys.index(r.cell[y]), xs.index(r.cell[x])] = r.val_f1
    fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 2.5, 0.8 * len(ys) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not np.isnan(grid[i, j]):
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.3f}",
                    ha="center",
                    va="center",
                    color="white" if grid[i, j] < np.nanmean(grid) else "black",
                    fontsize=9,
                )
    bi, bj = np.unravel_index(np.nanargmax(grid), grid.shape)
    ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set(
        xticks=range(len(xs)),
        yticks=range(len(ys)),
        xticklabels=[f"{v:g}" if isinstance(v, float) else str(v) for v in xs],
        yticklabels=[str(v) for v in ys],
        xlabel=x.split(".")[-1],
        ylabel=y.split(".")[-1],
        title=title,
    )
    fig.colorbar(im, ax=ax, label="val f1")
    return _save(fig, path)


def plot_bars(
    values: dict[str, dict[str, float]],
    path: Path,
    title: str,
    keys: Sequence[str] = ("accuracy", "precision", "recall", "f1"),
) -> Path:
    """Grouped bars of metrics per named result (e.g. with/without augmentation, ours vs published),
    with 95% interval whiskers for a result that has intervals."""
    names = list(values)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for k, name in enumerate(names):
        heights = np.array([values[name].get(m, np.nan) for m in keys], dtype=float)
        bounds = values[name].get("intervals", {})
        spans = np.array([bounds.get(m, [h, h]) for m, h in zip(keys, heights, strict=True)], dtype=float)
        errors = np.abs(np.stack([heights - spans[:, 0], spans[:, 1] - heights]))
        bars = ax.bar(np.arange(len(keys)) + k * width, heights, width, label=name, yerr=errors, capsize=2)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, label_type="center")
    ax.set(xticks=np.arange(len(keys)) + width * (len(names) - 1) / 2, xticklabels=keys, ylim=(0, 1), title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_errorbars(
    x: Sequence[float],
    mean: Sequence[float],
    spread: Sequence[float],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str,
    series: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Path:
    """Mean +- spread against x, optionally several named series."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, (m, s) in (series or {ylabel: (mean, spread)}).items():
        ax.errorbar(x, m, yerr=s, fmt="-o", capsize=3, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_reliability(
    calibration: Reliability | dict[str, Reliability], path: Path, title: str = "reliability", counted: str = "images"
) -> Path:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), with the bins' counts
    of what was counted; several named reliabilities (e.g. raw and calibrated) side by side."""
    curves = calibration if isinstance(calibration, dict) else {"": calibration}
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(4.8, 5.2), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    for k, (name, curve) in enumerate(curves.items()):
        count = np.asarray(curve.count)
        filled, width = count > 0, 0.9 / curve.bins / len(curves)
        label = f"{name} (ECE {curve.ece:.3f})" if name else None
        x, y = np.asarray(curve.confidence)[filled], np.asarray(curve.accuracy)[filled]
        ax.plot(x, y, "-o", ms=4, label=label, clip_on=False)  # bins at 1.0 on the frame
        centres = (np.arange(curve.bins) + 0.5) / curve.bins + (k - (len(curves) - 1) / 2) * width
        ax_count.bar(centres, count, width=width)
    if isinstance(calibration, dict):
        ax.legend(fontsize=8, loc="best")
    else:
        title = f"{title} (ECE {calibration.ece:.3f})"
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax_count.set(xlabel="confidence of the predicted class", ylabel=counted)
    return _save(fig, path)


def plot_folds(folds: Sequence[FoldScores], path: Path, title: str = "macro-F1 per fold") -> Path:
    """Macro-F1 per cross-validation fold, per image and per specimen, with the mean of each."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    x = np.arange(len(folds))
    for k, (key, label) in enumerate((("f1", "per image"), ("sample_f1", "per specimen"))):
        values = [getattr(f, key) for f in folds]
        bars = ax.bar(x + (k - 0.5) * 0.38, values, 0.38, label=f"{label} (mean {np.mean(values):.3f})")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set(xticks=x, xticklabels=[f"fold {f.number}\n{f.test_samples} specimens" for f in folds], ylim=(0, 1))
    ax.set(ylabel="test macro-F1", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_variance(variance: Sequence[float], threshold: float, path: Path) -> Path:
    """Histogram of the images' grey-level variance (log scale) with the outlier threshold."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    values = np.asarray(variance)
    under = int(np.sum(values < threshold))
    ax.hist(np.log10(np.maximum(values, 1e-3)), bins=60)
    ax.axvline(np.log10(threshold), color="red", lw=2, label=f"threshold {threshold:g}: {under} images under it")
    ax.set(xlabel="grey-level variance at 224 px (log10)", ylabel="images", title="image variance")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_explanation(
    image: np.ndarray,
    overlay: np.ndarray,
    cam: np.ndarray,
    path: Path,
    title: str,
    method: str,
    ring: tuple[float, float, float],
) -> Path:
    """The image, its class activation map over it, and the map alone with its colour bar and the
    border ring (ring: its width as a fraction of the side, the map's share in it, its share of the area)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1, 1.08]})
    axes[0].imshow(image)
    axes[0].set_title("the image, as the model sees it", fontsize=12)
    axes[1].imshow(overlay, interpolation="bilinear")
    axes[1].set_title(f"{method}, over the image", fontsize=12)
    shown = axes[2].imshow(cam, cmap="jet", vmin=0, vmax=1, interpolation="bilinear")
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.03).set_label("evidence (relative)", fontsize=11)
    width, share, area = ring
    side = cam.shape[-1]
    inner = side * (1 - 2 * width)
    axes[2].add_patch(plt.Rectangle((side * width - 0.5,) * 2, inner, inner, fill=False, ls="--", lw=1.5, ec="white"))
    where = "no evidence anywhere" if np.isnan(share) else f"{share:.0%} of it in the border ring"
    axes[2].set_title(f"the map: {where}\n(dashed; {area:.0%} if spread evenly)", fontsize=12)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=13)
    return _save(fig, path, dpi=150)


def plot_risk_coverage(curve: RiskCoverage, path: Path, title: str = "selective answers") -> Path:
    """Accuracy on the answered specimens against the share answered, most confident first, with the
    tabulated shares marked (their 95% intervals as bars)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(np.asarray(curve.coverage) * 100, curve.accuracy, "-", lw=1.5, label="answered most confident first")
    shares = np.array([r.coverage for r in curve.table]) * 100
    accuracy = np.array([r.accuracy for r in curve.table])
    errors = np.abs(np.array([r.interval for r in curve.table]).T - accuracy)
    ax.errorbar(shares, accuracy, yerr=errors, fmt="o", capsize=3, label="95% interval over specimens")
    ax.set(xlabel=f"{curve.unit}s answered (%)", ylabel="accuracy on those answered", xlim=(0, 102), title=title)
    ax.set_ylim(min(0.5, float(np.min(curve.accuracy)) - 0.05), 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)
