from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import defungi.data.cache as cache_module
from defungi.data.cache import decode_images, decode_one, decoding_ahead
from defungi.data.dataset import load_dataset
from defungi.data.scan import scan
from tests.conftest import write_folder


def test_decode_any_mode_and_size(tmp_path: Path):
    grey16 = Image.fromarray((np.arange(60 * 80).reshape(60, 80) * 13).astype(np.uint16))
    rgba = Image.new("RGBA", (500, 300), (10, 200, 30, 128))
    for name, image in {
        "g16.png": grey16,
        "rgba.png": rgba,
        "grey.tif": Image.new("L", (30, 30), 90),
        "big.bmp": Image.new("RGB", (700, 500), 7),
    }.items():
        image.save(tmp_path / name)
        pixels, variance, bits = decode_one(tmp_path / name, 32)
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
        assert variance >= 0 and bits.shape == (32,)
        unhashed = decode_one(tmp_path / name, 32, ahash=False)  # as answers decode: the same but the hash
        assert np.array_equal(unhashed[0], pixels) and unhashed[1] == variance and unhashed[2] is None
    assert decode_one(tmp_path / "g16.png", 32)[1] > 100  # 16-bit rescaled, not clipped to white


def test_cache_is_reused_and_keyed_by_size(tiny_data: Path, tmp_path: Path):
    records = scan(tiny_data)
    first = decode_images(records, 24, cache_dir=tmp_path / "c", progress=False)
    folders = list((tmp_path / "c" / "decoded").iterdir())
    again = decode_images(records, 24, cache_dir=tmp_path / "c", progress=False)
    assert np.array_equal(first.images, again.images)
    assert isinstance(again.images, np.memmap)
    assert list((tmp_path / "c" / "decoded").iterdir()) == folders
    decode_images(records, 16, cache_dir=tmp_path / "c", progress=False)
    assert len(list((tmp_path / "c" / "decoded").iterdir())) == 2


