"""Decode every image once per (file content, size), kept per image in the user cache (data.store)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from defungi.data.scan import ImageRecord, default_cache_dir
from defungi.data.store import RowStore, StoredRows, file_keys
from defungi.utils import progress_bar

log = logging.getLogger(__name__)

STATS_SIZE = 224  # outlier statistics are measured at the DeFungi patch size, whatever the file size
HASH_SIDE = 16  # average-hash side: 256 bits, strict enough to flag only near-copies


@dataclass
class DecodedImages:
    """Per-image statistics, aligned with the record list, and the decoded pixels in the cache."""

    variance: np.ndarray  # (N,) grey-level variance at 224 px; NaN where the file could not be read
    ahash: np.ndarray  # (N, HASH_SIDE**2 // 8) uint8 average hash
    errors: dict[int, str]  # index -> why the file could not be decoded
    keys: np.ndarray  # each file's content key (data.store.file_keys)
    store: RowStore  # where the pixels are

    def pixels(self, idx: np.ndarray | None = None) -> np.ndarray | StoredRows:
        """(n, size, size, 3) uint8 of the records at idx (default all), read from the cache when
        indexed (a fit on cached features reads none of them)."""
        return self.store.rows(self.keys if idx is None else self.keys[idx], ["pixels"])["pixels"]

    @property
    def images(self) -> np.ndarray | StoredRows:
        """Every record's pixels (see pixels)."""
        return self.pixels()


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


