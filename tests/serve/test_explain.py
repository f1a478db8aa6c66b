from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from defungi.cli import main
from defungi.models import create_model, model_entry
from defungi.models.ensemble import Ensemble
from defungi.results.answers import ImageAnswer
from defungi.serve import explain as explain_module
from defungi.serve.explain import border_ring, border_share, cam_layers, class_maps, explained
from defungi.serve.predictor import torch_predictor
from defungi.train.loop import Preprocess
from tests.conftest import TinyRun, write_folder

FAMILIES = [
    ("resnet18", {}),
    ("convmixer", {"dim": 8, "depth": 2, "kernel_size": 3, "patch_size": 4}),
    ("efficientnet-lite0", {}),
]


def _trained(name: str, kwargs: dict, size: int) -> SimpleNamespace:
    """A freshly initialised model of a family, as explain reads a trained one."""
    torch.manual_seed(0)
    return SimpleNamespace(
        model=create_model(name, num_classes=3, **kwargs).eval(),
        preprocess=Preprocess(size, (0.5,) * 3, (0.25,) * 3),
        device=torch.device("cpu"),
        info={"model_name": name},
    )


def _grid_sides(trained: SimpleNamespace, images: np.ndarray, kind: str) -> tuple[int, np.ndarray]:
    """The side of the feature map a kind of map reads, and the maps of classes 0 and 2."""
    part = "fine_features" if kind == "fine" else "features"
    layer = cam_layers(trained.model, getattr(model_entry(trained.info["model_name"]).parts, part))[0]
    seen = []
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    maps = class_maps(trained, images, [0, 2], kind)
    hook.remove()
    assert len(seen[0]) == 4  # a feature map, before global pooling
    return seen[0][-1], maps


@pytest.mark.parametrize(("name", "kwargs"), FAMILIES)
def test_the_fine_map_of_each_family_reads_a_finer_grid_and_both_cover_the_image(name: str, kwargs: dict):
    trained = _trained(name, kwargs, 64)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    coarse, coarse_maps = _grid_sides(trained, images, "coarse")
    fine, fine_maps = _grid_sides(trained, images, "fine")
    assert coarse < 64 and (fine > coarse if name != "convmixer" else fine == coarse)  # ConvMixer: one grid
    for maps in (coarse_maps, fine_maps):
        assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_every_member_of_a_cross_validated_model_is_explained():
    members = [create_model("convmixer", 3, dim=8, depth=1, kernel_size=3, patch_size=4) for _ in range(3)]
    layers = cam_layers(Ensemble(members), model_entry("convmixer").parts.features)
    assert [id(layer) for layer in layers] == [id(m.blocks) for m in members]


def test_border_share_is_the_ring_area_for_an_even_map_and_tells_the_centre_from_the_corners():
    size = 224
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    centre = np.exp(-((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (2 * 20.0**2))
    corners = sum(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 20.0**2)) for cx in (0, size) for cy in (0, size))
    even, centred, cornered = border_share(np.stack([np.ones((size, size)), centre, corners]))
    assert border_ring(size).mean() == pytest.approx(0.51, abs=0.01)  # 1 - 0.7**2
    assert even == pytest.approx(border_ring(size).mean())
    assert centred < 0.01 and cornered > 0.99
    assert np.isnan(border_share(np.zeros((1, size, size)))[0])  # no evidence anywhere: no share


def test_a_figures_title_labels_the_calibrated_confidence_and_the_probability():
    answer = ImageAnswer("/lab/H1_1a_1.jpg", label="H1", class_="H1", confidence=0.93, probability=0.82, decision="H1")
    title = explain_module.figure_title(explain_module.Explained(answer, explained="H1", explained_probability=0.93))
    assert "predicted H1 (calibrated confidence 0.93, probability 0.82)" in title and title.startswith("H1_1a_1.jpg")


def test_explain_writes_a_figure_per_classified_image(tiny_run: TinyRun, tmp_path: Path, capsys):
    held = write_folder(tmp_path / "held", samples_per_class=1, patches=2, seed=3)
    assert main(["explain", str(tiny_run.run), str(held), "--out", str(tmp_path / "why")]) == 0
    assert "6 explanation figures" in capsys.readouterr().out  # 3 classes x 2 patches; the blank field is not
    figures = sorted((tmp_path / "why").glob("*.gradcam.png"))
    assert len(figures) == 6 and figures[0].name == "H1_1a_1.gradcam.png"
    from PIL import Image

    assert Image.open(figures[0]).size[0] >= 1000  # readable: the image, the overlay, the map and its colour bar


def test_a_chosen_class_is_the_one_explained(tiny_run: TinyRun, tmp_path: Path, monkeypatch):
    held = write_folder(tmp_path / "held", samples_per_class=1, patches=2, seed=3)
    files = sorted(held.rglob("H1_*a_*.jpg"))[:2]
    model = torch_predictor(tiny_run.run, "cpu")
    predicted = explained(model, files)
    other = next(c for c in model.classes if c != predicted[0].answer.class_)
    chosen = explained(model, files, target=other)
    for mine, theirs in zip(predicted, chosen, strict=True):
        assert mine.explained == mine.answer.class_ and theirs.explained == other
        assert not np.allclose(mine.map, theirs.map, atol=0.05)  # another class's evidence
        # the calibrated probability shown: the prediction's confidence for its own class, less for another
        assert mine.explained_probability == pytest.approx(mine.answer.confidence)
        assert theirs.explained_probability < theirs.answer.confidence
    titles: list[str] = []

    def capture(*args: Any) -> Path:
        titles.append(args[4])
        return args[3]

    monkeypatch.setattr(explain_module, "plot_explanation", capture)
    assert main(["explain", str(tiny_run.run), *map(str, files), "--out", str(tmp_path / "why"), "--class", other]) == 0
    assert len(titles) == 2 and all(f"evidence for {other} (calibrated probability" in t for t in titles)


def test_an_unknown_class_is_one_line_naming_the_classes(tiny_run: TinyRun, tmp_path: Path, capsys):
    image = sorted(tiny_run.data.rglob("H2_*.jpg"))[0]
    assert main(["explain", str(tiny_run.run), str(image), "--out", str(tmp_path / "why"), "--class", "H9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["defungi: error: unknown class 'H9'; this model's classes are H1, H2, H3"]
    assert not (tmp_path / "why").exists()
