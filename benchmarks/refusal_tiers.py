"""Refusals a lab can live with: what the refusal score does to real micrographs and to what is not one,
before (everything over 1 refused) and after (over 1 answered and flagged, refused over stats.refusal.REFUSE).

Three parts, from one finished cross-validation (RUN/oof.csv: each image scored by the fold model that
never saw its specimen):
- real held-out micrographs: images and specimens refused (a specimen counts when any of its images
  is: refusals cluster by specimen), images flagged, and the accuracy of the flagged ones;
- real micrographs shifted as another lab's stain or microscope would (yellower, bluer, paler, darker,
  blurred), answered by the run's model (every fold model averaged: 2 of 3 trained on these images);
- what is not a fungus micrograph (tests/nonmicrographs.py): noise, gradients, text, photographs and
  micrographs of other things.

    python benchmarks/refusal_tiers.py RUN [--shifted 150] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.nonmicrographs

from defungi.layout import RunLayout, read_table  # noqa: E402
from defungi.results.answers import ImageAnswer  # noqa: E402
from defungi.serve.predict import open_predictor, predict  # noqa: E402
from defungi.stats.refusal import REFUSE, refusal_tiers  # noqa: E402
from tests.nonmicrographs import GENERATED, OTHER_MICROGRAPHS, PHOTOGRAPHS, pictures, write_images  # noqa: E402


def tinted(rgb: tuple[float, float, float]) -> Callable[[Image.Image], Image.Image]:
    """An image with each channel scaled (a stain or lamp of another colour)."""

    def shift(image: Image.Image) -> Image.Image:
        pixels = np.asarray(image, dtype=np.float32) * np.array(rgb, dtype=np.float32)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    return shift


SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "as they are": lambda image: image,
    "yellower": tinted((1.1, 1.05, 0.75)),
    "bluer": tinted((0.85, 0.95, 1.15)),
    "paler (contrast 0.5)": lambda image: ImageEnhance.Contrast(image).enhance(0.5),
    "darker (brightness 0.6)": lambda image: ImageEnhance.Brightness(image).enhance(0.6),
    "blurred (Gaussian, 2 px)": lambda image: image.filter(ImageFilter.GaussianBlur(2)),
}


def held_out(run: Path) -> list[str]:
    """Real out-of-fold micrographs, before and after: images and specimens refused, and the flagged."""
    rows = read_table(RunLayout(run).oof)
    scores = np.array([float(r["ood"]) for r in rows])
    specimens = np.array([r["sample"] for r in rows])
    right = np.array([r["prediction"] == r["class"] for r in rows])
    n_specimens = len(np.unique(specimens))
    lines = [f"real held-out micrographs: {len(rows)} images of {n_specimens} specimens, out of fold"]
    for name, over in (("before: refused over 1", 1.0), (f"after: refused over {REFUSE:g}", REFUSE)):
        refused = scores > over
        lines.append(
            f"  {name:<28} {refused.sum():>5} images ({refused.mean():.2%}), "
            f"{len(np.unique(specimens[refused]))} of {n_specimens} specimens with one"
        )
    flagged = refusal_tiers(scores)[1]
    lines.append(
        f"  {'after: flagged, answered':<28} {flagged.sum():>5} images ({flagged.mean():.2%}), "
        f"{len(np.unique(specimens[flagged]))} specimens with one; right on {right[flagged].mean():.3f} of them "
        f"(all images: {right.mean():.3f})"
    )
    return lines


def tiers(answers: list[ImageAnswer]) -> str:
    """Over 1 and over REFUSE among the scored images, and the median score."""
    scores = np.array([r.ood for r in answers if r.ood is not None])
    blank = sum(r.status == "no fungus visible" for r in answers)
    if not len(scores):
        return f"{len(answers):>5} images, {blank} with no fungus visible, none scored"
    return (
        f"{len(answers):>5} images ({blank} no fungus visible): over 1 {np.mean(scores > 1):>6.1%}, refused "
        f"(over {REFUSE:g}) {np.mean(scores > REFUSE):>6.1%}; scores {scores.min():.2f} .. {scores.max():.2f}, "
        f"median {np.median(scores):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--shifted", type=int, default=150, help="out-of-fold images to shift (default 150)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for line in held_out(args.run):
        print(line)
    rng = np.random.default_rng(args.seed)
    model = open_predictor(args.run)
    rows = read_table(RunLayout(args.run).oof)
    chosen = [rows[i]["path"] for i in rng.choice(len(rows), args.shifted, replace=False)]
    originals = [Image.open(p).convert("RGB") for p in chosen]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"real micrographs shifted ({args.shifted} out-of-fold images, every fold model)")
        for k, (name, shift) in enumerate(SHIFTS.items()):
            folder = write_images(Path(tmp) / f"shifted-{k}", [shift(image) for image in originals], "x")
            print(f"  {name:<26} {tiers(predict(model, [folder]))}")
        print("not fungus micrographs")
        size = model.image_size
        kinds = {k: [GENERATED[k](rng, size) for _ in range(40)] for k in ("noise", "gradient", "text")}
        kinds["photographs (whole and crops)"] = pictures(PHOTOGRAPHS, size, 3, rng)
        kinds["micrographs of other things"] = pictures(OTHER_MICROGRAPHS, size, 3, rng)
        for k, (name, images) in enumerate(kinds.items()):
            folder = write_images(Path(tmp) / f"kind-{k}", images, "x")
            print(f"  {name:<30} {tiers(predict(model, [folder]))}")


if __name__ == "__main__":
    main()
