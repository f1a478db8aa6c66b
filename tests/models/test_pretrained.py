import csv
import dataclasses
import json
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from defungi.cli import main
from defungi.errors import DefungiError
from defungi.experiments import fit as fit_module
from defungi.models import create_model, registry
from defungi.models.efficientnet import INPUT_SIZES, lite_imagenet, timm_name, weights_file
from defungi.models.pretrained import imagenet_state_dict, load_backbone, read_weights, tail_from
from defungi.models.registry import Pretrained, model_entry
from defungi.train.frozen import FrozenPass

TINY_MIXER = {"dim": 8, "depth": 1, "kernel_size": 3, "patch_size": 4}


@pytest.mark.parametrize("variant", sorted(INPUT_SIZES))
def test_lite_package_weights_map_one_to_one_onto_timm_and_match_the_reference_network(variant: int):
    state = lite_imagenet(variant)
    target = timm.create_model(timm_name(variant), pretrained=False).state_dict()
    assert list(state) == [k for k in target if not k.endswith("num_batches_tracked")]
    assert all(state[k].shape == target[k].shape for k in state)
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    ref = reference.EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=weights_file(variant))
    ours = timm.create_model(timm_name(variant), pretrained=False)
    ours.load_state_dict(state, strict=False)
    # the reference pads for its native side (static 'same' padding): compare there
    side = INPUT_SIZES[variant]
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref.eval()(x), ours.eval()(x))


@pytest.mark.parametrize("variant", sorted(INPUT_SIZES))
def test_lite_backbone_loads_and_its_head_is_replaced(variant: int):
    name = f"efficientnet-lite{variant}"
    model = create_model(name, num_classes=5)
    load_backbone(model, name, imagenet_state_dict(name), name)
    assert model.classifier.out_features == 5 and not model.classifier.weight.any()
    assert torch.equal(model.conv_stem.weight, lite_imagenet(variant)["conv_stem.weight"])


def test_imagenet_weights_load_once_for_builds_of_the_same_model_each_in_a_dict_of_its_own():
    first = imagenet_state_dict("efficientnet-lite0")
    key = next(iter(first))
    first.pop(key)
    again = imagenet_state_dict("efficientnet-lite0")
    assert key in again and all(again[k] is v for k, v in first.items())  # the same tensors, not read again


def test_a_state_dict_from_a_file_fills_the_backbone_not_the_head(tmp_path: Path):
    source = create_model("convmixer", num_classes=1000, **TINY_MIXER)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    model = create_model("convmixer", num_classes=5, **TINY_MIXER)
    load_backbone(model, "convmixer", read_weights(tmp_path / "w.pth"), "w.pth")
    assert torch.equal(model.stem[0].weight, source.stem[0].weight) and model.head.out_features == 5
    assert not model.head.weight.any() and not model.head.bias.any()  # a new head, every class equally likely
    wide = create_model("convmixer", num_classes=5, **{**TINY_MIXER, "dim": 16})
    with pytest.raises(DefungiError, match="of another shape, e.g. stem.0.weight"):
        load_backbone(wide, "convmixer", read_weights(tmp_path / "w.pth"), "w.pth")


