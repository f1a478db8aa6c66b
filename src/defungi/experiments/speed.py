"""How fast a trained run's model answers (a study reports it beside its scores)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from defungi.train.checkpoint import load_trained
from defungi.train.loop import predict_proba


def inference_images_per_s(run_dir: str | Path, n_images: int = 256, batch_size: int = 64) -> float:
    """Images/s of a run's model predicting (no test-time augmentation, in the precision predict uses)
    on synthetic inputs of its size."""
    trained = load_trained(run_dir)
    size = trained.preprocess.image_size
    images = np.random.default_rng(0).integers(0, 256, (n_images, size, size, 3), dtype=np.uint8)
    amp = trained.config.train.amp
    predict_proba(
        trained.model, images[:batch_size], trained.preprocess, trained.device, batch_size, amp=amp
    )  # warm-up
    start = time.perf_counter()
    predict_proba(trained.model, images, trained.preprocess, trained.device, batch_size, amp=amp)
    return n_images / (time.perf_counter() - start)
