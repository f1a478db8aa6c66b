"""How a specimen's decision is made from its images, compared out of fold under a run's grouped CV.

For a finished cross-validated run (its oof.csv: every usable image's out-of-fold probabilities and
specimen), each rule of `train.specimen_rule` (mean: today's; log_mean: the geometric mean; trimmed:
per class without each end's 20%) pools a specimen's images into one decision. Beside them, a learned
gated-attention pooling (multiple-instance learning, Ilse et al. 2018) over the images' frozen
backbone features: per fold, trained on the bags (specimens) of the fold's training part, stopped on
those of its validation part (both from RUN/fold-K/split.csv), and scored on the fold's test
specimens, so that every specimen is decided once, out of fold.

With several --seeds, one attention pooling per seed is reported, and their mean probability (a
seed ensemble) as one more row. Prints per rule the per-specimen accuracy and macro-F1 with 95%
intervals from the bootstrap over specimens that metrics.json uses, and the paired difference to
the mean rule with its interval (the paired bootstrap of `report --compare`), with timings and the
CPU's AVX-512/AMX flags.

The features are the run's own (`train.sources.frozen_features`: the cache its fits trained on);
--features FILE.npy gives a cached array instead (e.g. when the image files' times changed since the
run, which changes the cache key). Either way the fold heads must reproduce the run's out-of-fold
predictions from them, and the agreement is printed.

    python benchmarks/specimen_rules.py runs/transfer-cv [--features FILE.npy] [--seeds 0 1 2] [--out rules.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from sklearn.preprocessing import StandardScaler

from defungi.experiments.compare import Scored, scored_images
from defungi.experiments.protocols import dataset_for
from defungi.layout import RunLayout
from defungi.stats.metrics import (
    SPECIMEN_RULES,
    bootstrap_difference,
    bootstrap_intervals,
    classification_metrics,
    specimen_decisions,
    weighted,
)
from defungi.train.checkpoint import load_trained, read_config
from defungi.train.sources import frozen_features
from defungi.utils import cpu_flags

ATTENTION = "attention MIL"


class GatedAttention(nn.Module):
    """Gated-attention MIL pooling (Ilse et al. 2018): a bag's images embedded, weighted by
    softmax(w . (tanh(V h) * sigmoid(U h))) over the bag, summed, and classified."""

    def __init__(self, in_features: int, classes: int, hidden: int = 128, attention: int = 64, dropout: float = 0.25):
        super().__init__()
        self.embed = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU())
        self.v = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh())
        self.u = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid())
        self.w = nn.Linear(attention, 1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (bags x classes) of padded bags x (bags x images x features); mask: the real images."""
        h = self.embed(x)
        scores = self.w(self.v(h) * self.u(h)).squeeze(-1).masked_fill(~mask, float("-inf"))
        return self.classifier((torch.softmax(scores, 1).unsqueeze(-1) * h).sum(1))


