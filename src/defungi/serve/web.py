"""A local web page for one specimen at a time (FastAPI): drop its images, see each image's class,
probabilities and class activation map (HiResCAM), and the specimen's decision with its calibrated confidence
beside its mean probability."""

from __future__ import annotations

import base64
import io
import ipaddress
import logging
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from defungi.data.cache import check_shape, decode_one
from defungi.errors import DefungiError
from defungi.results.answers import ImageAnswer
from defungi.results.trust import DEFAULT_ABSTAIN, DEFAULT_COVERAGE
from defungi.serve.explain import Explained, explained
from defungi.serve.predict import NO_FUNGUS, NOT_MICROGRAPH, Answers, by_specimen, flag, reason
from defungi.serve.predictor import Predictor, torch_predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may upload (a decompression bomb is refused before it is decoded)."""

    files: int = 32
    bytes_per_file: int = 20 * 2**20
    bytes_total: int = 200 * 2**20  # one request, refused by its Content-Length before it is read
    pixels: int = 40_000_000


OPENED = ["JPEG", "PNG", "TIFF", "BMP"]  # the Pillow decoders an upload may reach
FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "TIFF": ".tif", "BMP": ".bmp"}  # MPO: a camera's JPEG


class Unusable(ValueError):
    """No upload of a request can be classified: the request is answered 422."""


def screen(data: bytes, limits: Limits) -> tuple[str | None, str]:
    """(why an upload cannot be classified, or None; the file suffix of its format), from its
    header alone: nothing is decoded here, and only JPEG, PNG, TIFF and BMP are opened at all."""
    if not data:
        return "empty file (0 bytes)", ""
    if len(data) > limits.bytes_per_file:
        return f"file too large (over {limits.bytes_per_file // 2**20} MB)", ""
    try:
        with Image.open(io.BytesIO(data), formats=OPENED) as image:
            (width, height), suffix = image.size, FORMATS[image.format]
    except Image.DecompressionBombError:
        return f"too many pixels (the limit is {limits.pixels / 1e6:.0f} megapixels)", ""
    except (OSError, ValueError, SyntaxError, KeyError):
        return "not an image (JPEG, PNG, TIFF or BMP expected)", ""
    if width * height > limits.pixels:
        return f"too many pixels ({width}×{height}; the limit is {limits.pixels / 1e6:.0f} megapixels)", ""
    if (why := check_shape(width, height)) is not None:
        return f"not a micrograph's shape ({why})", ""
    return None, suffix


def png_data_url(pixels: np.ndarray) -> str:
    """An RGB array as a data: URL the page can show."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def answer(model: Predictor, uploads: list[tuple[str, bytes]], answers: Answers, limits: Limits) -> dict[str, Any]:
    """The page's answer: a row per upload (its thumbnail at the model's input size where it decoded;
    class, calibrated confidence and the class's probability, probabilities, its map and its flag when
    unlike the training specimens; or why not, with its figures), the specimen's decision and how many
    were not answered, by why. Uploads are written to a temporary folder that is removed afterwards."""
    screened = [screen(data, limits) for _, data in uploads]
    refused = {i: why for i, (why, _) in enumerate(screened) if why}
    if len(refused) == len(uploads):
        reasons = "; ".join(f"{name}: {refused[i]}" for i, (name, _) in enumerate(uploads))
        raise Unusable(f"no image can be classified ({reasons})")
    with tempfile.TemporaryDirectory(prefix="defungi-upload-") as tmp:
        paths = {}
        for i, (_, data) in enumerate(uploads):
            if i not in refused:
                paths[i] = Path(tmp) / f"{i:03d}{screened[i][1]}"  # our name: the client's is only shown
                paths[i].write_bytes(data)
        listed = explained(model, list(paths.values()), answers=answers) if paths else []
        done = {Path(e.answer.path): e for e in listed}
        for path, e in done.items():
            if e.image is None and e.answer.error is None:  # no fungus visible (never classified): shown all the same
                e.image = decode_one(path, model.image_size)[0]
    images: list[dict[str, Any]] = []
    rows: list[ImageAnswer] = []
    for i, (name, _) in enumerate(uploads):
        e = Explained(ImageAnswer("", error=refused[i])) if i in refused else done[paths[i]]
        row = replace(e.answer, path=f"specimen/{i}")  # one made-up folder: the uploads are one specimen
        if row.error and i not in refused:
            row.error = "unreadable or truncated image"
        shown: dict[str, Any] = {"name": name, "status": row.error or row.status or ""}
        shown |= {"image": png_data_url(e.image)} if e.image is not None else {}
        if row.class_ is not None and e.overlay is not None:
            shown |= {"class": row.class_, "decision": row.decision, "confidence": row.confidence}
            shown |= {"probability": row.probability, "set": row.set, "probabilities": row.probabilities}
            shown |= {"gradcam": png_data_url(e.overlay), "flag": flag(row)}  # flag: '' unless unlike the training
        else:
            shown["reason"] = reason(row)
        images.append(shown)
        rows.append(row)
    specimen = by_specimen(rows, model, answers, group_by="folder")
    hidden = ("rows", "specimen", "path", "label")  # path: the made-up folder of the uploads
    decision = {k: v for k, v in specimen[0].to_json().items() if k not in hidden} if images else {}
    return {
        "classes": model.classes,
        "images": images,
        "specimen": decision,
        "note": answers.note(),
        "not_answered": not_answered(rows),
    }


