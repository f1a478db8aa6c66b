"""Where a cross-validated run's explanations point: the share of each map's mass in the border ring
(the outer 15% of the image on every edge), over out-of-fold images.

Draws N images of the run's oof.csv, equally many per class (seeded), and explains each with the
fold model that did not train on it (RUN/fold-K), for the class it predicted (or the true class).
Per map (the registry's 'coarse' and 'fine' ones, or METHOD:MODULE, e.g. LayerCAM:blocks.4, or the
product of two, e.g. fine*HiResCAM:bn2)
and per class it prints the mean border share with a 95% interval from a bootstrap over specimens,
the share of images whose hottest pixel lies in the ring, and a deletion check of faithfulness:
how much the explained class's probability drops when the map's hottest 20% of pixels are blurred,
minus the drop when its coolest 20% are (~0 for a map unrelated to what the model uses; every
map's gap minus the first map's, paired on the same images, says which map finds it best). The
ring's share of the area (0.51) is what a map spread evenly would give.

    python benchmarks/gradcam_border.py runs/transfer-cv --data ../shared/defungi [--n 300]
        [--maps coarse fine] [--target predicted] [--out shares.csv] [--against other-shares.csv]

--out writes every image's shares; --against prints this run's mean share minus that file's, on the
images both explained (the same draw from two runs of the same data and folds), with its interval.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from defungi.data.cache import decode_one
from defungi.layout import RunLayout, read_table
from defungi.serve.explain import BORDER, border_ring, border_share, cam_maps, map_source
from defungi.train.checkpoint import TrainedModel, load_trained
from defungi.utils import cpu_flags

DELETED = 0.2  # the share of pixels the faithfulness check blurs
BATCH = 16


def draw(rows: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    """n rows, equally many per class where a class has enough, drawn without replacement (seeded)."""
    rng = np.random.default_rng(seed)
    classes = sorted({r["class"] for r in rows})
    picked = []
    for c in classes:
        members = [r for r in rows if r["class"] == c]
        picked += [members[i] for i in sorted(rng.choice(len(members), min(n // len(classes), len(members)), False))]
    return picked


def located(rows: list[dict[str, str]], data: Path) -> list[Path]:
    """Each row's image under data (by file name), where the run was trained on another copy."""
    index = {p.name: p for p in data.rglob("*") if p.is_file()}
    missing = [r["path"] for r in rows if Path(r["path"]).name not in index]
    if missing:
        raise SystemExit(f"{len(missing)} images of the run are not under {data}, e.g. {missing[0]}")
    return [index[Path(r["path"]).name] for r in rows]


def probabilities(trained: TrainedModel, images: np.ndarray) -> np.ndarray:
    """The model's class probabilities (fp32 softmax) of uint8 NHWC images."""
    with torch.no_grad():
        x = trained.preprocess.to_tensor(images, trained.device, channels_last=False)
        return trained.model(x).float().softmax(1).cpu().numpy()