def padded(bags: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of different sizes as one zero-padded tensor and the mask of their real rows."""
    n = max(len(b) for b in bags)
    x = torch.zeros(len(bags), n, bags[0].shape[1])
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    for k, b in enumerate(bags):
        x[k, : len(b)], mask[k, : len(b)] = torch.from_numpy(b), True
    return x, mask


def fit_attention(
    train: tuple[list[np.ndarray], np.ndarray],
    val: tuple[list[np.ndarray], np.ndarray],
    classes: int,
    seed: int,
    epochs: int = 200,
    patience_epochs: int = 30,
) -> GatedAttention:
    """Train on (bags, labels) with class-balanced loss, each epoch's bags a random 50-100% of their
    images; keep the epoch of least validation loss."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = GatedAttention(train[0][0].shape[1], classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    counts = np.bincount(train[1], minlength=classes)
    loss_fn = nn.CrossEntropyLoss(
        weight=torch.tensor(len(train[1]) / (classes * np.maximum(counts, 1)), dtype=torch.float32)
    )
    y, val_x, val_y = torch.from_numpy(train[1]), padded(val[0]), torch.from_numpy(val[1])
    best, best_state, since = float("inf"), None, 0
    for _ in range(epochs):
        model.train()
        for batch in np.array_split(rng.permutation(len(y)), max(1, len(y) // 16)):
            kept = [
                b[rng.random(len(b)) < rng.uniform(0.5, 1.0)] if len(b) > 2 else b for b in (train[0][i] for i in batch)
            ]
            kept = [k if len(k) else train[0][i] for k, i in zip(kept, batch, strict=True)]
            loss = loss_fn(model(*padded(kept)), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(nn.functional.cross_entropy(model(*val_x), val_y))
        if val_loss < best:
            best, best_state, since = val_loss, {k: v.clone() for k, v in model.state_dict().items()}, 0
        elif (since := since + 1) >= patience_epochs:
            break
    model.load_state_dict(best_state)
    return model.eval()


def bags_of(
    rows: list[dict[str, str]], part: str, features: np.ndarray, index: dict[str, int], classes: list[str]
) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """(specimens, their images' features, their labels) of one part of a fold's split.csv."""
    members: dict[str, list[int]] = {}
    label: dict[str, str] = {}
    for r in rows:
        if r["part"] == part:
            members.setdefault(r["group"], []).append(index[r["path"]])
            label[r["group"]] = r["label"]
    names = sorted(members)
    return names, [features[members[g]] for g in names], np.array([classes.index(label[g]) for g in names])


def attention_decisions(
    run: Path, features: np.ndarray, paths: list[str], classes: list[str], seed: int
) -> dict[str, np.ndarray]:
    """Each specimen's class probabilities from the attention pooling of the fold that held it out."""
    index = {p: i for i, p in enumerate(paths)}
    decided: dict[str, np.ndarray] = {}
    for fold in sorted(run.glob("fold-*")):
        rows = list(csv.DictReader(open(RunLayout(fold).split)))
        train_idx = [index[r["path"]] for r in rows if r["part"] == "train"]
        scaled = StandardScaler().fit(features[train_idx]).transform(features).astype(np.float32)
        parts = {p: bags_of(rows, p, scaled, index, classes) for p in ("train", "val", "test")}
        t0 = time.perf_counter()
        model = fit_attention(parts["train"][1:], parts["val"][1:], len(classes), seed)
        with torch.no_grad():
            probs = torch.softmax(model(*padded(parts["test"][1])), 1).numpy()
        decided |= dict(zip(parts["test"][0], probs, strict=True))
        print(
            f"  {fold.name}: {len(parts['train'][0])} training, {len(parts['val'][0])} validation, "
            f"{len(parts['test'][0])} test specimens; trained in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    return decided


def check_features(run: Path, features: np.ndarray, paths: list[str], images: Scored) -> float:
    """The share of out-of-fold images whose class the fold heads give from these features as the run did."""
    index = {p: i for i, p in enumerate(paths)}
    agree = []
    for fold in sorted(run.glob("fold-*")):
        trained = load_trained(fold, "cpu")
        head = trained.model.combine  # the fold's head on the shared frozen trunk (models.ensemble.SharedTrunk)
        test = [r["path"] for r in csv.DictReader(open(RunLayout(fold).split)) if r["part"] == "test"]
        with torch.no_grad():
            probs = torch.softmax(head(torch.from_numpy(np.asarray(features[[index[p] for p in test]], np.float32))), 1)
        ran = weighted(probs.numpy(), trained.class_weights()).argmax(1)
        where = {p: i for i, p in enumerate(images.paths)}
        agree.append(ran == images.probs[[where[p] for p in test]].argmax(1))
    return float(np.concatenate(agree).mean())


def run_features(run: Path, given: Path | None) -> tuple[np.ndarray, list[str]]:
    """The run's cached head features and their image paths (as the run's data loader orders them)."""
    config = read_config(RunLayout(run).config)
    dataset = dataset_for(config, progress=False)
    features = np.load(given, mmap_mode="r") if given else frozen_features(config, dataset)
    if len(features) != len(dataset.paths):
        raise SystemExit(f"{given}: {len(features)} rows, but the run's data has {len(dataset.paths)} images")
    return np.asarray(features, dtype=np.float32), [str(p) for p in dataset.paths]


def summary(labels: np.ndarray, predictions: np.ndarray, ids: np.ndarray, baseline: np.ndarray, n: int) -> dict:
    """Accuracy and macro-F1 with intervals over specimens, and the paired difference to baseline."""
    point = classification_metrics(labels, predictions, [str(c) for c in range(n)])
    intervals = bootstrap_intervals(labels, predictions, ids, n)
    paired = bootstrap_difference(labels, baseline, predictions, ids, n)
    return {m: {"value": point[m], "interval": intervals[m], "vs_mean": paired[m]} for m in ("accuracy", "f1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished --cv run of a frozen-backbone (transfer) profile")
    parser.add_argument("--features", type=Path, help="a cached feature array (.npy) instead of the run's own")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one attention MIL per seed, each reported")
    parser.add_argument("--out", type=Path, help="write the table as JSON")
    args = parser.parse_args()
    t0 = time.perf_counter()
    images = scored_images(args.run)
    n = len(images.classes)
    print(
        f"{args.run}: {len(images.paths)} out-of-fold images, {torch.get_num_threads()} threads, "
        f"CPU flags: {cpu_flags() or 'none (AVX2 only)'}"
    )
    decided = {rule: specimen_decisions(images.probs, images.labels, images.specimens, rule) for rule in SPECIMEN_RULES}
    ids, labels, _ = decided["mean"]
    predictions = {rule: d[2].argmax(1) for rule, d in decided.items()}
    print(f"{len(ids)} specimens; the three fixed rules in {time.perf_counter() - t0:.1f} s")
    t1 = time.perf_counter()
    features, paths = run_features(args.run, args.features)
    print(
        f"features {features.shape} in {time.perf_counter() - t1:.0f} s; the fold heads give the run's "
        f"out-of-fold class from them for {check_features(args.run, features, paths, images):.2%} of images"
    )
    averaged = np.zeros((len(ids), n))
    for seed in args.seeds:
        t2 = time.perf_counter()
        decided_by = attention_decisions(args.run, features, paths, images.classes, seed)
        attention = np.stack([decided_by[s] for s in ids])
        predictions[f"{ATTENTION} s{seed}"] = attention.argmax(1)
        averaged += attention / len(args.seeds)
        print(f"attention MIL (seed {seed}), all folds: {time.perf_counter() - t2:.0f} s")
    if len(args.seeds) > 1:  # the seeds' mean probability: a seed ensemble, one more recipe
        predictions[f"{ATTENTION} avg"] = averaged.argmax(1)
    table = {rule: summary(labels, p, ids, predictions["mean"], n) for rule, p in predictions.items()}
    print(
        f"\n{'rule':18s} {'specimen accuracy':>24s} {'specimen macro-F1':>24s} {'acc - mean':>24s} {'F1 - mean':>24s}"
    )
    for rule, row in table.items():
        cells = [
            f"{row[m]['value']:.3f} [{row[m]['interval'][0]:.3f}, {row[m]['interval'][1]:.3f}]"
            for m in ("accuracy", "f1")
        ]
        cells += [
            f"{row[m]['vs_mean']['difference']:+.3f} [{row[m]['vs_mean']['interval'][0]:+.3f}, "
            f"{row[m]['vs_mean']['interval'][1]:+.3f}]"
            for m in ("accuracy", "f1")
        ]
        print(f"{rule:18s} " + " ".join(f"{c:>24s}" for c in cells))
    if args.out:
        args.out.write_text(json.dumps({"run": str(args.run), "specimens": len(ids), "rules": table}, indent=1))


if __name__ == "__main__":
    main()