def dihedral_nhwc(images: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flips/rotations of an NHWC batch (as data.augment.dihedral does on NCHW)."""
    if k >= 4:
        images = images[:, :, ::-1]
    return np.ascontiguousarray(np.rot90(images, k % 4, axes=(1, 2)))


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


def decode_one(path: Path, size: int, ahash: bool = True) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Pixels at size, grey variance at 224 px and the average hash of one file (None without ahash:
    answers never group near-copies, so they skip it)."""
    rgb = open_image(path, max(size, STATS_SIZE))
    ref = square(rgb, STATS_SIZE).convert("L")
    grey = np.asarray(ref, dtype=np.float32)
    bits = None
    if ahash:
        small = np.asarray(ref.resize((HASH_SIDE, HASH_SIDE), Image.BILINEAR), dtype=np.float32)
        bits = np.packbits((small > small.mean()).ravel())
    return np.asarray(square(rgb, size)), float(grey.var()), bits


def _decode_chunk(args: tuple[list[str], int, str, int]) -> list[tuple[float, np.ndarray | None, str]]:
    """Decode files into rows start, start + 1, ... of the .npy file at out (written in place: a
    quarter faster than through a memory map, whose every page faults); each one's grey variance,
    average hash and error (empty: none)."""
    paths, size, out, start = args
    offset, row = np.load(out, mmap_mode="r").offset, size * size * 3  # the header's length, a row's bytes
    stats = []
    with open(out, "r+b") as fh:
        for j, p in enumerate(paths):
            try:
                pixels, var, bits = decode_one(Path(p), size)
                os.pwrite(fh.fileno(), np.ascontiguousarray(pixels, dtype=np.uint8).data, offset + (start + j) * row)
                stats.append((var, bits, ""))
            except DECODE_ERRORS as exc:
                stats.append((float("nan"), None, f"{type(exc).__name__}: {exc}".splitlines()[0]))
    return stats


DECODE_VERSION = 1  # bumped when decode_one computes other pixels: the cache's folder changes with it
ERROR_BYTES = 200  # a decoding error's message, as the cache keeps it
CHUNK = 64  # files per job of the decoding processes
FLUSH_EVERY = 0.5  # seconds between two writes to disk of what the decoding processes decoded so far


def decode_images(
    records: list[ImageRecord],
    size: int,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> DecodedImages:
    """Decoded images at size x size, each from the cache when a file of the same content was decoded
    before at that size (data.store: adding, removing or renaming files decodes only what is new);
    what decoding_ahead started for the same files is taken over. workers: the processes that decode,
    this one included (default: one per core, at most 8)."""
    store = _store(size, cache_dir)
    paths = [str(r.path) for r in records]
    ahead = _AHEAD.pop(store.folder, None)
    started = ahead.decoding if ahead is not None else None
    try:
        same = ahead is not None and ahead.paths == paths and ahead.stamps == _stamps(paths)
        keys = ahead.keys if same else file_keys(paths)

        def compute(at: np.ndarray) -> dict[str, np.ndarray]:
            if started is not None and np.array_equal(started.keys, keys[at]):
                return started.rows(progress)
            if started is not None:
                started.discard()  # other files, or another process decoded some: its workers stop first
            return _Decoding([records[i] for i in at], keys[at], size, store, workers).rows(progress)

        store.fill(keys, compute)
    finally:
        if started is not None:
            started.discard()  # nothing left to drop once taken over (its scratch file is in the store)
    rows = store.get(keys, ["variance", "ahash", "error"])
    errors = {i: e.decode(errors="replace") for i, e in enumerate(rows["error"]) if e}
    return DecodedImages(rows["variance"], rows["ahash"], errors, keys, store)


@contextlib.contextmanager
def decoding_ahead(records: list[ImageRecord], size: int, cache_dir: Path | None = None) -> Iterator[None]:
    """Within: what the cache lacks of records at size decodes in worker processes (all cores but this
    process's), for the decode_images call of the same files to take over. A command enters it before
    it imports torch and the rest (seconds of one core), so that the other cores decode meanwhile; on
    leaving, decoding that no call took over is stopped and its rows dropped."""
    store = _store(size, cache_dir)
    paths = [str(r.path) for r in records]
    stamps = _stamps(paths)  # before the contents are read: a file changed after them is read again
    keys = file_keys(paths)
    missing = store.missing(keys)
    _, first = np.unique(keys[missing], return_index=True)  # each content once, at its first file, as fill takes it
    at = np.sort(missing[first])
    decoding = _Decoding([records[i] for i in at], keys[at], size, store) if len(at) else None
    _AHEAD[store.folder] = _Ahead(paths, stamps, keys, decoding)  # where all is decoded, the keys: hashed once
    try:
        yield
    finally:
        left = _AHEAD.pop(store.folder, None)
        if left is not None and left.decoding is not None:
            left.decoding.discard()


def decoding() -> bool:
    """Whether images decode in worker processes now (decoding_ahead): work for this one meanwhile."""
    return any(a.decoding is not None for a in _AHEAD.values())


def _stamps(paths: list[str]) -> list[tuple[int, int]]:
    """Each file's size and modification time (ns): what says it was not replaced since."""
    return [(s.st_size, s.st_mtime_ns) for s in map(os.stat, paths)]


def _store(size: int, cache_dir: Path | None) -> RowStore:
    """The store of the images decoded at size."""
    return RowStore((cache_dir or default_cache_dir()) / "decoded" / f"{size}px-v{DECODE_VERSION}")


class _Decoding:
    """Files being decoded into a scratch file of a store (RowStore.scratch): by worker processes from
    the first files on, from the start, and by this process from the last files back once it asks for
    the rows; workers: the processes that decode, this one included."""

    def __init__(
        self, records: list[ImageRecord], keys: np.ndarray, size: int, store: RowStore, workers: int | None = None
    ) -> None:
        n, self.keys, self.size = len(records), keys, size
        self.pixels = store.scratch((n, size, size, 3), np.uint8)
        self.jobs = [
            ([str(r.path) for r in records[i : i + CHUNK]], size, self.pixels.filename, i) for i in range(0, n, CHUNK)
        ]
        others = (workers or min(os.cpu_count() or 1, 8)) - 1
        self.pool = (
            ProcessPoolExecutor(others, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
            if others > 0 and n > 4 * CHUNK
            else None
        )  # Ctrl-C is this process's to handle: it stops them
        self.futures = [self.pool.submit(_decode_chunk, job) for job in self.jobs] if self.pool else []
        self.decoded = threading.Event()  # set once every file is decoded, or the decoding dropped
        self.flusher = threading.Thread(target=self._flush_while_decoding, daemon=True) if self.pool else None
        if self.flusher is not None:  # after the workers started (forked, they copy no thread of it)
            self.flusher.start()

    def _flush_while_decoding(self) -> None:
        """Write the rows decoded so far to disk every FLUSH_EVERY seconds, beside the decoding: the
        store's flush of the whole file, before its keys are written, then waits for the last rows
        alone (it took 0.6 s for 8,000 images at 224 px, the cores idle)."""
        fd = os.open(self.pixels.filename, os.O_RDWR)
        try:
            while not self.decoded.wait(FLUSH_EVERY):
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def _stop_flushing(self) -> None:
        self.decoded.set()
        if self.flusher is not None:
            self.flusher.join()

    def rows(self, progress: bool) -> dict[str, np.ndarray]:
        """Pixels (the scratch file), grey variance, average hash and the error of a file that could not
        be decoded (empty: none), one row per file, once all are decoded."""
        try:
            stats = self._join(progress)
        except BaseException:
            self.discard()
            raise
        self._stop_flushing()
        if self.pool is not None:
            self.pool.shutdown()
        n = len(self.keys)
        variance = np.full(n, np.nan, dtype=np.float64)
        ahash = np.zeros((n, HASH_SIDE * HASH_SIDE // 8), dtype=np.uint8)
        errors = np.zeros(n, dtype=f"S{ERROR_BYTES}")
        for i, (var, bits, err) in enumerate(stats):
            if err:
                errors[i] = err.encode()[:ERROR_BYTES]
            else:
                variance[i], ahash[i] = var, bits
        log.info("decoded %d images at %d px", n, self.size)
        return {"pixels": self.pixels, "variance": variance, "ahash": ahash, "error": errors}

    def _join(self, progress: bool) -> list[tuple[float, np.ndarray | None, str]]:
        """Each job's results: this process decodes the jobs no worker has begun, from the last back."""
        done: dict[int, list[tuple[float, np.ndarray | None, str]]] = {}
        bar = progress_bar(total=len(self.keys), desc=f"decode {self.size}px", unit="img", enabled=progress)
        counted: set[int] = set()

        def count(j: int) -> None:
            if j not in counted:
                counted.add(j)
                bar.update(len(self.jobs[j][0]))

        left = len(self.jobs)
        while left and (not self.futures or self.futures[left - 1].cancel()):
            left -= 1
            done[left] = _decode_chunk(self.jobs[left])
            count(left)
            for j, future in enumerate(self.futures[:left]):
                if future.done():
                    count(j)
        for j in range(left):
            done[j] = self.futures[j].result()
            count(j)
        bar.close()
        return [stat for j in range(len(self.jobs)) for stat in done[j]]

    def discard(self) -> None:
        """Drop the scratch file, then stop the workers (their chunk under way written to the dropped file)."""
        self._stop_flushing()
        Path(self.pixels.filename).unlink(missing_ok=True)
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


@dataclass
class _Ahead:
    """What decoding_ahead started: the files (paths, in order), their sizes and modification times
    before their content keys were computed, those keys, the decoding of what the cache lacked (None:
    nothing)."""

    paths: list[str]
    stamps: list[tuple[int, int]]
    keys: np.ndarray
    decoding: _Decoding | None


_AHEAD: dict[Path, _Ahead] = {}  # a store's folder -> the decoding started ahead into it
