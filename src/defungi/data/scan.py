"""Find labelled images in a folder (or a .zip of one), parse DeFungi names, fetch the release."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from defungi.errors import DefungiError
from defungi.utils import exclusive_lock

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
DEFUNGI_URL = "https://archive.ics.uci.edu/static/public/773/defungi.zip"
DEFUNGI_CLASSES = ("H1", "H2", "H3", "H5", "H6")
DEFUNGI_MIN_IMAGES = 5000  # the public release has 9114; a smaller tree is a broken download
_NAME = re.compile(r"^(?P<cls>H\d+)_(?P<sample>\d+)(?P<field>[a-z]*)_(?P<patch>\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image file and the specimen it comes from."""

    path: Path
    label: str
    specimen: str  # images of one specimen never go to two split parts


def parse_name(stem: str) -> dict[str, str] | None:
    """Split a DeFungi file stem like 'H1_100a_3' into class, specimen number, field and patch."""
    match = _NAME.match(stem)
    return match.groupdict() if match else None


def group_of(path: Path, label: str) -> str:
    """The specimen a file belongs to: 'H1_100' for DeFungi names, else the file itself."""
    parsed = parse_name(path.stem)
    return f"{parsed['cls'].upper()}_{parsed['sample']}" if parsed else f"{label}/{path.name}"


