"""A frozen backbone's pass: every reading from one forward pass, the same on both engines, cached per image."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import defungi.train.frozen as frozen_module
from defungi.data.scan import default_cache_dir
from defungi.data.store import KEY_DTYPE, content_key
from defungi.models import create_model
from defungi.train.frozen import BATCH, ENGINE_ENV, FrozenPass, OnnxEngine, Readings, engine_rates, export_readings
from defungi.train.loop import Preprocess, hooked_inputs, image_inputs
from defungi.train.ood import Reading

MIXER = {"dim": 8, "depth": 2, "kernel_size": 3, "patch_size": 4}
PRE = Preprocess(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
READINGS = [Reading("blocks.0", "channel means"), Reading("head", "input")]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("convmixer", num_classes=3, **MIXER).eval()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def _keys(images: np.ndarray) -> np.ndarray:
    return np.array([content_key(image.tobytes()) for image in images], dtype=KEY_DTYPE)


def _pass(model: nn.Module, readings: list[Reading] = READINGS) -> FrozenPass:
    return FrozenPass(model, "convmixer-tiny", readings, PRE, torch.device("cpu"), trained=model.head)


def test_one_pass_reads_every_reading_as_separate_passes_would_and_stops_at_the_last(
    monkeypatch: pytest.MonkeyPatch,
):
    model, images = _model(), _images(10)
    monkeypatch.setattr(model.head, "forward", lambda x: pytest.fail("the head ran: the pass should stop before it"))
    together = Readings(model, READINGS, PRE, channels_last=True)(torch.from_numpy(images))
    cpu = torch.device("cpu")
    for reading, got in zip(READINGS, together, strict=True):
        alone = hooked_inputs(model, [reading.hook(model)], image_inputs(images, PRE, cpu, 4), 3, cpu)[0]
        assert np.allclose(got.detach().numpy(), alone, atol=1e-6)


def test_the_readings_come_back_in_forward_order_whatever_order_asked():
    assert _pass(_model(), READINGS[::-1]).readings == READINGS


def test_onnxruntime_reads_what_torch_reads(tmp_path: Path):
    model, images = _model(), _images(12)
    module = Readings(model, READINGS, PRE, channels_last=True)
    export_readings(module, tmp_path / "r.onnx", 16)
    on_ort = OnnxEngine(tmp_path / "r.onnx", threads=1)(images)
    with torch.no_grad():
        on_torch = [r.numpy() for r in module(torch.from_numpy(images))]
    for a, b in zip(on_ort, on_torch, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_cached_readings_equal_fresh_ones_and_only_new_images_are_computed(
    engine: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(ENGINE_ENV, engine)
    model, images = _model(), _images(20)
    backbone, passed = _pass(model), []
    real = FrozenPass.run
    monkeypatch.setattr(FrozenPass, "run", lambda self, batches, n, desc="": passed.append(n) or real(self, batches, n))
    keys = _keys(images)
    first = backbone.cached(images[:12], keys[:12])
    assert backbone.engine.name == engine and passed == [1]
    for a, b in zip(first, backbone.of(images[:12]), strict=True):
        assert np.abs(a - b).max() < 1e-5
    counted: list[int] = []
    again = backbone.cached(images, keys, computed=counted.append)  # 8 images added
    assert counted == [8] and backbone.missing(keys) == 0
    moved = np.concatenate([images[5:], images[:5]])  # renamed and reordered: the content is the key
    reordered = backbone.cached(moved, np.concatenate([keys[5:], keys[:5]]), computed=counted.append)
    assert counted == [8]
    for a, b in zip(again, reordered, strict=True):
        assert np.array_equal(np.concatenate([a[5:], a[:5]]), b)


def test_the_key_changes_with_the_frozen_weights_the_view_and_the_preprocessing():
    model = _model()
    base = _pass(model)
    key = base.reading_key(READINGS[0])
    assert base.reading_key(READINGS[0], view=1) != key
    assert FrozenPass(model, "convmixer-tiny", READINGS, PRE, torch.device("cpu")).reading_key(READINGS[0]) != key
    with torch.no_grad():
        model.head.weight.add_(1)  # the part that trains: not a key of the frozen part
    assert _pass(model).reading_key(READINGS[0]) == key
    with torch.no_grad():
        model.stem[0].weight.add_(1)
    assert _pass(model).reading_key(READINGS[0]) != key
    other = Preprocess(16, (0.4, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert FrozenPass(model, "convmixer-tiny", READINGS, other, torch.device("cpu")).reading_key(READINGS[0]) != key


def test_the_faster_engine_is_measured_once_per_machine_and_remembered(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENGINE_ENV, raising=False)
    rates = iter([20.0, 10.0])  # onnxruntime on a batch, then torch on an eighth of it
    monkeypatch.setattr(frozen_module, "images_per_s", lambda engine, images, repeats=3: next(rates))
    assert _pass(_model()).engine.name == "onnxruntime"  # torch 10, onnxruntime 20 images/s
    (choice,) = json.loads((default_cache_dir() / "engines" / "choices.json").read_text()).values()
    assert choice == {"torch": 10.0, "onnxruntime": 20.0, "torch_batch": BATCH // 8, "onnxruntime_calls": 1}
    again = _pass(_model()).engine
    assert again.name == "onnxruntime"  # remembered: measuring again would exhaust rates
    assert again is _pass(_model()).engine  # and its session opened once, kept warm for the next pass
    monkeypatch.setenv(ENGINE_ENV, "torch")
    assert _pass(_model()).engine.name == "torch"


@pytest.mark.parametrize(
    "rates, expected, timed_on",
    [
        # onnxruntime 20 on one call against torch 10 on an eighth of a batch: clear, settled
        (
            [20.0, 10.0],
            {"onnxruntime": 20.0, "torch": 10.0, "torch_batch": BATCH // 8, "onnxruntime_calls": 1},
            [32, 4],
        ),
        # 20 against 15: not clear, onnxruntime on three calls (22), faster still
        (
            [20.0, 15.0, 22.0],
            {"onnxruntime": 22.0, "torch": 15.0, "torch_batch": BATCH // 8, "onnxruntime_calls": 3},
            [32, 4, 32],
        ),
        # 20 against 30 on an eighth: onnxruntime on three calls (21), then torch on a whole batch (15)
        (
            [20.0, 30.0, 21.0, 15.0],
            {"onnxruntime": 21.0, "torch": 15.0, "torch_batch": BATCH, "onnxruntime_calls": 3},
            [32, 4, 32, 32],
        ),
    ],
)
def test_an_unclear_choice_is_timed_again_on_more_calls_and_images(
    monkeypatch: pytest.MonkeyPatch, rates: list[float], expected: dict[str, float], timed_on: list[int]
):
    sizes: list[int] = []
    left = iter(rates)

    def timed(engine: object, images: np.ndarray, repeats: int = 3, warm: bool = False) -> float:
        sizes.append(len(images))
        return next(left)

    monkeypatch.setattr(frozen_module, "images_per_s", timed)
    on = SimpleNamespace(name="onnxruntime"), SimpleNamespace(name="torch")
    images = np.zeros((BATCH, 8, 8, 3), np.uint8)
    assert engine_rates(on[1], on[0], images) == expected
    assert sizes == timed_on


def test_a_long_torch_pass_chooses_its_threads_again_every_few_batches(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ENGINE_ENV, "torch")
    calls: list[int] = []
    monkeypatch.setattr(frozen_module.Threads, "choose", lambda self: calls.append(1) or 1)
    images = _images(frozen_module.BATCH * (frozen_module.PACE + 1))
    backbone = _pass(_model())
    paced = backbone.of(images)
    assert len(calls) == 2  # before the first batch and the PACE-th
    monkeypatch.setattr(frozen_module, "PACE", 10_000)
    assert all(np.array_equal(a, b) for a, b in zip(paced, backbone.of(images), strict=True))
