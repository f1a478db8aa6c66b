import numpy as np
import pytest
import torch
import torch.nn as nn

from defungi.train import loop
from defungi.train.loop import (
    Preprocess,
    TrainStep,
    autocast_dtype,
    batches,
    predict_proba,
    train_one_epoch,
)
from defungi.train.metrics import prior_weights


def _toy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64)
    images = np.where(labels[:, None, None, None] == 1, 200, 50).astype(np.uint8) + rng.integers(
        0, 20, (64, 8, 8, 3)
    ).astype(np.uint8)
    return images, labels


@pytest.mark.parametrize("native_bf16", [False, True])
def test_train_one_epoch_learns_and_predict_proba_sums_to_one(native_bf16: bool, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native_bf16)  # True: the bf16 autocast path
    images, labels = _toy()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    pre = Preprocess(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    step = TrainStep(opt, None, nn.CrossEntropyLoss(), torch.device("cpu"), amp=True)
    for _ in range(5):
        stats = train_one_epoch(model, batches(images, labels, np.arange(64), 16), 4, step, pre, lambda x, y: (x, y))
    assert stats["images"] == 64 and stats["accuracy"] > 0.9
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights in fp32
    probs = predict_proba(model, images, pre, torch.device("cpu"), tta=True, amp=True)
    assert probs.dtype == np.float32 and probs.shape == (64, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_autocast_dtype_only_where_it_is_faster(monkeypatch: pytest.MonkeyPatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(cpu, True) == torch.bfloat16 and autocast_dtype(cpu, False) is None
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype(cpu, True) is None


def test_preprocess_normalises_to_channels_last():
    x = Preprocess(4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).to_tensor(
        np.full((2, 4, 4, 3), 255, np.uint8), torch.device("cpu")
    )
    assert x.shape == (2, 3, 4, 4) and torch.allclose(x, torch.ones_like(x))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_per_image_normalisation_removes_a_colour_cast():
    rng = np.random.default_rng(0)
    texture = rng.integers(60, 120, (1, 8, 8, 3))
    pre = Preprocess(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), normalize="image")
    plain = pre.to_tensor(texture.astype(np.uint8), torch.device("cpu"))
    tinted = pre.to_tensor((texture + [80, 20, 0]).astype(np.uint8), torch.device("cpu"))
    assert torch.allclose(plain, tinted, atol=1e-5)
    assert torch.allclose(plain.mean((2, 3)), torch.zeros(1, 3), atol=1e-5)


def test_prior_weights_move_a_balanced_decision_towards_the_frequent_class():
    assert prior_weights(None, 0.5) is None and prior_weights([0.8, 0.2], 0) is None
    model = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 2))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)  # a model that cannot tell the classes apart: 0.5 / 0.5
    images, _ = _toy()
    pre = Preprocess(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    plain = predict_proba(model, images, pre, torch.device("cpu"))
    weighted = predict_proba(model, images, pre, torch.device("cpu"), class_weights=prior_weights([0.2, 0.8], 0.5))
    assert np.allclose(plain, 0.5)
    assert np.allclose(weighted, [1 / 3, 2 / 3]) and np.allclose(weighted.sum(1), 1)
