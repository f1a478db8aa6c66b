import numpy as np
import pytest
import torch
import torch.nn as nn

from defungi.stats.metrics import prior_weights
from defungi.train import loop
from defungi.train.loop import (
    Batch,
    Preprocess,
    TrainStep,
    autocast_dtype,
    batches,
    feature_batches,
    feature_rows,
    hooked_inputs,
    image_batches,
    image_inputs,
    predict_proba,
    probabilities,
    train_one_epoch,
)

_PRE = Preprocess(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


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
        source = image_batches(batches(images, labels, np.arange(64), 16), pre, torch.device("cpu"))
        stats = train_one_epoch(model, source, 4, step)
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


class RecordingScaler(torch.amp.GradScaler):
    """A CPU loss scaler that records what the loop asks of it."""

    def __init__(self) -> None:
        super().__init__("cpu", init_scale=1024.0)
        self.calls: list[str] = []

    def scale(self, outputs: torch.Tensor) -> torch.Tensor:
        self.calls.append("scale")
        return super().scale(outputs)

    def step(self, optimizer: torch.optim.Optimizer) -> float | None:
        self.calls.append("step")
        return super().step(optimizer)

    def update(self, new_scale: float | None = None) -> None:
        self.calls.append("update")
        super().update(new_scale)


def _features(n: int = 64, dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cached-feature-like rows (float32) of two classes apart along one direction."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return (rng.normal(0, 1, (n, dim)) + 2.0 * labels[:, None]).astype(np.float32), labels


def _source(kind: str, order: np.ndarray, batch_size: int = 16):
    """A batch source of either kind over the same images: uint8 images, or features of them."""
    cpu = torch.device("cpu")
    if kind == "images":
        images, labels = _toy()
        return image_batches(batches(images, labels, order, batch_size, drop_last=True), _PRE, cpu)
    features, labels = _features()
    return feature_batches([features], labels, order, np.zeros(len(order), dtype=int), batch_size, cpu)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "images":
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    return nn.Linear(6, 2)  # the tail on cached features: here a head


@pytest.mark.parametrize("kind", ["images", "features"])
def test_the_one_loop_trains_either_batch_source_and_its_loss_goes_down(kind: str):
    model = _model(kind)
    step = TrainStep(torch.optim.SGD(model.parameters(), lr=0.1), None, nn.CrossEntropyLoss(), torch.device("cpu"))
    losses = [train_one_epoch(model, _source(kind, np.arange(64)), 4, step)["loss"] for _ in range(6)]
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("kind", ["images", "features"])
def test_the_loop_scales_the_loss_of_either_batch_source_when_the_scaler_is_on(kind: str):
    model = _model(kind)
    scaler = RecordingScaler()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    step = TrainStep(opt, schedule, nn.CrossEntropyLoss(), torch.device("cpu"), scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(model, _source(kind, np.arange(64)), 4, step)
    assert scaler.calls == ["scale", "step", "update"] * 4 and stats["images"] == 64
    assert schedule.last_epoch == 4 and all(
        not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
    )
    # the scaled gradients were unscaled before the step: the same step as without a scaler
    plain = _model(kind)
    unscaled = TrainStep(torch.optim.SGD(plain.parameters(), lr=0.1), None, nn.CrossEntropyLoss(), torch.device("cpu"))
    train_one_epoch(plain, _source(kind, np.arange(64)), 4, unscaled)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(model.parameters(), plain.parameters(), strict=True))


def test_image_and_feature_sources_give_the_loop_the_same_kind_of_batches():
    order = np.random.default_rng(1).permutation(64)[:50]  # 3 whole batches of 16; the last 2 are dropped
    image, feature = list(_source("images", order)), list(_source("features", order))
    assert len(image) == len(feature) == 3
    for a, b in zip(image, feature, strict=True):
        assert isinstance(a, Batch) and isinstance(b, Batch)
        assert a.inputs.dtype == b.inputs.dtype == torch.float32 and len(a.inputs) == len(b.inputs) == 16
        assert a.targets.dtype == b.targets.dtype == a.labels.dtype == b.labels.dtype == torch.int64
    _, labels = _features()
    # a feature batch holds its images in index order (local reads); together they are the order's first 48
    indices = [np.sort(order[i : i + 16]) for i in range(0, 48, 16)]
    assert all(torch.equal(b.labels, torch.from_numpy(labels[i])) for b, i in zip(feature, indices, strict=True))


def test_feature_rows_take_each_image_from_its_own_view():
    views = [np.full((5, 2), v, dtype=np.float32) for v in range(3)]
    rows = feature_rows(views, np.array([4, 0, 2]), torch.device("cpu"), np.array([2, 0, 1]))
    assert rows[:, 0].tolist() == [2, 0, 1]


def _read(model: nn.Module, module: nn.Module, images: np.ndarray, means: bool = False) -> np.ndarray:
    cpu = torch.device("cpu")
    return hooked_inputs(model, [(module, means)], image_inputs(images, _PRE, cpu, 16, True), 4, cpu)[0]


def test_probabilities_of_a_head_on_its_cached_inputs_are_those_of_the_whole_model():
    images, _ = _toy()
    model = _model("images").eval()
    features = _read(model, model[3], images)
    whole = predict_proba(model, images, _PRE, torch.device("cpu"), batch_size=16)
    idx = np.arange(64)
    cached = probabilities(
        model[3],
        (feature_rows([features], idx[s : s + 16], torch.device("cpu")) for s in range(0, 64, 16)),
        4,
        torch.device("cpu"),
    )
    assert np.allclose(whole, cached, atol=1e-6)


def test_one_pass_reads_several_modules_as_passes_of_their_own_and_stops_at_the_last():
    images, _ = _toy()
    model = _model("images").eval()
    cpu = torch.device("cpu")
    alone = [_read(model, model[0], images, means=True), _read(model, model[3], images)]
    head_calls: list[int] = []
    model[3].register_forward_hook(lambda *_: head_calls.append(1))
    together = hooked_inputs(
        model, [(model[0], True), (model[3], False)], image_inputs(images, _PRE, cpu, 16, True), 4, cpu
    )
    assert [r.shape for r in together] == [(64, 4), (64, 4)]
    assert all(np.allclose(a, t, atol=1e-6) for a, t in zip(alone, together, strict=True))
    assert not head_calls  # the pass stopped where the last reading lies, before the head ran
    with pytest.raises(ValueError, match="not each reached once before the last"):  # the last reached first
        hooked_inputs(model, [(model[3], False), (model[0], True)], image_inputs(images, _PRE, cpu, 16, True), 4, cpu)
    assert hooked_inputs(model, [], image_inputs(images, _PRE, cpu, 16, True), 4, cpu) == []
