"""Figures from results already computed: no training happens here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    """Save atomically (write then rename) and close."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_history(history: Sequence[dict[str, float]], path: Path, title: str = "") -> Path:
    """Loss and validation macro-F1 per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_f1.plot(epochs, [h["train_accuracy"] for h in history], label="train accuracy", alpha=0.6)
    ax_f1.plot(epochs, [h["val_accuracy"] for h in history], label="validation accuracy", alpha=0.6)
    ax_f1.plot(epochs, [h["val_f1"] for h in history], label="validation macro-F1", lw=2)
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
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes, xlabel="predicted", ylabel="true")
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def contact_sheet(paths: Sequence[Path], captions: Sequence[str], path: Path, thumb: int = 96, columns: int = 10, limit: int = 100) -> Path:
    """A grid of thumbnails (e.g. the excluded outliers) with a caption under each."""
    from defungi.data.cache import open_image, square

    shown = list(zip(paths, captions))[:limit]
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 1.45), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (p, caption) in zip(axes.ravel(), shown):
        try:
            ax.imshow(np.asarray(square(open_image(Path(p), thumb), thumb)))
        except OSError:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
        ax.set_title(caption, fontsize=6)
    if not shown:
        axes[0, 0].text(0, 0.5, "nothing excluded", fontsize=10)
    title = f"{len(paths)} excluded" + (f" (first {limit} shown)" if len(paths) > limit else "")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


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
    ax.set(xticks=np.arange(len(classes)) + width * (len(series) - 1) / 2, xticklabels=classes, ylabel="images", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def metrics_table(rows: dict[str, dict[str, Any]], keys: Sequence[str] = ("accuracy", "precision", "recall", "f1")) -> str:
    """Markdown table: one row per named result, one column per metric."""
    head = "| | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    body = "".join(f"| {name} | " + " | ".join("" if r.get(k) is None else f"{r[k]:.3f}" for k in keys) + " |\n" for name, r in rows.items())
    return head + body
