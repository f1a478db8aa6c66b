"""The per-image store behind the caches: rows by content key, computed once, read back in order."""

import threading
from pathlib import Path

import numpy as np
import pytest

import defungi.data.store as store_module
from defungi.data.store import KEY_DTYPE, RowStore, StoredRows, cache_parts, clear, content_key, file_keys


def _keys(*names: str) -> np.ndarray:
    return np.array([content_key(n.encode()) for n in names], dtype=KEY_DTYPE)


def _rows(keys: np.ndarray) -> dict[str, np.ndarray]:
    """Rows that say which key they belong to (its first 4 bytes as numbers)."""
    return {"x": np.array([list(bytes(k)[:4]) for k in keys], dtype=np.float32)}


def _filler(store: RowStore, keys: np.ndarray, asked: list[int]) -> int:
    return store.fill(keys, lambda at: asked.extend(at.tolist()) or _rows(keys[at]))


def test_rows_come_back_in_the_order_asked_and_only_what_is_missing_is_computed(tmp_path: Path):
    store, asked = RowStore(tmp_path / "s"), []
    first = _keys("a", "b", "c")
    assert _filler(store, first, asked) == 3 and asked == [0, 1, 2]
    both = _keys("c", "d", "a", "e", "b")
    assert list(store.missing(both)) == [1, 3]
    asked.clear()
    assert _filler(store, both, asked) == 2 and asked == [1, 3]  # positions of d and e only
    assert np.array_equal(store.get(both, ["x"])["x"], _rows(both)["x"])
    assert _filler(store, both, asked) == 0


def test_rows_are_read_when_indexed_and_a_shard_read_whole_is_its_memory_map(tmp_path: Path):
    store = RowStore(tmp_path / "s")
    keys = _keys("a", "b")
    store.fill(keys, lambda at: _rows(keys[at]))
    assert isinstance(store.rows(keys, ["x"])["x"], np.memmap)
    more = _keys("c")
    store.fill(more, lambda at: _rows(more))
    both = np.concatenate([more, keys[::-1], more])
    lazy = store.rows(both, ["x"])["x"]  # over two shards
    assert isinstance(lazy, StoredRows) and lazy.shape == (4, 4) and len(lazy) == 4
    expected = _rows(both)["x"]
    assert np.array_equal(lazy[1], expected[1]) and np.array_equal(lazy[1:3], expected[1:3])
    assert np.array_equal(lazy[np.array([3, 0])], expected[[3, 0]]) and np.array_equal(np.asarray(lazy), expected)


def test_a_key_the_store_lacks_is_an_error_that_says_so(tmp_path: Path):
    store = RowStore(tmp_path / "s")
    store.fill(_keys("a"), lambda at: _rows(_keys("a")[at]))
    with pytest.raises(KeyError, match="rows missing"):
        store.get(_keys("a", "z"), ["x"])


def test_many_small_shards_are_merged_into_one_with_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(store_module, "MERGE_AT", 3)
    store = RowStore(tmp_path / "s")
    names = [str(i) for i in range(5)]
    for name in names:
        store.fill(_keys(name), lambda at, name=name: _rows(_keys(name)))
    assert len(list(store.folder.glob("*.keys.npy"))) <= 3
    keys = _keys(*names)
    assert np.array_equal(store.get(keys, ["x"])["x"], _rows(keys)["x"])


def test_two_writers_of_the_same_rows_compute_them_once(tmp_path: Path):
    store, keys, calls = RowStore(tmp_path / "s"), _keys("a", "b", "c"), []

    def compute(at: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(at))
        return _rows(keys[at])

    threads = [threading.Thread(target=store.fill, args=(keys, compute)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [3]
    assert np.array_equal(store.get(keys, ["x"])["x"], _rows(keys)["x"])


def test_a_file_is_keyed_by_its_content_not_its_name(tmp_path: Path):
    (tmp_path / "a.jpg").write_bytes(b"pixels")
    (tmp_path / "b.jpg").write_bytes(b"pixels")
    (tmp_path / "c.jpg").write_bytes(b"other pixels")
    a, b, c = file_keys([tmp_path / n for n in ("a.jpg", "b.jpg", "c.jpg")])
    assert a == b != c


def test_the_cache_shows_its_size_and_clears(tmp_path: Path):
    store = RowStore(tmp_path / "features" / "k")
    store.fill(_keys("a"), lambda at: _rows(_keys("a")))
    sizes = dict((name, size) for name, size, _ in cache_parts(tmp_path))
    assert sizes["features"] > 0 and sizes["decoded"] == 0
    clear(tmp_path / "features")
    assert not (tmp_path / "features").exists()
    assert RowStore(tmp_path / "features" / "k").missing(_keys("a")).tolist() == [0]
