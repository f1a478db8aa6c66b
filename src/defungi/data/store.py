"""Arrays per image, keyed by the image's content: a folder of shards that grows as images are added.

Each `put` writes one shard (`<id>.<field>.npy` per field, then `<id>.keys.npy` last, each under a
unique temporary name renamed into place), so a shard exists once its keys do. Readers memory-map the
shards and gather the rows they ask for under a shared lock; writers compute and add the missing rows
under the exclusive one, so two processes that need the same rows compute them once. Many small
shards are merged into one when they pile up (a lab adds a specimen at a time).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defungi.utils import atomic_save_npy, exclusive_lock, shared_lock

KEY_BYTES = 16  # blake2b digest of an image file's bytes
KEY_DTYPE = np.dtype(f"S{KEY_BYTES}")
MERGE_AT = 32  # shards in one store past which a put merges them into one


def content_key(data: bytes) -> bytes:
    """The key of an image: the digest of its file's bytes (a renamed or moved file keeps it)."""
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()


def file_keys(paths: list[Path]) -> np.ndarray:
    """content_key of each file."""
    return np.array([content_key(Path(p).read_bytes()) for p in paths], dtype=KEY_DTYPE)


@dataclass(frozen=True)
class _Shard:
    name: str
    keys: np.ndarray


