"""Which feature maps of a frozen ImageNet backbone carry DeFungi's classes, side by side in one run.

Each stage of the backbone's output, pooled over space (mean, or mean and max), feeds a logistic
regression (standardised features, balanced class weights) trained on each fold's training images
of a finished cross-validation run and scored on that fold's test images, so every image is
scored once, out of fold, on the run's own folds. Prints macro-F1 per image and per specimen (the
mean probability of its images) with 95% intervals from the bootstrap over specimens that
`metrics.json` uses, and the CPU's AVX-512 flags beside the time of the forward pass.

    python benchmarks/transfer_stages.py runs/transfer/lite0-head-grouped [--model efficientnet-lite0]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from defungi.data.cache import open_image, square
from defungi.models import create_model, model_entry
from defungi.models.pretrained import imagenet_state_dict, load_backbone
from defungi.stats.metrics import score_metrics
from defungi.train.loop import Preprocess
from defungi.utils import cpu_flags


def stage_features(
    model: torch.nn.Module, stages: list[str], paths: list[str], size: int, mean: tuple, std: tuple
) -> dict[str, np.ndarray]:
    """Mean- and max-pooled output of each named module for every image, (N, 2C) each."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in stages}
    for name in stages:
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, o, name=name: out[name].append(torch.cat([o.mean((2, 3)), o.amax((2, 3))], 1).numpy())
        )
    preprocess = Preprocess(size, mean, std, "pretrained")
    with torch.no_grad():
        for start in range(0, len(paths), 64):
            pixels = np.stack([np.asarray(square(open_image(Path(p), size), size)) for p in paths[start : start + 64]])
            model(preprocess.to_tensor(pixels, torch.device("cpu")))
    return {name: np.concatenate(chunks) for name, chunks in out.items()}


def out_of_fold(x: np.ndarray, labels: np.ndarray, folds: np.ndarray, c: float) -> np.ndarray:
    """Probabilities of every image from a logistic regression fitted without its fold."""
    probs = np.zeros((len(labels), labels.max() + 1))
    for fold in np.unique(folds):
        test = folds == fold
        scaler = StandardScaler().fit(x[~test])
        model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
        model.fit(scaler.transform(x[~test]), labels[~test])
        probs[test] = model.predict_proba(scaler.transform(x[test]))
    return probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished --cv run (its split.csv gives images and folds)")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--stages", default="blocks.3,blocks.4,blocks.5,blocks.6,bn2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--c", type=float, default=0.003, help="inverse L2 strength of the regression")
    args = parser.parse_args()
    rows = [r for r in csv.DictReader(open(args.run / "split.csv")) if r["part"].startswith("fold-")]
    classes = sorted({r["label"] for r in rows})
    labels = np.array([classes.index(r["label"]) for r in rows])
    folds, specimens = np.array([r["part"] for r in rows]), np.array([r["group"] for r in rows])
    model = create_model(args.model, num_classes=len(classes))
    load_backbone(model, args.model, imagenet_state_dict(args.model), f"the ImageNet weights of {args.model}")
    model.eval().to(memory_format=torch.channels_last)
    stages = args.stages.split(",")
    t0 = time.perf_counter()
    mean, std = model_entry(args.model).normalization
    feats = stage_features(model, stages, [r["path"] for r in rows], args.image_size, mean, std)
    print(
        f"{len(rows)} images, {len(set(specimens))} specimens, {len(set(folds))} folds; forward pass "
        f"{time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads, CPU flags: {cpu_flags() or 'no AVX-512'}"
    )
    half = {name: f.shape[1] // 2 for name, f in feats.items()}
    variants = {f"{name} mean": f[:, : half[name]] for name, f in feats.items()}
    variants[f"{stages[-1]} mean+max"] = feats[stages[-1]]
    variants["all stages, mean"] = np.concatenate([f[:, : half[name]] for name, f in feats.items()], 1)
    print(f"{'features':28s} {'dim':>5s}  macro-F1 per image     macro-F1 per specimen")
    for name, x in variants.items():
        m = score_metrics(out_of_fold(x, labels, folds, args.c), labels, specimens, classes)
        img, smp = m["intervals"]["f1"], m["samples"]["intervals"]["f1"]
        print(
            f"{name:28s} {x.shape[1]:5d}  {m['f1']:.3f} [{img[0]:.3f}, {img[1]:.3f}]  "
            f"{m['samples']['f1']:.3f} [{smp[0]:.3f}, {smp[1]:.3f}]",
            flush=True,
        )


if __name__ == "__main__":
    main()
