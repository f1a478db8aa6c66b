import http.server
import threading
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
    assert len({r.specimen for r in records if r.label == "H2"}) == 6


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


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one archive and honours `Range: bytes=N-`, as the UCI server does; records the ranges asked."""

    payload = b""
    ranges: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
        asked = self.headers.get("Range", "")
        type(self).ranges.append(asked)
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked else 0
        body = self.payload[start:]
        self.send_response(206 if asked else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path):
    """The release archive on a loopback HTTP server that supports resumed downloads."""
    outer = _release_zip(tmp_path)
    handler = type("Handler", (_RangeHandler,), {"payload": outer.read_bytes(), "ranges": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/defungi.zip", handler
    server.shutdown()


def test_fetch_resumes_an_interrupted_download(tmp_path: Path, served, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("defungi.data.scan.DEFUNGI_MIN_IMAGES", 10)
    url, handler = served
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "defungi.zip.part").write_bytes(handler.payload[:1000])  # an interrupted download
    root = fetch(dest, url=url)
    assert handler.ranges == ["bytes=1000-"]  # only the missing part was asked for
    assert (dest / "defungi.zip").read_bytes() == handler.payload
    assert sorted(p.name for p in root.iterdir()) == ["H1", "H2", "H3", "H5", "H6"]
    assert fetch(dest, url=url) == root and handler.ranges == ["bytes=1000-"]  # second call verifies, downloads nothing


def test_fetch_starts_again_where_the_server_ignores_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("defungi.data.scan.DEFUNGI_MIN_IMAGES", 10)
    outer = _release_zip(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "defungi.zip.part").write_bytes(b"stale bytes of another file")
    fetch(dest, url=outer.as_uri())  # file:// answers the whole file, never a range
    assert (dest / "defungi.zip").read_bytes() == outer.read_bytes()


def test_fetch_without_network_says_what_to_do(tmp_path: Path):
    with pytest.raises(DefungiError, match="download it by hand"):
        fetch(tmp_path / "dest", url="http://127.0.0.1:9/defungi.zip")