def default_cache_dir() -> Path:
    """User cache folder: $DEFUNGI_CACHE, else $XDG_CACHE_HOME/defungi, else ~/.cache/defungi."""
    if os.environ.get("DEFUNGI_CACHE"):
        return Path(os.environ["DEFUNGI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "defungi"


def _subdirs(folder: Path) -> list[Path]:
    """The sub-folders that can hold images: not hidden, and not a link back into the tree (ln -s .
    DATA/H7 would be a class holding every image again; a link to a folder elsewhere is followed)."""
    found = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    looped = [p for p in found if p.is_symlink() and _inside(p.resolve(), folder.resolve())]
    for link in looped:
        log.warning("%s: a link to %s, inside the data; left out", link, link.resolve())
    return [p for p in found if p not in looped]


def _inside(target: Path, tree: Path) -> bool:
    """Whether target is the tree, inside it, or holds it."""
    return target == tree or target in tree.parents or tree in target.parents


def _has_images(folder: Path) -> bool:
    """Whether folder holds image files directly."""
    return any(f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() for f in folder.iterdir())


def _named_after_its_images(folder: Path) -> bool:
    """Whether a folder is named like the class in its first image's DeFungi name (H1/H1_100a_3.jpg)."""
    first = next((f for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES), None)
    parsed = parse_name(first.stem) if first is not None else None
    return parsed is not None and parsed["cls"].upper() == folder.name.upper()


def _trees(folders: list[Path]) -> list[str]:
    """The folders among these that hold class folders themselves (named like the classes in their
    images' names) sharing a name with another such folder: two copies of a data set side by side."""
    classes = {
        d.name: {c.name for c in _subdirs(d) if _named_after_its_images(c)} for d in folders if not _has_images(d)
    }
    return sorted(n for n, names in classes.items() if any(names & other for m, other in classes.items() if m != n))


def _class_root(root: Path) -> Path:
    """The folder that holds the class folders: root itself, or its single sub-folder."""
    subdirs = _subdirs(root)
    if len(subdirs) == 1 and not _has_images(subdirs[0]):
        return _class_root(subdirs[0])
    return root


def _unpack(archive: Path) -> Path:
    """Extract a .zip once into the cache and return the folder."""
    digest = hashlib.sha1(
        f"{archive.resolve()}:{archive.stat().st_size}:{archive.stat().st_mtime}".encode()
    ).hexdigest()[:12]
    dest = default_cache_dir() / "unpacked" / f"{archive.stem}-{digest}"
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
            _unpack_nested(tmp)
        # RuntimeError: an encrypted member; NotImplementedError: a compression method Python lacks
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DefungiError(
                f"{archive}: not a readable .zip archive ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "download it again"
            ) from None
        try:
            tmp.rename(dest)
        except OSError:  # another process unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _unpack_nested(folder: Path) -> None:
    """The UCI archive wraps the image archive in another .zip: extract those in place."""
    for inner in list(folder.rglob("*.zip")):
        with zipfile.ZipFile(inner) as zf:
            zf.extractall(inner.parent)
        inner.unlink()


def scan(root: str | Path, min_classes: int = 2) -> list[ImageRecord]:
    """All images under root/<class>/ (root may be a .zip); errors name the path and the fix.
    min_classes: 2 to train a classifier, 1 to evaluate one."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DefungiError(f"{root}: no such file or folder; pass --data DIR or run 'defungi data fetch'")
    root = root.resolve()
    if root.is_file():
        if root.suffix.lower() != ".zip":
            raise DefungiError(f"{root}: expected a folder of class folders or a .zip of one")
        root = _unpack(root)
    try:
        return _scan_tree(root, min_classes)
    except OSError as exc:  # a folder or file that cannot be listed (permissions, a vanished disk)
        raise DefungiError(
            f"{exc.filename or root}: cannot be read ({exc.strerror or type(exc).__name__}); "
            f"fix its permissions or move it out of {root}"
        ) from None


def _scan_tree(root: Path, min_classes: int) -> list[ImageRecord]:
    """scan's walk of an existing folder."""
    base = _class_root(root)
    class_dirs = sorted(_subdirs(base))
    nested = _trees(class_dirs)
    if nested:
        raise DefungiError(
            f"{base} holds several trees of class folders ({', '.join(nested)}); pass --data {base / nested[0]} "
            "(or another one of them)"
        )
    if not class_dirs:
        raise DefungiError(f"{base}: no class folders; expected {base}/<class>/<image files>")
    records: list[ImageRecord] = []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DefungiError(
                f"{class_dir}: class folder has no images (.jpg/.png/.tif/.bmp); add images or remove the folder"
            )
        records += [ImageRecord(f, class_dir.name, group_of(f, class_dir.name)) for f in files]
    if len(class_dirs) < min_classes:
        raise DefungiError(f"{base}: only one class folder ({class_dirs[0].name}); a classifier needs at least two")
    return records


def class_names(records: list[ImageRecord]) -> list[str]:
    """Sorted class names found in the records."""
    return sorted({r.label for r in records})


def _download(url: str, dest: Path) -> None:
    """Download url to dest with a progress bar, resuming a partial file."""
    part = dest.with_name(dest.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if done and response.status != 206:
            done = 0  # server ignored the range: start again
        total = int(response.headers.get("Content-Length", 0)) + done
        with (
            open(part, "ab" if done else "wb") as fh,
            tqdm(total=total or None, initial=done, unit="B", unit_scale=True, desc=dest.name) as bar,
        ):
            while chunk := response.read(1 << 20):
                fh.write(chunk)
                bar.update(len(chunk))
    part.rename(dest)


def verify_release(root: Path) -> dict[str, int]:
    """Check an extracted release: the five DeFungi classes and a plausible count per class."""
    records = scan(root)
    counts = {c: sum(r.label == c for r in records) for c in class_names(records)}
    missing = [c for c in DEFUNGI_CLASSES if c not in counts]
    if missing or sum(counts.values()) < DEFUNGI_MIN_IMAGES:
        raise DefungiError(
            f"{root}: incomplete DeFungi tree (classes {counts}); delete it and run 'defungi data fetch' again"
        )
    return counts


def _download_and_extract(url: str, archive: Path, tree: Path) -> None:
    """The release's archive (downloaded unless present) extracted to tree, through a unique
    temporary folder renamed into place."""
    if not archive.exists():
        try:
            _download(url, archive)
        except (urllib.error.URLError, OSError) as exc:
            raise DefungiError(
                f"cannot download {url} ({getattr(exc, 'reason', exc)}); download it by hand from "
                f"https://archive.ics.uci.edu/dataset/773/defungi, save it as {archive}, and run this again "
                "(or pass --data DIR to a local copy)"
            ) from None
    tmp = Path(tempfile.mkdtemp(dir=tree.parent, prefix=".images."))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        _unpack_nested(tmp)
        tmp.rename(tree)
    except zipfile.BadZipFile:
        archive.unlink()
        raise DefungiError(f"{archive}: corrupt download, removed; run 'defungi data fetch' again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(dest: str | Path | None = None, url: str | None = None) -> Path:
    """Download and extract the public DeFungi release (UCI id 773); returns the class-folder root."""
    dest = Path(dest) if dest else default_cache_dir() / "defungi"
    url = url or os.environ.get("DEFUNGI_URL", DEFUNGI_URL)
    tree = dest / "images"
    if tree.is_dir():
        verify_release(tree)
        return _class_root(tree)
    dest.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(dest / ".lock"):  # a second fetch waits, then finds the tree
        if not tree.is_dir():
            _download_and_extract(url, dest / "defungi.zip", tree)
    counts = verify_release(tree)
    log.info("DeFungi release ready in %s: %s", tree, counts)
    return _class_root(tree)


def resolve_data(path: str | None) -> Path:
    """--data, else $DEFUNGI_DATA, else the cached release, else fetch it."""
    chosen = path or os.environ.get("DEFUNGI_DATA")
    if chosen:
        root = Path(chosen).expanduser().absolute()
        if not root.exists():
            raise DefungiError(f"--data {root}: no such file or folder; pass --data DIR or run 'defungi data fetch'")
        return root
    return fetch()
