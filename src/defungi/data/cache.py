"""Decode every image once per (file list, size) into a memory-mapped uint8 array on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from defungi.data.scan import ImageRecord, default_cache_dir
from defungi.utils import atomic_write_text, exclusive_lock, progress_bar

log = logging.getLogger(__name__)

STATS_SIZE = 224  # outlier statistics are measured at the DeFungi patch size, whatever the file size
HASH_SIDE = 16  # average-hash side: 256 bits, strict enough to flag only near-copies


@dataclass
class DecodedImages:
    """Decoded pixels and per-image statistics, aligned with the record list."""

    images: np.ndarray  # (N, size, size, 3) uint8, memory-mapped
    variance: np.ndarray  # (N,) grey-level variance at 224 px; NaN where the file could not be read
    ahash: np.ndarray  # (N, HASH_SIDE**2 // 8) uint8 average hash
    errors: dict[int, str]  # index -> why the file could not be decoded


# what a file that cannot be decoded raises (PIL's pixel limit included); it is skipped and listed
DECODE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode: grey, palette, RGBA (on white); 16-bit grey scaled by its full range (not
    stretched, so that a near-blank 16-bit image stays near-blank), float grey in [0, 1] by 255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        if image.mode != "F":
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif arr.max() <= 1:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


MAX_ASPECT = 20  # longer side / shorter side: past it a file is a strip, not a micrograph


def square(image: Image.Image, size: int) -> Image.Image:
    """The central square of the image, resized to size x size (cropped before it is resized, so
    that the work is bounded by the square, whatever the image's shape)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side), reducing_gap=3.0)


def check_shape(width: int, height: int) -> str | None:
    """Why an image of this size is not decoded (None: it is): more pixels than PIL's limit (the
    size of its decompression-bomb warning) or a strip far longer than wide."""
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        return f"{width}x{height} px: over the limit of {Image.MAX_IMAGE_PIXELS} pixels"
    if max(width, height) > MAX_ASPECT * max(min(width, height), 1):
        return f"{width}x{height} px: more than {MAX_ASPECT} times as long as wide"
    return None


def open_image(path: Path, size: int) -> Image.Image:
    """Open, check its size from the header (check_shape), decode (JPEG at reduced scale when it is
    much larger) and convert to RGB."""
    with Image.open(path) as image:
        why = check_shape(*image.size)
        if why is not None:
            raise Image.DecompressionBombError(why)
        image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4, 1/8 scale when large enough
        image.load()
        return to_rgb(image)


def decode_one(path: Path, size: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Pixels at size, grey variance at 224 px and the average hash of one file."""
    rgb = open_image(path, max(size, STATS_SIZE))
    ref = square(rgb, STATS_SIZE).convert("L")
    grey = np.asarray(ref, dtype=np.float32)
    small = np.asarray(ref.resize((HASH_SIDE, HASH_SIDE), Image.BILINEAR), dtype=np.float32)
    bits = np.packbits((small > small.mean()).ravel())
    return np.asarray(square(rgb, size)), float(grey.var()), bits


def _decode_chunk(args: tuple[list[str], int]) -> list[tuple[np.ndarray | None, float, np.ndarray | None, str]]:
    paths, size = args
    out = []
    for p in paths:
        try:
            pixels, var, bits = decode_one(Path(p), size)
            out.append((pixels, var, bits, ""))
        except DECODE_ERRORS as exc:
            out.append((None, float("nan"), None, f"{type(exc).__name__}: {exc}".splitlines()[0]))
    return out


def cache_key(records: list[ImageRecord], size: int) -> str:
    """Hash of the file list (path, size, mtime) and the image size."""
    h = hashlib.sha1(str(size).encode())
    for r in records:
        st = r.path.stat()
        h.update(os.fsencode(r.path.resolve()) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())  # any file name
    return h.hexdigest()[:16]


def decode_images(
    records: list[ImageRecord],
    size: int,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> DecodedImages:
    """Decoded images at size x size, from the cache when the same files were decoded before."""
    folder = (cache_dir or default_cache_dir()) / "decoded" / f"{cache_key(records, size)}-{size}px"
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        with exclusive_lock(folder / ".lock"):  # another process decoding the same entry: wait for it
            if not meta_path.exists():
                _decode_into(folder, records, size, workers, progress)
    meta = json.loads(meta_path.read_text())
    stats = np.load(folder / "stats.npz")
    return DecodedImages(
        images=np.load(folder / "images.npy", mmap_mode="r"),
        variance=stats["variance"],
        ahash=stats["ahash"],
        errors={int(k): v for k, v in meta["errors"].items()},
    )


def _decode_into(folder: Path, records: list[ImageRecord], size: int, workers: int | None, progress: bool) -> None:
    """Decode every record into folder: images.npy, stats.npz, then meta.json (written last)."""
    n = len(records)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".images.", suffix=".npy")
    os.close(fd)
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    variance = np.full(n, np.nan, dtype=np.float64)
    ahash = np.zeros((n, HASH_SIDE * HASH_SIDE // 8), dtype=np.uint8)
    errors: dict[int, str] = {}
    chunk = 64
    jobs = [([str(r.path) for r in records[i : i + chunk]], size) for i in range(0, n, chunk)]
    workers = workers or min(os.cpu_count() or 1, 8)
    with ProcessPoolExecutor(workers) if workers > 1 and n > 4 * chunk else _Serial() as pool:
        results = pool.map(_decode_chunk, jobs)
        bar = progress_bar(total=n, desc=f"decode {size}px", unit="img", enabled=progress)
        for start, chunk_out in zip(range(0, n, chunk), results, strict=True):
            for j, (pixels, var, bits, err) in enumerate(chunk_out):
                if err:
                    errors[start + j] = err
                else:
                    images[start + j], variance[start + j], ahash[start + j] = pixels, var, bits
            bar.update(len(chunk_out))
        bar.close()
    images.flush()
    del images
    os.replace(tmp, folder / "images.npy")
    np.savez(folder / "stats.npz", variance=variance, ahash=ahash)
    atomic_write_text(
        folder / "meta.json", json.dumps({"n": n, "size": size, "errors": {str(k): v for k, v in errors.items()}})
    )
    log.info("decoded %d images at %d px into %s", n, size, folder)


class _Serial:
    """Stand-in for a process pool when the work is small."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def map(fn, items):  # noqa: ANN001, ANN205 - mirrors Executor.map
        return map(fn, items)