def test_offline_imagenet_weights_are_one_line(
    monkeypatch: pytest.MonkeyPatch, tiny_data: Path, tmp_path: Path, capsys
):
    def offline():
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    entry = model_entry("resnet18")
    monkeypatch.setitem(registry._REGISTRY, "resnet18", dataclasses.replace(entry, pretrained=Pretrained(offline)))
    argv = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--model", "resnet18", "--pretrained"]
    assert main([*argv, "--image-size", "16", "--epochs", "1", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "could not load the ImageNet weights of 'resnet18' (URLError" in err and "--weights PATH" in err


def test_wrong_shaped_weights_are_one_line(tiny_data: Path, tmp_path: Path, capsys):
    torch.save(create_model("convmixer", num_classes=5, **{**TINY_MIXER, "dim": 16}).state_dict(), tmp_path / "w.pt")
    argv = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--model", "convmixer"]
    argv += ["--set", f"train.model_args={json.dumps(TINY_MIXER)}", "--weights", str(tmp_path / "w.pt")]
    assert main([*argv, "--image-size", "16", "--epochs", "1", "--batch-size", "8"]) == 2
    assert "does not fit this model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "at", "kind", "length"),
    [
        ("efficientnet-lite0", "blocks.5", torch.nn.Sequential, 7),  # blocks.5-6, conv_head, bn2, pool, flatten, head
        ("efficientnet-lite0", "classifier", torch.nn.Linear, None),
        ("resnet18", "layer4", torch.nn.Sequential, 4),  # layer4, avgpool, flatten, fc
        ("convmixer", "blocks.1", torch.nn.Sequential, 5),  # blocks.1, global_pool, head_drop, flatten, head
        ("convnext_atto", "stages.3", torch.nn.Sequential, 3),  # stages.3, norm_pre, head (it pools and flattens)
        ("convnext_atto", "head.fc", torch.nn.Linear, None),  # a classifier inside the head module
    ],
)
def test_the_tail_from_a_module_computes_what_the_whole_model_computes_from_there(model, at, kind, length):
    net = create_model(model, num_classes=5, **({**TINY_MIXER, "depth": 2} if model == "convmixer" else {})).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tail = tail_from(net, model, at, x[:2])
    assert isinstance(tail, kind) and (length is None or len(tail) == length)
    inputs = []
    net.get_submodule(at).register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        out = net(x)
        assert torch.allclose(tail(inputs[0]), out, atol=1e-5)


@pytest.mark.parametrize(
    ("at", "needle"),
    [
        ("blocks.9", "train.train_from 'blocks.9': blocks has no part '9'; use one of 0, 1"),
        ("blocks.5.0.conv_dw", "the parts of blocks.5.0 do not run in order"),
        ("nowhere", "efficientnet-lite0 splits at blocks, conv_head, classifier (or inside one that is a sequence)"),
        ("bn1", "efficientnet-lite0 splits at blocks, conv_head"),  # there, but not declared to run in order
    ],
)
def test_a_tail_from_a_module_that_is_not_there_or_not_in_order_is_refused(at: str, needle: str):
    net = create_model("efficientnet-lite0", num_classes=5)
    with pytest.raises(DefungiError, match=re.escape(needle)):
        tail_from(net, "efficientnet-lite0", at, torch.zeros(2, 3, 32, 32))


# tta with all 8 views cached: scored from the cache, averaged as predict averages the flips of the images
@pytest.mark.parametrize(("train_from", "views", "tta"), [("", 1, False), ("blocks.1", 2, False), ("", 8, True)])
def test_a_frozen_backbone_run_predicts_what_it_scored(
    train_from: str, views: int, tta: bool, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    mixer = {**TINY_MIXER, "depth": 2}
    start = create_model("convmixer", num_classes=1000, **mixer).state_dict()
    torch.save(start, tmp_path / "w.pt")
    computed = []
    real = FrozenPass.run
    monkeypatch.setattr(FrozenPass, "run", lambda *a, **k: computed.append(1) or real(*a, **k))
    monkeypatch.setattr(fit_module, "_evaluate", lambda *a, **k: pytest.fail("scored on the images, not the cache"))
    argv = ["train", "--data", str(tiny_data), "--model", "convmixer", "--weights", str(tmp_path / "w.pt")]
    argv += ["--set", f"train.model_args={json.dumps(mixer)}", "--set", "train.freeze_backbone=true"]
    argv += [
        "--set",
        f"train.train_from={train_from}",
        "--set",
        "data.normalize=pretrained",
        "--set",
        f"train.tta={str(tta).lower()}",
    ]
    argv += ["--image-size", "16", "--epochs", "3", "--batch-size", "8", "--set", f"train.cached_views={views}"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--cv", "2"]) == 0
    assert computed == [1] * views  # both folds trained on one computation of the frozen part's output per view
    fold = tmp_path / "run" / "fold-0"
    trained = torch.load(fold / "last.pt", weights_only=True)["state_dict"]
    frozen = ("stem.", "blocks.0.") if train_from else ("stem.", "blocks.")
    for name, value in trained.items():
        if name.endswith(("weight", "bias")) and not name.startswith("head."):
            assert torch.equal(value, start[name]) == name.startswith(frozen), name
    with open(fold / "predictions_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    capsys.readouterr()
    assert main(["predict", str(fold), *[r["path"] for r in rows], "--format", "json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    for row, again in zip(rows, predicted, strict=True):
        assert np.allclose(
            [float(row[f"p_{c}"]) for c in ("H1", "H2", "H3")],
            [again["probabilities"][c] for c in ("H1", "H2", "H3")],
            atol=1e-5,
        )
    (tmp_path / "w.pt").unlink()  # the run holds its weights: the file it started from is not needed any more
    assert main(["predict", str(tmp_path / "run"), rows[0]["path"]]) == 0
    checkpoint = torch.load(fold / "last.pt", weights_only=True)
    assert checkpoint["preprocess"]["normalize"] == "pretrained" and checkpoint["preprocess"]["mean"] == [
        0.485,
        0.456,
        0.406,
    ]
