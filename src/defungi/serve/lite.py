"""Inference with onnxruntime from an exported model: no torch import, the same decisions as the
run (the 8 flips/rotations averaged here where the run used test-time augmentation), and the same
refusals of non-micrographs (the graph's second output, on the image as it is)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from defungi.data.cache import dihedral_nhwc
from defungi.errors import DefungiError
from defungi.layout import RunLayout
from defungi.serve.predictor import Predictor, Scores
from defungi.utils import ort_session, run_fixed

METADATA_KEY = "defungi"  # the ONNX metadata entry holding Predictor.metadata() as JSON
BATCH = 32  # images per call of the session (its batch axis fixed there: utils.ort_session)


def _load_errors(ort: Any) -> tuple[type[Exception], ...]:
    """onnxruntime's refusals of a file that is not a loadable model (they derive from Exception alone)."""
    state = ort.capi.onnxruntime_pybind11_state
    return state.Fail, state.InvalidProtobuf, state.InvalidGraph, state.InvalidArgument, state.NoSuchFile


def onnx_predictor(path: Path, threads: int | None = None) -> Predictor:
    """A Predictor running PATH (written by 'defungi export') on onnxruntime's CPU provider."""
    import onnxruntime as ort

    if not path.is_file():
        run = path.parent if path == RunLayout(path.parent).onnx else path
        raise DefungiError(f"{path}: no exported model; write it with 'defungi export {run}'")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        session = ort_session(path, threads or cores, BATCH)
        meta = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    except (KeyError, ValueError, *_load_errors(ort)) as exc:
        raise DefungiError(f"{path}: not a model written by 'defungi export' ({type(exc).__name__})") from None
    refuses = len(session.get_outputs()) > 1  # exported with a detector: its score is the second output

    def scores(images: np.ndarray, tta: bool) -> Scores:
        if not len(images):
            return Scores(np.zeros((0, len(meta["classes"])), dtype=np.float32), np.zeros(0) if refuses else None)
        views = [run_fixed(session, dihedral_nhwc(images, k), BATCH) for k in range(8 if tta else 1)]
        probs = sum(out[0] for out in views) / len(views)
        return Scores(probs, views[0][1] if refuses else None)

    return Predictor.from_metadata(meta, scores, str(path))
