import base64
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from defungi.data.cache import decode_one
from defungi.serve.predict import NO_FUNGUS, NOT_MICROGRAPH
from defungi.serve.predictor import Predictor, Scores, torch_predictor
from defungi.serve.web import create_app
from tests.conftest import REAL_DATA, TinyRun, free_port, make_image

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _jpeg(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    make_image(np.random.default_rng(seed), 1, 40).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _huge_png(side: int = 20000) -> bytes:
    """A valid 1-bit side x side PNG (400 megapixels at 20000), a few tens of kB compressed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress((b"\x00" + b"\x00" * (side // 8)) * side, 9)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def client(tiny_run: TinyRun) -> TestClient:
    return TestClient(create_app(torch_predictor(tiny_run.run)))


def test_bad_uploads_get_a_message_each_and_the_server_keeps_serving(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    temp = tmp_path / "temp"  # where the uploads go for the time of a request
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    good = _jpeg()
    uploads = {
        "notes.txt": b"not an image at all\n",
        "empty.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "huge.png": _huge_png(),
        "good.jpg": good,
    }
    reply = client.post("/api/predict", files=[("files", (n, d)) for n, d in uploads.items()], data={"abstain": "0"})
    assert reply.status_code == 200
    shown = {i["name"]: i for i in reply.json()["images"]}
    assert shown["notes.txt"]["status"].startswith("not an image")
    assert shown["empty.jpg"]["status"] == "empty file (0 bytes)"
    assert shown["truncated.jpg"]["status"] == "unreadable or truncated image"
    assert shown["huge.png"]["status"].startswith("too many pixels")
    assert shown["good.jpg"]["class"] in ("H1", "H2", "H3") and shown["good.jpg"]["gradcam"].startswith(
        "data:image/png"
    )
    assert reply.json()["specimen"]["classified"] == 1 and reply.json()["specimen"]["images"] == 5
    many = client.post("/api/predict", files=[("files", (f"{i}.jpg", good)) for i in range(50)])
    assert many.status_code == 413 and many.json()["error"] == "50 files: at most 32 images of one specimen at a time"
    assert client.post("/api/predict", data={"abstain": "0.5"}).json()["error"].startswith("no file received")
    blank = io.BytesIO()
    Image.new("RGB", (40, 40), (128, 128, 128)).save(blank, format="PNG")
    after = client.post("/api/predict", files=[("files", ("blank.png", blank.getvalue())), ("files", ("ok.jpg", good))])
    assert after.status_code == 200 and after.json()["images"][0]["status"] == "no fungus visible"
    assert list(temp.iterdir()) == []  # every upload's temporary folder removed
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    refused = client.post("/api/predict", files=[("files", ("x.eps", eps))])  # nothing to classify: 422
    assert refused.status_code == 422 and "x.eps: not an image" in refused.json()["error"]
    huge = client.post("/api/predict", files=[("files", ("a.jpg", good))], headers={"content-length": str(2**30)})
    assert huge.status_code == 413 and huge.json()["error"].startswith("upload too large")


def test_answers_show_the_calibrated_confidence_beside_the_probability(client: TestClient):
    reply = client.post("/api/predict", files=[("files", (f"{i}.jpg", _jpeg(i))) for i in range(3)]).json()
    for image in reply["images"]:
        assert image["probability"] == image["probabilities"][image["class"]] == max(image["probabilities"].values())
    specimen = reply["specimen"]
    assert specimen["probability"] == max(specimen["probabilities"][c] for c in reply["classes"])
    assert 0 < specimen["confidence"] <= 1
    assert "path" not in specimen  # the uploads' temporary folder is nobody's
    page = client.get("/").text
    assert "<th>calibrated confidence</th><th>probability</th>" in page and "mean probability ${" in page


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(data_url: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB"))


def test_images_not_answered_show_their_thumbnail_and_why_with_their_figures(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A refused upload and a near-blank one: each its thumbnail (the pixels the model would see) and
    its reason with its score or variance; an answered one flagged unlike the training specimens says
    so; an unreadable one its reason alone; the message line counts each kind."""
    answer = Predictor.answer

    def scored(self: Predictor, images: np.ndarray, *args, **kwargs) -> Scores:  # the first refused, the second flagged
        return Scores(answer(self, images, *args, **kwargs).probabilities, np.r_[2.31, 1.21][: len(images)])

    monkeypatch.setattr(Predictor, "answer", scored)
    faint = np.clip(128 + np.random.default_rng(0).normal(0, 2, (40, 40, 3)), 0, 255).astype(np.uint8)
    uploads = {"photo.jpg": _jpeg(1), "odd.jpg": _jpeg(2), "faint.png": _png(faint), "notes.txt": b"text\n"}
    body = client.post("/api/predict", files=[("files", (n, d)) for n, d in uploads.items()]).json()
    refused, odd, blank, notes = body["images"]
    assert refused["status"] == NOT_MICROGRAPH and "class" not in refused
    assert refused["reason"] == "not a fungus micrograph (refusal score 2.31, refused over 1.5)"
    (tmp_path / "faint.png").write_bytes(uploads["faint.png"])
    size = _pixels(blank["image"]).shape[0]
    pixels, variance, _ = decode_one(tmp_path / "faint.png", size)
    assert 0 < variance < 15 and blank["status"] == NO_FUNGUS
    assert blank["reason"] == f"no fungus visible (grey variance {variance:.1f}, under the threshold 15)"
    assert np.array_equal(_pixels(blank["image"]), pixels)  # the upload as the model would see it
    (tmp_path / "photo.jpg").write_bytes(uploads["photo.jpg"])
    assert np.array_equal(_pixels(refused["image"]), decode_one(tmp_path / "photo.jpg", size)[0])
    assert odd["class"] and odd["flag"] == "unlike the training specimens (score 1.21): check it"
    assert "image" not in notes and notes["reason"].startswith("not an image")
    assert body["not_answered"] == {"refused as not a fungus micrograph": 1, "no fungus visible": 1,
                                    "could not be read": 1}  # fmt: skip
    assert body["specimen"]["refused"] == 1 and body["specimen"]["no_fungus"] == 1


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium/chromedriver (make test installs them)")
def test_page_in_headless_chromium_classifies_two_uploaded_images(tiny_run: TinyRun, tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if REAL_DATA.is_dir():  # two real DeFungi images where CI has them, else generated ones
        images = [sorted((REAL_DATA / c).iterdir())[0] for c in ("H1", "H2")]
    else:
        images = [tmp_path / f"H{i}_1a_1.jpg" for i in (1, 2)]
        for i, path in enumerate(images):
            path.write_bytes(_jpeg(i))
    images.append(tmp_path / "blank.png")  # not classified: its thumbnail and why, with its variance
    Image.new("RGB", (40, 40), (128, 128, 128)).save(images[-1])
    port = free_port()
    cmd = [sys.executable, "-m", "defungi.cli", "serve", str(tiny_run.run), "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(flag)
    for flag in ("--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium'}")
    options.add_argument("--window-size=1200,900")
    driver = None
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()
                time.sleep(0.5)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".image-row")) == 3)
        *shown, blank = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".image-row .class")]
        assert len(shown) == 2 and all(
            c in ("H1", "H2", "H3") or c.startswith("uncertain (most probable H") for c in shown
        )
        assert blank == "no fungus visible (grey variance 0.0, under the threshold 15)"
        message = driver.find_element(By.ID, "message").text
        assert message == "3 image(s) received; not classified: 1 no fungus visible (see below).", message
        decision = driver.find_element(By.ID, "decision").text
        assert decision.startswith("Specimen: ")
        assert re.search(r"calibrated confidence \d\.\d\d, mean probability \d\.\d\d", decision), decision
        for row in driver.find_elements(By.CSS_SELECTOR, ".image-row")[:2]:  # the class's probability, labelled
            probabilities = row.find_element(By.CSS_SELECTOR, ".probabilities").text
            highest = max(float(p) for p in re.findall(r"H\d (\d\.\d\d)", probabilities))
            assert float(row.find_element(By.CSS_SELECTOR, ".probability").text) == highest
            assert re.fullmatch(r"\d\.\d\d", row.find_element(By.CSS_SELECTOR, ".confidence").text)
        headers = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#results th")]
        assert headers[3:5] == ["calibrated confidence", "probability"]
        assert len(driver.find_elements(By.CSS_SELECTOR, ".image-row img")) == 5  # each image, its map; the blank
        screenshot = Path(os.environ.get("DEFUNGI_SCREENSHOT", tmp_path / "page.png"))
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