def test_worker_processes_write_each_image_into_its_own_row(tmp_path: Path):
    # over 4 chunks of 64 images: a worker process from the first chunk on and this one from the last back
    # each write their chunks' rows in place; every row holds the pixels of its own file (one image per
    # class of 3, specimen numbers and patches apart)
    data = write_folder(tmp_path / "data", samples_per_class=30, patches=3, size=24, seed=3)
    records = scan(data)
    assert len(records) > 4 * 64
    decoded = decode_images(records, 24, cache_dir=tmp_path / "c", workers=2, progress=False)
    pixels = np.asarray(decoded.images)
    assert all(np.array_equal(pixels[i], decode_one(r.path, 24)[0]) for i, r in enumerate(records))
    assert np.allclose(decoded.variance, [decode_one(r.path, 24)[1] for r in records])


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many files each decoding started (data.cache._Decoding) was given."""
    started: list[int] = []
    real = cache_module._Decoding
    monkeypatch.setattr(
        cache_module, "_Decoding", lambda records, *a, **k: started.append(len(records)) or real(records, *a, **k)
    )
    return started


def _leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.rglob(".scratch-*")]


def test_decoding_started_ahead_is_taken_over_by_the_load_of_the_same_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # over 4 chunks: a worker process decodes from the start, this one joins at the load, from the last chunk back
    records = scan(write_folder(tmp_path / "data", samples_per_class=30, patches=3, size=24, seed=3))
    started = _counted(monkeypatch)
    with decoding_ahead(records, 24, cache_dir=tmp_path / "c"):
        decoded = decode_images(records, 24, cache_dir=tmp_path / "c", progress=False)
    assert started == [len(records)]  # the load started nothing of its own
    pixels = np.asarray(decoded.images)
    assert all(np.array_equal(pixels[i], decode_one(r.path, 24)[0]) for i, r in enumerate(records))
    assert _leftovers(tmp_path / "c") == []
    hashed: list[int] = []
    real_keys = cache_module.file_keys
    monkeypatch.setattr(cache_module, "file_keys", lambda paths: hashed.append(len(paths)) or real_keys(paths))
    with decoding_ahead(records, 24, cache_dir=tmp_path / "c"):  # all in the cache now
        again = decode_images(records, 24, cache_dir=tmp_path / "c", progress=False)
    assert started == [len(records)] and hashed == [len(records)]  # nothing decoded, the files hashed once
    assert again.keys.tolist() == decoded.keys.tolist()


def test_decoding_ahead_that_no_load_takes_over_leaves_nothing_behind(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    records = scan(tiny_data)
    started = _counted(monkeypatch)
    with decoding_ahead(records, 24, cache_dir=tmp_path / "c"):
        pass  # e.g. the run was refused before it loaded its images
    assert _leftovers(tmp_path / "c") == [] and not list((tmp_path / "c").rglob("*.keys.npy"))
    with decoding_ahead(records, 24, cache_dir=tmp_path / "c"):
        Image.new("RGB", (40, 40), (10, 200, 30)).save(tiny_data / "H2" / "H2_998a_1.png")  # the folder changed
        again = scan(tiny_data)
        decoded = decode_images(again, 24, cache_dir=tmp_path / "c", progress=False)
    assert started == [len(records), len(records), len(again)]  # the load decoded the files it was given
    new = [r.path.name for r in again].index("H2_998a_1.png")
    assert np.array_equal(decoded.images[new], decode_one(again[new].path, 24)[0])
    assert _leftovers(tmp_path / "c") == []


def test_a_file_replaced_after_decoding_began_ahead_is_hashed_and_decoded_again(tiny_data: Path, tmp_path: Path):
    records = scan(tiny_data)
    replaced = records[0].path
    with decoding_ahead(records, 24, cache_dir=tmp_path / "c"):
        Image.new("RGB", (40, 40), (200, 10, 30)).save(replaced, format="JPEG")  # the same name, another image
        decoded = decode_images(records, 24, cache_dir=tmp_path / "c", progress=False)
    assert np.array_equal(decoded.images[0], decode_one(replaced, 24)[0])
    assert _leftovers(tmp_path / "c") == []


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_unreadable_files_are_skipped_and_listed(tiny_data: Path, content: bytes, caplog: pytest.LogCaptureFixture):
    bad = tiny_data / "H2" / "H2_50a_1.jpg"
    bad.write_bytes(content)
    data = load_dataset(tiny_data, 24, variance_threshold=10, progress=False)
    assert str(bad) in [e["path"] for e in data.excluded]
    assert bad not in data.paths
    assert any(str(bad) in r.message for r in caplog.records)


def test_low_variance_images_are_excluded(tiny_data: Path):
    data = load_dataset(tiny_data, 24, variance_threshold=10, progress=False)
    blank = str(tiny_data / "H1" / "H1_99a_1.jpg")
    assert [e["path"] for e in data.excluded] == [blank]
    assert len(data.paths) == 3 * 6 * 4
    assert len(load_dataset(tiny_data, 24, variance_threshold=0, progress=False).paths) == 3 * 6 * 4 + 1


def test_duplicate_images_join_groups(tiny_data: Path):
    (tiny_data / "H2" / "H2_77a_1.jpg").write_bytes((tiny_data / "H2" / "H2_3a_2.jpg").read_bytes())
    data = load_dataset(tiny_data, 24, variance_threshold=10, progress=False)
    specimen = dict(zip(map(str, data.paths), data.specimens, strict=True))
    assert specimen[str(tiny_data / "H2" / "H2_77a_1.jpg")] == specimen[str(tiny_data / "H2" / "H2_3a_1.jpg")]


def test_adding_or_renaming_files_decodes_only_what_is_new(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    decoded: list[int] = []
    real = cache_module._Decoding
    monkeypatch.setattr(
        cache_module, "_Decoding", lambda records, *a: decoded.append(len(records)) or real(records, *a)
    )
    first = decode_images(scan(tiny_data), 24, cache_dir=tmp_path / "c", progress=False)
    some = sorted((tiny_data / "H1").iterdir())[0]
    some.rename(some.with_name("H1_999z_1.jpg"))  # renamed: the same content
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tiny_data / "H2" / "H2_998a_1.png")  # a new image
    records = scan(tiny_data)
    again = decode_images(records, 24, cache_dir=tmp_path / "c", progress=False)
    assert decoded == [len(first.images), 1]
    renamed = [r.path.name for r in records].index("H1_999z_1.jpg")
    assert np.array_equal(again.images[renamed], decode_one(tiny_data / "H1" / "H1_999z_1.jpg", 24)[0])
