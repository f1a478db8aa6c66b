"""Images that are not DeFungi micrographs, for the refusal tests and benchmarks/ood_refusal.py:
uniform noise, flat fields, gradients, natural photographs (those that ship in scikit-image's `data`
module), rendered text, and other kinds of micrographs (scikit-image's stained tissue and cells)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# scikit-image's bundled pictures (no download): photographs of scenes, and micrographs of other things
PHOTOGRAPHS = ("astronaut", "camera", "cat", "chelsea", "coffee", "rocket", "coins", "clock", "moon", "brick")
PHOTOGRAPHS += ("grass", "gravel", "hubble_deep_field", "page", "text")
OTHER_MICROGRAPHS = ("immunohistochemistry", "cell", "microaneurysms")
WORDS = ("fungus", "H1", "sample", "specimen", "microscope", "slide", "DeFungi", "negative", "report", "lab")


def noise(rng: np.random.Generator, size: int) -> Image.Image:
    """Uniform random RGB pixels."""
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def flat(rng: np.random.Generator, size: int) -> Image.Image:
    """One random colour everywhere."""
    return Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))


def gradient(rng: np.random.Generator, size: int) -> Image.Image:
    """A linear ramp between two random colours in a random direction."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) or 1.0)
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return Image.fromarray((start + (end - start) * ramp[..., None]).astype(np.uint8))


def text(rng: np.random.Generator, size: int) -> Image.Image:
    """A few lines of words in black or white on a light or dark background."""
    light = bool(rng.integers(2))
    background = rng.integers(190, 256, 3) if light else rng.integers(0, 60, 3)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(6, int(size * rng.uniform(0.08, 0.2))))
    lines = [" ".join(rng.choice(WORDS, 3)) for _ in range(6)]
    draw.multiline_text(
        (int(rng.integers(0, size // 8 + 1)), 0),
        "\n".join(lines),
        fill=(0, 0, 0) if light else (255, 255, 255),
        font=font,
    )
    return image


GENERATED: dict[str, Callable[[np.random.Generator, int], Image.Image]] = {
    "noise": noise,
    "flat": flat,
    "gradient": gradient,
    "text": text,
}


def pictures(names: tuple[str, ...], size: int, crops: int, rng: np.random.Generator) -> list[Image.Image]:
    """scikit-image's pictures (names in skimage.data), each whole (centre square) and as `crops`
    random square crops of half its shorter side, at size x size."""
    import skimage.data

    out = []
    for name in names:
        picture = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        side = min(picture.size)
        boxes = [((picture.width - side) // 2, (picture.height - side) // 2, side)]
        for _ in range(crops):
            half = side // 2
            boxes.append(
                (int(rng.integers(0, picture.width - half + 1)), int(rng.integers(0, picture.height - half + 1)), half)
            )
        out += [picture.crop((x, y, x + s, y + s)).resize((size, size), Image.BILINEAR) for x, y, s in boxes]
    return out


def write_images(folder: Path, images: list[Image.Image], stem: str) -> Path:
    """The images as PNG files folder/stem_K.png (the folder is created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        image.save(folder / f"{stem}_{k}.png")
    return folder
