"""Export a run's model to ONNX, normalisation and softmax inside, with what predict needs in its
metadata, and (where the run has them) its refusal of non-micrographs as a second output computed in
the graph; checked against the PyTorch path of predict on the run's own images before it is written."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from defungi.data.cache import DECODE_ERRORS, decode_one
from defungi.errors import DefungiError
from defungi.layout import RunLayout, read_table
from defungi.serve.lite import METADATA_KEY, onnx_predictor
from defungi.serve.predictor import Scores, torch_predictor
from defungi.train.loop import Preprocess
from defungi.train.ood import OodHooks
from defungi.train.runtime import to_onnx
from defungi.utils import check_output

log = logging.getLogger(__name__)

OPSET = 17
# 13: the oldest checked here (ConvMixer, 6e-8 from PyTorch); 20: the TorchScript exporter's newest
OPSETS = range(13, 21)
TOLERANCE = 1e-4  # max difference allowed between onnxruntime and PyTorch (probabilities; ood scores relative)


class Exported(nn.Module):
    """uint8 NHWC images -> class probabilities (softmax of the model on normalised inputs), and with
    hooks, each image's out-of-distribution score (see train.ood)."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, hooks: OodHooks | None = None) -> None:
        super().__init__()
        self.model, self.preprocess, self.hooks = model, preprocess, hooks

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.hooks is None:
            return self.model(self.preprocess.normalized(images)).float().softmax(dim=1)
        with self.hooks:
            probs = self.model(self.preprocess.normalized(images)).float().softmax(dim=1)
        return probs, self.hooks.images()


def largest_difference(exported: Scores, reference: Scores) -> float:
    """How far the exported model's answers are from PyTorch's: probabilities absolutely, out-of-distribution
    scores relative to their size (distances over a threshold reach 10 and more on noise)."""
    diff = float(np.abs(exported.probabilities - reference.probabilities).max(initial=0.0))
    if (exported.ood is None) != (reference.ood is None):
        return float("inf")
    if reference.ood is not None:
        relative = np.abs(exported.ood - reference.ood) / np.maximum(np.abs(reference.ood), 1.0)
        diff = max(diff, float(relative.max(initial=0.0)))
    return diff


def check_images(run_dir: Path, size: int, n: int) -> tuple[np.ndarray, str]:
    """Up to n of the run's own images (test part first, from split.csv), decoded at size; random
    pixels where none can be read."""
    split = RunLayout(run_dir).split
    rows = sorted(read_table(split, ("path", "part")), key=lambda r: r["part"] != "test") if split.exists() else []
    images = []
    for row in rows:
        if len(images) == n:
            break
        try:
            images.append(decode_one(Path(row["path"]), size)[0])
        except (*DECODE_ERRORS, FileNotFoundError):
            continue
    if images:
        return np.stack(images), f"{len(images)} images of the run's split.csv"
    log.warning("%s: none of the run's images could be read; checking on random pixels", run_dir)
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8), f"{n} random images"


def _remove_stale(out: Path) -> None:
    """Temporary files of earlier exports to out whose process is gone (killed before its cleanup)."""
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        pid = stale.name[len(out.name) + 2 :].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether a process of that id exists (signal 0 checks without sending; another user's raises
    PermissionError, and is alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@dataclass(frozen=True)
class ExportResult:
    """What `defungi export` wrote, and how it was checked against PyTorch."""

    path: Path
    opset: int
    checked_on: str  # the images both answered (the run's own, or random pixels where none can be read)
    max_abs_diff: float  # the largest difference of a probability or refusal score between them


def export_onnx(
    run_dir: str | Path, out: str | Path | None = None, opset: int | None = None, n_check: int = 100
) -> ExportResult:
    """Write the run's model as ONNX (default RUN/model.onnx); the answers of onnxruntime and of
    predict's PyTorch path on n_check real images (probabilities, out-of-distribution scores) must agree
    within TOLERANCE, else nothing is written."""
    import onnx

    run_dir, opset = Path(run_dir), OPSET if opset is None else opset
    if opset not in OPSETS:
        raise DefungiError(f"--opset {opset}: use an ONNX opset from {OPSETS[0]} to {OPSETS[-1]} (default {OPSET})")
    out = Path(out) if out else RunLayout(run_dir).onnx
    check_output(out, "--out", "file")
    predictor = torch_predictor(run_dir, "cpu")
    trained = predictor.trained
    size = trained.preprocess.image_size
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)  # unique, renamed into place once onnxruntime agrees with PyTorch
    try:
        hooks = trained.ood_hooks()
        module = Exported(trained.model, trained.preprocess, hooks).eval()
        outputs = ["probabilities", "ood"] if hooks is not None else ["probabilities"]
        example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
        graph = onnx.load_from_string(to_onnx(module, example, outputs, opset))
        graph.metadata_props.add(key=METADATA_KEY, value=json.dumps(predictor.metadata()))
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
        images, source = check_images(run_dir, size, n_check)
        diff = largest_difference(onnx_predictor(tmp).scores(images, False), predictor.scores(images, False))
        if diff > TOLERANCE:
            raise DefungiError(f"{run_dir}: the exported model differs from PyTorch by {diff:.2g} (> {TOLERANCE})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, opset, source, diff)
