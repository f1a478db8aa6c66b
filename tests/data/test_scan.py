import zipfile
from pathlib import Path

import pytest

from defungi.data.scan import fetch, group_of, parse_name, scan
from defungi.errors import DefungiError
from tests.conftest import write_folder


def test_parse_defungi_names():
    assert parse_name("H1_100a_3") == {"cls": "H1", "sample": "100", "field": "a", "patch": "3"}
    assert parse_name("H6_9_12")["field"] == ""
    assert parse_name("holiday_photo") is None


def test_unparsed_names_are_their_own_group(tmp_path: Path):
    assert group_of(Path("H2/H2_7b_1.jpg"), "H2") == "H2_7"
    assert group_of(Path("x/img001.png"), "x") == "x/img001.png"


def test_scan_finds_classes_and_groups(tiny_data: Path):
    records = scan(tiny_data)
    assert sorted({r.label for r in records}) == ["H1", "H2", "H3"]
    assert len(records) == 3 * 6 * 4 + 1
    assert len({r.group for r in records if r.label == "H2"}) == 6


def test_scan_accepts_extra_top_folder_and_zip(tmp_path: Path):
    write_folder(tmp_path / "release" / "DeFungi", samples_per_class=2, patches=1)
    assert len(scan(tmp_path / "release")) == 3 * 2 + 1
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in (tmp_path / "release").rglob("*.jpg"):
            zf.write(f, f.relative_to(tmp_path / "release"))
    assert len(scan(archive)) == 3 * 2 + 1


def test_missing_path_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DefungiError, match="no such file or folder"):
        scan(tmp_path / "nowhere")


def test_empty_class_folder_is_named(tiny_data: Path):
    (tiny_data / "H9").mkdir()
    with pytest.raises(DefungiError, match=r"H9: class folder has no images"):
        scan(tiny_data)


def test_single_class_is_rejected(tmp_path: Path):
    write_folder(tmp_path / "one", samples_per_class=2, patches=1, classes=("H1",))
    with pytest.raises(DefungiError, match="only one class folder"):
        scan(tmp_path / "one")


def _release_zip(tmp_path: Path) -> Path:
    """A local stand-in for the UCI archive: a zip holding a zip of the class folders."""
    write_folder(tmp_path / "src" / "defungi", samples_per_class=3, patches=2, classes=("H1", "H2", "H3", "H5", "H6"))
    inner = tmp_path / "defungi_inner.zip"
    with zipfile.ZipFile(inner, "w") as zf:
        for f in (tmp_path / "src").rglob("*.jpg"):
            zf.write(f, f.relative_to(tmp_path / "src"))
    outer = tmp_path / "served.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, "defungi.zip")
    return outer


def test_fetch_from_local_archive_with_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("defungi.data.scan.DEFUNGI_MIN_IMAGES", 10)
    outer = _release_zip(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    data = outer.read_bytes()
    (dest / "defungi.zip.part").write_bytes(data[:1000])  # an interrupted download
    root = fetch(dest, url=outer.as_uri())
    assert (dest / "defungi.zip").read_bytes() == data
    assert sorted(p.name for p in root.iterdir()) == ["H1", "H2", "H3", "H5", "H6"]
    assert fetch(dest, url=outer.as_uri()) == root  # second call verifies, downloads nothing


def test_fetch_without_network_says_what_to_do(tmp_path: Path):
    with pytest.raises(DefungiError, match="download it by hand"):
        fetch(tmp_path / "dest", url="http://127.0.0.1:9/defungi.zip")
