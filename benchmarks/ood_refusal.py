"""How often a trained run refuses what is not a DeFungi micrograph, and how often real ones.

One table, a row per kind of image. Real held-out micrographs: a cross-validation's out-of-fold images,
each scored by the detector of the fold that never saw its specimen (RUN/oof.csv), or a single fit's
test part. Then what is not a fungus micrograph, answered through `defungi predict`'s path with the
run's model: uniform noise, flat fields, gradients, natural photographs (scikit-image's `data`
module, each whole and as random crops), rendered text, and micrographs of other things (stained
tissue, cells). A refusal is 'no fungus visible' (the variance filter) or 'not a fungus micrograph'
(the detector). With --onnx the exported model answers the same images and must refuse the same ones.

With --compare, each fold's model alone (without the variance filter) on a sample of its validation
and test images and on the same pictures, the scores one could refuse by, each thresholded at the
0.99 quantile of its fold's validation images: the shipped score (the largest of the scaled
Mahalanobis distances), each of its readings alone, and the energy (-logsumexp of the logits).

    PYTHONPATH=src python benchmarks/ood_refusal.py RUN [--noise 200 --flat 50 --gradient 50 --text 50 --crops 3]
        [--onnx] [--compare --sample 400]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.nonmicrographs

from defungi.data.cache import decode_one  # noqa: E402
from defungi.layout import RunLayout, read_table  # noqa: E402
from defungi.results.run import read_run_metrics  # noqa: E402
from defungi.serve.export import export_onnx  # noqa: E402
from defungi.serve.predict import NO_FUNGUS, NOT_MICROGRAPH, open_predictor, predict  # noqa: E402
from defungi.stats.refusal import refusal_threshold  # noqa: E402
from defungi.train.checkpoint import load_trained, model_parts, read_config  # noqa: E402
from defungi.train.loop import image_inputs  # noqa: E402
from defungi.train.ood import OodDetector, OodHooks  # noqa: E402
from defungi.utils import cpu_flags  # noqa: E402
from tests.nonmicrographs import GENERATED, OTHER_MICROGRAPHS, PHOTOGRAPHS, pictures, write_images  # noqa: E402

LABELS = {
    "noise": "uniform noise",
    "flat": "flat fields",
    "gradient": "gradients",
    "photograph": "photographs (scikit-image)",
    "text": "rendered text",
    "other": "other micrographs (scikit-image)",
}


def write_sets(root: Path, size: int, counts: dict[str, int], crops: int, seed: int) -> dict[str, Path]:
    """A folder of PNG files per kind of non-micrograph."""
    rng = np.random.default_rng(seed)
    folders = {
        kind: write_images(root / kind, [GENERATED[kind](rng, size) for _ in range(n)], kind)
        for kind, n in counts.items()
    }
    folders["photograph"] = write_images(root / "photograph", pictures(PHOTOGRAPHS, size, crops, rng), "photograph")
    folders["other"] = write_images(root / "other", pictures(OTHER_MICROGRAPHS, size, crops, rng), "other")
    return {kind: folders[kind] for kind in LABELS}


def real_row(run: Path) -> str:
    """The real held-out micrographs refused (from the run's metrics.json and its per-image scores)."""
    metrics = read_run_metrics(RunLayout(run).metrics)
    if metrics.ood is None:
        return "real micrographs: the run has no refusal detector (trained before it, or too small a validation part)"
    check = metrics.ood
    table = RunLayout(run).oof if metrics.kind == "cv" else RunLayout(run).predictions("test")
    scores = np.array([float(r["ood"]) for r in read_table(table)])
    label = f"real micrographs, {check.source}"
    interval = f"[{check.interval[0]:.1%}, {check.interval[1]:.1%}]"
    return (f"{label:<34} {check.n:>6}  {check.refused:>7.1%} {interval:<15} {'-':>8}  {int(np.sum(scores > 1)):>10}"
            f"  {np.median(scores):>6.2f}")  # fmt: skip


def answered(run: Path, folders: dict[str, Path], backend: str) -> dict[str, list[dict]]:
    """predict's rows for every folder, with the run's model on backend."""
    model = open_predictor(run, backend)
    return {kind: predict(model, [folder]) for kind, folder in folders.items()}


def table(run: Path, rows: dict[str, list[dict]]) -> list[str]:
    """The table's lines: real micrographs first, then each kind of non-micrograph."""
    head = f"{'kind':<34} {'images':>6}  {'refused':>7} {'':<15} {'no fungus':>8}  {'not micro.':>10}  {'median':>6}"
    lines = [head, real_row(run)]
    for kind, answers in rows.items():
        blank = sum(r.status == NO_FUNGUS for r in answers)
        refused = sum(r.status == NOT_MICROGRAPH for r in answers)
        scores = [r.ood for r in answers if r.ood is not None]
        median = f"{np.median(scores):6.2f}" if scores else f"{'-':>6}"
        share = (blank + refused) / len(answers)
        lines.append(
            f"{LABELS[kind]:<34} {len(answers):>6}  {share:>7.1%} {'':<15} {blank:>8}  {refused:>10}  {median}"
        )
    return lines


def backends_line(run: Path, folders: dict[str, Path], rows: dict[str, list[dict]], tmp: Path) -> str:
    """Whether the exported model refuses the same images as the torch path, and how close their scores are."""
    exported = export_onnx(run, tmp / "model.onnx", n_check=16)
    lite = answered(exported.path, folders, "onnx")
    same = all([r.status for r in rows[k]] == [r.status for r in lite[k]] for k in rows)
    pairs = [(a.ood, b.ood) for k in rows for a, b in zip(rows[k], lite[k], strict=True) if a.ood is not None]
    diff = max(abs(a - b) / max(1.0, a) for a, b in pairs)
    return f"onnx: {'the same' if same else 'OTHER'} refusals as torch; largest relative score difference {diff:.1e}"


def scores_of(part: RunLayout, images: np.ndarray) -> dict[str, np.ndarray]:
    """One fit's model alone on images: the shipped score, each reading's scaled distance, the energy."""
    trained = load_trained(part.root, "cpu")
    (detector,) = trained.detectors
    alone = {f"{d.reading.kind} of {d.reading.module}": OodDetector((d,), 1.0, 0.99, 0) for d in detector.distances}
    hooks = {"shipped: the largest of those": OodHooks(trained.model, [detector])}
    hooks |= {name: OodHooks(trained.model, [d]) for name, d in alone.items()}
    logits = []
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for h in hooks.values():
            stack.enter_context(h)
        for x in image_inputs(images, trained.preprocess, trained.device, 64):
            logits.append(trained.model(x).float())
    out = {name: h.images().numpy() for name, h in hooks.items()}
    return out | {"energy: -logsumexp(logits)": -torch.logsumexp(torch.cat(logits), 1).numpy()}


def compare(run: Path, folders: dict[str, Path], sample: int, seed: int) -> list[str]:
    """Each fit's model alone: every score's refusals at its own validation quantile, averaged over fits."""
    rng = np.random.default_rng(seed)
    shares: dict[str, dict[str, list[float]]] = {}
    for part in model_parts(read_config(RunLayout(run).config), RunLayout(run)):
        size = load_trained(part.root, "cpu").preprocess.image_size
        split = read_table(part.split)
        chosen = {p: rng.permutation([r["path"] for r in split if r["part"] == p])[:sample] for p in ("val", "test")}
        images = {p: np.stack([decode_one(Path(f), size)[0] for f in fs]) for p, fs in chosen.items()}
        images |= {
            k: np.stack([decode_one(f, size)[0] for f in sorted(folder.iterdir())]) for k, folder in folders.items()
        }
        scored = {k: scores_of(part, x) for k, x in images.items()}
        for score in scored["val"]:
            threshold = refusal_threshold(scored["val"][score], 0.99)
            for kind in ["test", *folders]:
                shares.setdefault(score, {}).setdefault(kind, []).append(
                    float(np.mean(scored[kind][score] > threshold))
                )
    kinds = ["test", *folders]
    lines = [f"{'score (threshold: 0.99 of validation)':<40}" + "".join(f"{k[:10]:>11}" for k in kinds)]
    lines += [f"{s:<40}" + "".join(f"{np.mean(v[k]):>11.1%}" for k in kinds) for s, v in shares.items()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    for kind, n in (("noise", 200), ("flat", 50), ("gradient", 50), ("text", 50)):
        parser.add_argument(f"--{kind}", type=int, default=n, help=f"{LABELS[kind]} (default {n})")
    parser.add_argument("--crops", type=int, default=3, help="random crops per scikit-image picture, beside the whole")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--onnx", action="store_true", help="answer with the exported model too (same refusals?)")
    parser.add_argument("--compare", action="store_true", help="every score of each fit's model alone")
    parser.add_argument("--sample", type=int, default=400, help="--compare: validation and test images per fit")
    args = parser.parse_args()
    size = load_trained(args.run, "cpu").preprocess.image_size
    with tempfile.TemporaryDirectory() as tmp:
        counts = {"noise": args.noise, "flat": args.flat, "gradient": args.gradient, "text": args.text}
        folders = write_sets(Path(tmp), size, counts, args.crops, args.seed)
        rows = answered(args.run, folders, "torch")
        print(f"{args.run}: refusals at {size} px; CPU: {cpu_flags()}")
        print("\n".join(table(args.run, rows)))
        if args.onnx:
            print(backends_line(args.run, folders, rows, Path(tmp)))
        if args.compare:
            print("\n".join(compare(args.run, folders, args.sample, args.seed)))


if __name__ == "__main__":
    main()