def not_answered(rows: list[ImageAnswer]) -> dict[str, int]:
    """How many images were not answered, by why (the page's message line counts each): refused as not a
    fungus micrograph, no fungus visible, could not be read; only the reasons that occur."""
    why = {NOT_MICROGRAPH: f"refused as {NOT_MICROGRAPH}", NO_FUNGUS: NO_FUNGUS}
    unread = "could not be read"
    counts = Counter(why.get(row.status or "", unread) for row in rows if row.class_ is None)
    return {kind: counts[kind] for kind in [*why.values(), unread] if counts[kind]}


def create_app(model: Predictor, limits: Limits = Limits()) -> FastAPI:
    """The FastAPI application: the page at /, the answer at POST /api/predict, /health."""
    app = FastAPI(title="defungi", docs_url=None, redoc_url=None)
    page = files("defungi.serve").joinpath("static/index.html").read_text()
    lock = threading.Lock()  # one request at a time on the model (the maps hook into it)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "classes": model.classes, "no_fungus": NO_FUNGUS}

    @app.get("/api/model")
    def card() -> dict[str, Any]:
        """What answers: the model card, the sets' levels and the page's defaults (shared with the CLI)."""
        levels = sorted({s.level for s in model.trust.sets}) if model.trust else []
        summary = model.card.summary() if model.card else "a model with no held-out measurement (no test part)"
        return {"card": summary, "levels": levels, "coverage": DEFAULT_COVERAGE, "abstain": DEFAULT_ABSTAIN}

    @app.post("/api/predict")
    async def predict(request: Request) -> JSONResponse:
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > limits.bytes_total:
            return _refuse(f"upload too large (over {limits.bytes_total // 2**20} MB in all); send fewer files", 413)
        try:
            async with request.form(max_files=10 * limits.files) as form:
                files = [u for u in form.getlist("files") if hasattr(u, "read")]
                if len(files) > limits.files:
                    return _refuse(f"{len(files)} files: at most {limits.files} images of one specimen at a time", 413)
                cap = limits.bytes_per_file + 1  # enough to tell that a file is too large, never more in memory
                uploads = [(u.filename or "unnamed", await u.read(cap)) for u in files]
                settings = {k: _share(str(form.get(k, ""))) for k in ("coverage", "abstain", "target_accuracy")}
        except HTTPException as exc:  # the multipart parser's refusals (too many parts, a malformed body)
            return _refuse(f"upload refused: {exc.detail}", 400)
        if not uploads:
            return _refuse("no file received; pick or drop images of one specimen", 400)
        try:
            answers = Answers.of(
                model,
                settings["coverage"] or DEFAULT_COVERAGE,
                settings["abstain"] or DEFAULT_ABSTAIN,
                settings["target_accuracy"],
            )
        except DefungiError as exc:
            return _refuse(str(exc).replace("--", ""), 400)

        return await _answered(lambda: answer(model, uploads, answers, limits), lock)

    return app


async def _answered(work: Callable[[], dict[str, Any]], lock: threading.Lock) -> JSONResponse:
    """work's answer, computed in a worker thread under lock: 422 when no upload can be classified,
    500 (and the server keeps serving) when answering failed."""

    def locked() -> dict[str, Any]:
        with lock:
            return work()

    try:
        return JSONResponse(await run_in_threadpool(locked))
    except Unusable as exc:
        return _refuse(str(exc), 422)
    except Exception as exc:  # noqa: BLE001 - the page shows a line; the server keeps serving
        log.exception("answering an upload failed")
        return _refuse(f"internal error ({type(exc).__name__}); the server log has the details", 500)


def _refuse(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _share(text: str) -> float | None:
    """A share from the page's form (0..1), None when missing or not a number."""
    return min(max(float(text), 0.0), 1.0) if re.fullmatch(r"\d*\.?\d+", text.strip()) else None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the page for the run's model until interrupted (loopback only unless host says otherwise)."""
    import uvicorn

    if host != "localhost" and not _loopback(host):
        log.warning("listening on %s: anyone who can reach this address can use the page", host)
    app = create_app(torch_predictor(run_dir))
    log.info("open http://%s:%d/ in a browser", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
