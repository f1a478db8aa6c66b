import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defungi.cli import main
from defungi.errors import DefungiError
from defungi.layout import read_table
from defungi.models import create_model, model_entry
from defungi.models.pretrained import imagenet_state_dict, load_backbone

PAIR = "efficientnet-lite0+efficientnet-lite1"  # 224 and 240 px: the smallest pair with two sides


def _seen_sides(model: torch.nn.Module, side: int) -> list[int]:
    """The input side each member receives for an input of side x side."""
    sides: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: sides.append(args[0].shape[-1])) for m in model.members]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, side, side))
    for hook in hooks:
        hook.remove()
    return sides


def test_the_entry_takes_the_largest_side_and_the_first_members_maps():
    entry = model_entry(PAIR)
    assert (entry.input_size, entry.normalization) == (240, ((0.5,) * 3, (0.5,) * 3))
    parts = entry.parts
    assert (parts.classifier, parts.features, parts.middle, parts.split_points) == (
        "classifier",
        "members.0.bn2",
        "members.0.blocks.3",
        ("classifier",),
    )


def test_each_member_reads_the_input_at_its_own_side_and_the_head_reads_both():
    model = create_model(PAIR, num_classes=5, pool_border=0.15)
    assert model.classifier.in_features == 2 * 1280 and model.classifier.out_features == 5
    assert _seen_sides(model, 240) == [224, 240]
    assert _seen_sides(model, 120) == [112, 120]  # another input side: scaled alike
    pooled = []
    for member in model.members:
        member.register_forward_hook(lambda _m, _i, out: pooled.append(out))
    x = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(x)
    assert torch.allclose(out, model.classifier(torch.cat(pooled, 1)))
    assert model.members[1].global_pool.border == 0.15  # model_args reach every member


def test_imagenet_weights_fill_every_member_and_only_the_head_starts_new():
    model = create_model(PAIR, num_classes=5)
    load_backbone(model, PAIR, imagenet_state_dict(PAIR), "test")
    lite1 = create_model("efficientnet-lite1", num_classes=5)
    load_backbone(lite1, "efficientnet-lite1", imagenet_state_dict("efficientnet-lite1"), "test")
    assert torch.equal(model.members[1].conv_stem.weight, lite1.conv_stem.weight)
    assert not model.classifier.weight.any()
    x = torch.randn(1, 3, 240, 240, generator=torch.Generator().manual_seed(1))
    lite1.reset_classifier(0)
    with torch.no_grad():  # the second member computes what Lite1 alone computes at its side
        assert torch.allclose(model.members[1].eval()(x), lite1.eval()(x), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "needle"),
    [("convmixer+efficientnet-lite0", "ImageNet weights"), ("efficientnet-lite0+resnet34", "normalisations")],
)
def test_members_without_weights_or_of_other_normalisations_are_refused(name: str, needle: str):
    with pytest.raises(DefungiError, match=needle):
        model_entry(name)


def test_a_frozen_concatenation_trains_predicts_explains_and_exports_with_the_same_decisions(
    tiny_data: Path, tmp_path: Path, capsys
):
    run = tmp_path / "run"
    argv = ["train", "--data", str(tiny_data), "--profile", "transfer", "--model", PAIR, "--image-size", "32"]
    assert main([*argv, "--epochs", "2", "--batch-size", "8", "--out", str(run)]) == 0
    rows = read_table(run / "predictions_test.csv")
    classes = ["H1", "H2", "H3"]
    capsys.readouterr()
    assert main(["export", str(run)]) == 0
    capsys.readouterr()
    answers = {}
    for backend in ("torch", "onnx"):
        assert main(["predict", str(run), *[r["path"] for r in rows], "--format", "json", "--backend", backend]) == 0
        answers[backend] = json.loads(capsys.readouterr().out)
    for row, again in zip(rows, answers["torch"], strict=True):  # predict gives what the run scored
        assert np.allclose(
            [float(row[f"p_{c}"]) for c in classes], [again["probabilities"][c] for c in classes], atol=1e-5
        )
    assert [r.get("class") for r in answers["torch"]] == [r.get("class") for r in answers["onnx"]]
    assert main(["explain", str(run), rows[0]["path"], "--out", str(tmp_path / "why")]) == 0
    assert list((tmp_path / "why").glob("*.png"))