class RowStore:
    """Rows of named arrays (fields) per key in a folder; see the module's docstring."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _shards(self) -> list[_Shard]:
        if not self.folder.is_dir():
            return []
        return [
            _Shard(p.name.removesuffix(".keys.npy"), np.load(p))
            for p in sorted(self.folder.glob("*.keys.npy"))
            if not p.name.startswith(".")
        ]

    @staticmethod
    def _where(shards: list[_Shard]) -> dict[bytes, tuple[int, int]]:
        return {bytes(k): (s, r) for s, shard in enumerate(shards) for r, k in enumerate(shard.keys)}

    def missing(self, keys: np.ndarray) -> np.ndarray:
        """Positions of keys that the store does not hold."""
        with shared_lock(self.folder / ".lock"):
            where = self._where(self._shards())
        return np.array([i for i, k in enumerate(keys) if bytes(k) not in where], dtype=int)

    def get(self, keys: np.ndarray, fields: list[str]) -> dict[str, np.ndarray]:
        """Each field's rows for keys, in their order (every key must be held), read now."""
        return {field: np.asarray(rows) for field, rows in self.rows(keys, fields).items()}

    def rows(self, keys: np.ndarray, fields: list[str]) -> dict[str, np.ndarray | StoredRows]:
        """Each field's rows for keys, in their order (every key must be held), read when indexed: the
        memory map of a shard where it holds exactly these rows, else a StoredRows over the shards."""
        with shared_lock(self.folder / ".lock"):  # memory maps stay readable after a merge
            shards = self._shards()
            where = self._where(shards)
            try:
                at = np.array([where[bytes(k)] for k in keys], dtype=int).reshape(len(keys), 2)
            except KeyError:
                raise KeyError(f"{self.folder}: rows missing; fill them first (RowStore.fill)") from None
            out: dict[str, np.ndarray | StoredRows] = {}
            for field in fields:
                columns = [np.load(self.folder / f"{shard.name}.{field}.npy", mmap_mode="r") for shard in shards]
                whole = [s for s, c in enumerate(columns) if len(c) == len(keys)]
                if whole and np.all(at[:, 0] == whole[0]) and np.array_equal(at[:, 1], np.arange(len(keys))):
                    out[field] = columns[whole[0]]
                else:
                    out[field] = StoredRows(columns, at)
        return out

    def fill(self, keys: np.ndarray, compute: Callable[[np.ndarray], dict[str, np.ndarray]]) -> int:
        """Compute (compute(positions) -> field -> rows) and add the rows of the keys the store lacks,
        under the exclusive lock (a second process waits, then finds them); returns how many."""
        with exclusive_lock(self.folder / ".lock"):
            shards = self._shards()
            where = self._where(shards)
            todo, seen = [], set()
            for i, k in enumerate(keys):
                if bytes(k) not in where and bytes(k) not in seen:
                    seen.add(bytes(k))
                    todo.append(i)
            if todo:
                positions = np.array(todo, dtype=int)
                self._write(keys[positions], compute(positions))
                if len(shards) + 1 > MERGE_AT:
                    self._merge()
        return len(todo)

    def scratch(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.memmap:
        """A memory-mapped .npy file in the store's folder under a temporary name, for compute to fill
        (other processes may open it by its filename): a put renames it into place, uncopied."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".scratch-", suffix=".npy")
        os.close(fd)
        return np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)

    def _write(self, keys: np.ndarray, fields: dict[str, np.ndarray]) -> None:
        name = f"{time.time_ns():x}-{os.getpid()}"
        for field, rows in fields.items():
            if len(rows) != len(keys):
                raise ValueError(f"{field}: {len(rows)} rows for {len(keys)} keys")
            if isinstance(rows, np.memmap) and Path(rows.filename).parent == self.folder:  # a scratch file
                rows.flush()
                os.replace(rows.filename, self.folder / f"{name}.{field}.npy")
            else:
                atomic_save_npy(self.folder / f"{name}.{field}.npy", np.ascontiguousarray(rows))
        atomic_save_npy(self.folder / f"{name}.keys.npy", np.asarray(keys, dtype=KEY_DTYPE))

    def _merge(self) -> None:
        """Every shard into one (under the exclusive lock: readers wait)."""
        shards = self._shards()
        fields = sorted({p.name.split(".")[-2] for p in self.folder.glob("*.npy")} - {"keys"})
        keys = np.concatenate([s.keys for s in shards])
        merged = {f: np.concatenate([np.load(self.folder / f"{s.name}.{f}.npy") for s in shards]) for f in fields}
        self._write(keys, merged)
        for shard in shards:
            (self.folder / f"{shard.name}.keys.npy").unlink()
            for f in fields:
                (self.folder / f"{shard.name}.{f}.npy").unlink(missing_ok=True)


class StoredRows:
    """Rows of one field spread over a store's shards (memory-mapped), read when indexed: an array-like
    that numpy indexing (an int, a slice, an index array) gathers from the shards."""

    def __init__(self, columns: list[np.ndarray], at: np.ndarray) -> None:
        self.columns, self.at = columns, at  # at: per row, its shard and its row there
        like = columns[0] if columns else np.zeros((0,), dtype=np.float32)
        self.shape, self.dtype = (len(at), *like.shape[1:]), like.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: object) -> np.ndarray:
        rows = np.arange(len(self))[idx]
        one = np.ndim(rows) == 0
        rows = np.atleast_1d(rows)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for s, column in enumerate(self.columns):
            hit = np.flatnonzero(self.at[rows, 0] == s)
            if len(hit):
                out[hit] = column[self.at[rows[hit], 1]]
        return out[0] if one else out

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)


def folder_size(folder: Path) -> tuple[int, int]:
    """Bytes and files under folder."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return sum(p.stat().st_size for p in files), len(files)


def clear(folder: Path) -> None:
    """Remove a cache folder, each of its stores under its exclusive lock (no reader sees half of one)."""
    if not folder.is_dir():
        return
    for lock in sorted(folder.rglob(".lock")):
        with exclusive_lock(lock):
            for p in lock.parent.iterdir():
                if p != lock:
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


COMPUTED = ("decoded", "features", "engines")  # the user cache's folders that are computed (the data set is not)


def cache_parts(root: Path) -> list[tuple[str, int, int]]:
    """Each computed folder of the user cache: its name, bytes and files."""
    return [(name, *folder_size(root / name)) for name in COMPUTED]
