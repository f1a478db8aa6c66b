"""Class and probabilities for image files or folders, from a run folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from defungi.data.cache import DECODE_ERRORS, decode_one
from defungi.data.scan import IMAGE_SUFFIXES
from defungi.errors import DefungiError
from defungi.experiments.rundir import load_trained
from defungi.train.loop import predict_proba

log = logging.getLogger(__name__)


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Image files named directly, and every image file under named folders."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise DefungiError(f"{p}: no such file or folder")
    if not files:
        raise DefungiError(f"no image files (.jpg/.png/.tif/.bmp) in {', '.join(map(str, paths))}")
    return files


def predict(
    run_dir: str | Path, paths: list[str | Path], tta: bool | None = None, prior_weight: float | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per file (path, predicted class, probability per class, or the error), and the classes."""
    trained = load_trained(run_dir)
    files = expand_paths(paths)
    size = trained.preprocess.image_size
    pixels, ok, rows = [], [], []
    for f in files:
        try:
            pixels.append(decode_one(f, size)[0])
            ok.append(f)
        except DECODE_ERRORS as exc:
            log.warning("skipped %s: %s", f, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            rows.append({"path": str(f), "error": f"unreadable image ({type(exc).__name__})"})
    if pixels:
        use_tta = trained.config.train.tta if tta is None else tta
        probs = predict_proba(
            trained.model,
            np.stack(pixels),
            trained.preprocess,
            trained.device,
            tta=use_tta,
            amp=trained.config.train.amp,
            class_weights=trained.class_weights(prior_weight),
        )
        for f, p in zip(ok, probs, strict=True):
            rows.append(
                {"path": str(f), "class": trained.classes[int(p.argmax())], "confidence": float(p.max())}
                | {c: float(v) for c, v in zip(trained.classes, p, strict=True)}
            )
    order = {str(f): i for i, f in enumerate(files)}
    return sorted(rows, key=lambda r: order[r["path"]]), trained.classes