def deletion_gap(trained: TrainedModel, images: np.ndarray, maps: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per image: the drop of the target's probability when the map's hottest DELETED share of pixels
    is blurred, minus the drop when its coolest share is (positive: the map finds what the model uses)."""
    blurred = np.stack([gaussian_filter(im.astype(np.float32), sigma=(8, 8, 0)) for im in images])
    flat = maps.reshape(len(maps), -1)
    jitter = np.random.default_rng(0).random(flat.shape) * 1e-6  # ties (flat maps) broken at random
    ranks = (flat + jitter).argsort(1).argsort(1).reshape(maps.shape) / flat.shape[1]
    rows = np.arange(len(images))
    base = probabilities(trained, images)[rows, targets]
    drops = []
    for keep in (ranks < 1 - DELETED, ranks >= DELETED):  # hottest blurred, then coolest blurred
        mixed = np.where(keep[..., None], images, blurred).round().astype(np.uint8)
        drops.append(base - probabilities(trained, mixed)[rows, targets])
    return drops[0] - drops[1]


def map_specs(text: str, model_name: str) -> list[tuple[str, str]]:
    """(method, module) of each map of a spec: 'coarse', 'fine' or METHOD:MODULE; A*B: the product of
    A's and B's maps (e.g. the fine map gated by where the head's pooling reads, fine*HiResCAM:bn2)."""
    return [tuple(s.split(":", 1)) if ":" in s else map_source(model_name, s) for s in text.split("*")]


def product_maps(
    trained: TrainedModel, images: np.ndarray, targets: list[int], spec: list[tuple[str, str]]
) -> np.ndarray:
    """The maps of a spec, multiplied together and scaled back to a peak of 1."""
    maps = np.prod([cam_maps(trained, images, targets, method, module) for method, module in spec], axis=0)
    peak = maps.reshape(len(maps), -1).max(1)[:, None, None]
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def explain_fold(
    trained: TrainedModel, paths: list[Path], targets: np.ndarray, specs: list[list[tuple[str, str]]]
) -> dict[str, np.ndarray]:
    """Per map spec, the border share, hottest pixel in the ring, and deletion gap of every image."""
    ring = border_ring(trained.preprocess.image_size, BORDER).ravel()
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(paths), BATCH):
        images = np.stack([decode_one(p, trained.preprocess.image_size)[0] for p in paths[start : start + BATCH]])
        batch_targets = targets[start : start + BATCH]
        for spec in specs:
            maps = product_maps(trained, images, batch_targets.tolist(), spec)
            name = "*".join(":".join(part) for part in spec)
            share = border_share(maps, BORDER)  # NaN: an empty map (no positive evidence anywhere)
            peak = ring[maps.reshape(len(maps), -1).argmax(1)]
            out.setdefault(f"{name} share", []).append(share)
            out.setdefault(f"{name} peak", []).append(np.where(np.isnan(share), np.nan, peak))
            out.setdefault(f"{name} gap", []).append(deletion_gap(trained, images, maps, batch_targets))
    return {k: np.concatenate(v) for k, v in out.items()}


def interval(values: np.ndarray, specimens: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean from a bootstrap that draws specimens, each with its images."""
    ids, inverse = np.unique(specimens, return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(ids), (n_boot, len(ids)))
    weights = np.stack([np.bincount(d, minlength=len(ids)) for d in draws])[:, inverse]
    means = (weights * values).sum(1) / weights.sum(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def mean_cell(values: np.ndarray, specimens: np.ndarray) -> str:
    """'mean [low, high]' of values, or '-' when there are none."""
    if not len(values):
        return "-"
    low, high = interval(values, specimens)
    return f"{values.mean():.3f} [{low:.3f}, {high:.3f}]"


def table(rows: list[dict[str, str]], results: dict[str, np.ndarray], specs: list[str], area: float) -> None:
    """Per map and class: n, mean border share [interval], share of peaks in the ring, deletion gap."""
    classes = np.array([r["class"] for r in rows])
    specimens = np.array([r["sample"] for r in rows])
    head = f"{'map':<30} {'class':<6} {'n':>4} {'empty':>5}  {'border share [95%]':<22} {'peak in ring':>12}"
    print(f"\n{head}  {'deletion gap [95%]'}")
    for spec in specs:
        for c in [*sorted(set(classes)), "all"]:
            pick = classes == c if c != "all" else np.ones(len(rows), bool)
            share = results[f"{spec} share"][pick]
            ok = ~np.isnan(share)
            peak = np.nanmean(results[f"{spec} peak"][pick]) if ok.any() else np.nan
            cells = [
                mean_cell(share[ok], specimens[pick][ok]),
                mean_cell(results[f"{spec} gap"][pick], specimens[pick]),
            ]
            print(f"{spec:<30} {c:<6} {pick.sum():>4} {(~ok).sum():>5}  {cells[0]:<22} {peak:>12.3f}  {cells[1]}")
    print(f"(a map spread evenly: border share and peak in ring {area:.3f})")
    for spec in specs[1:]:  # paired on the same images: which map finds what the model uses
        gap = results[f"{spec} gap"] - results[f"{specs[0]} gap"]
        print(f"deletion gap, {spec} minus {specs[0]}: {mean_cell(gap, specimens)}")


def compare(rows: list[dict[str, str]], results: dict[str, np.ndarray], specs: list[str], other: Path) -> None:
    """This run's mean border share minus the other file's, per map, on the images both explained."""
    theirs = {r["path"]: r for r in read_table(other)}
    both = [i for i, r in enumerate(rows) if r["path"] in theirs]
    specimens = np.array([rows[i]["sample"] for i in both])
    print(f"\nthis run minus {other} ({len(both)} images in both), mean border share [95% over specimens]:")
    for spec in specs:
        key = f"{spec} share"
        if key not in next(iter(theirs.values())):
            continue
        diff = results[key][both] - np.array([float(theirs[rows[i]["path"]][key]) for i in both])
        ok = ~np.isnan(diff)
        low, high = interval(diff[ok], specimens[ok])
        print(f"  {spec:<30} {diff[ok].mean():+.3f} [{low:+.3f}, {high:+.3f}]")


def write(path: Path, rows: list[dict[str, str]], targets: list[str], results: dict[str, np.ndarray]) -> None:
    """Every image's row of oof.csv (path, sample, class, fold), the class explained and its values."""
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "sample", "class", "fold", "explained", *results])
        for i, r in enumerate(rows):
            out.writerow([r["path"], r["sample"], r["class"], r["fold"], targets[i], *(v[i] for v in results.values())])


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> None:
    """Draw, explain fold by fold, print (and write, compare)."""
    layout = RunLayout(Path(args.run))
    rows = draw(read_table(layout.oof), args.n, args.seed)
    paths = located(rows, Path(args.data))
    targets = [r["prediction"] if args.target == "predicted" else r["class"] for r in rows]
    folds = sorted({int(r["fold"]) for r in rows})
    model_name = load_trained(layout.fold(folds[0]).root, "cpu").info["model_name"]
    specs = [map_specs(s, model_name) for s in args.maps]
    names = ["*".join(":".join(part) for part in spec) for spec in specs]
    results: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for fold in folds:
        trained = load_trained(layout.fold(fold).root, "cpu")
        pick = [i for i, r in enumerate(rows) if int(r["fold"]) == fold]
        idx = np.array([trained.classes.index(targets[i]) for i in pick])
        say(f"fold {fold}: {len(pick)} images, maps {', '.join(names)}")
        for key, values in explain_fold(trained, [paths[i] for i in pick], idx, specs).items():
            results.setdefault(key, np.full(len(rows), np.nan))[pick] = values
    seconds = time.perf_counter() - started
    say(f"{len(rows)} images of {args.run}, explaining the {args.target} class, in {seconds:.0f} s")
    size = trained.preprocess.image_size
    table(rows, results, names, float(border_ring(size, BORDER).mean()))
    if args.out:
        write(Path(args.out), rows, targets, results)
    if args.against:
        compare(rows, results, names, Path(args.against))
    say(f"CPU: {cpu_flags()}, {torch.get_num_threads()} threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished cross-validation run folder (oof.csv, fold-K/)")
    parser.add_argument("--data", required=True, help="the folder of the run's images")
    parser.add_argument("--n", type=int, default=300, help="images, equally many per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--maps", nargs="+", default=["coarse", "fine"], help="coarse, fine or METHOD:MODULE; A*B multiplies two maps"
    )
    parser.add_argument("--target", choices=("predicted", "true"), default="predicted")
    parser.add_argument("--out", help="CSV of every image's values")
    parser.add_argument("--against", help="a CSV written by --out for another run: the paired difference")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
