"""Refusal of what is not a fungus micrograph, end to end: a run that learned the generated
micrographs refuses noise, flat fields, gradients, photographs and text, answers new micrographs of
new samples (at most 2% refused), gives the same refusals on both backends, keeps refused images
out of a specimen's decision, and says on the page and in evaluations what it refused."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defungi.cli import main
from defungi.data.cache import decode_one
from defungi.experiments.protocols import fit_run
from defungi.results.answers import ImageAnswer
from defungi.results.run import read_evaluation, read_run_metrics
from defungi.serve.predict import NO_FUNGUS, NOT_MICROGRAPH, Answers, by_specimen, open_predictor, predict
from defungi.serve.predictor import Predictor, Scores
from defungi.stats.refusal import REFUSE
from tests.conftest import RICHER, make_image, tiny_config, write_folder
from tests.nonmicrographs import GENERATED, PHOTOGRAPHS, pictures, write_images

SAMPLES_PER_CLASS, PATCHES = 40, 4


@dataclass(frozen=True)
class Refusing:
    data: Path
    run: Path
    root: Path


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Refusing:
    """A run of the richer tiny recipe (fp32) on 480 generated micrographs, exported to ONNX too."""
    root = tmp_path_factory.mktemp("refusing")
    data = write_folder(root / "data", samples_per_class=SAMPLES_PER_CLASS, patches=PATCHES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFUNGI_CACHE", str(root / "cache"))
        fit_run(tiny_config(data, RICHER), root / "run")
        assert main(["export", str(root / "run")]) == 0
    return Refusing(data, root / "run", root)


def _held_out_micrographs(folder: Path, n: int) -> Path:
    """n new micrographs of new samples (a generator seed the run never saw), named as DeFungi names them."""
    rng = np.random.default_rng(2024)
    images = [make_image(rng, k % 3) for k in range(n)]
    folder.mkdir(parents=True)
    for k, image in enumerate(images):
        image.save(folder / f"H{k % 3 + 1}_{500 + k // PATCHES}a_{k % PATCHES + 1}.jpg", quality=95)
    return folder


def _non_micrographs(folder: Path, kind: str, n: int = 20) -> Path:
    rng = np.random.default_rng(11)
    if kind == "photograph":
        pytest.importorskip("skimage.data")
        return write_images(folder, pictures(PHOTOGRAPHS, 64, 1, rng), kind)
    return write_images(folder, [GENERATED[kind](rng, 64) for _ in range(n)], kind)


def test_every_fit_stores_its_detector_and_few_held_out_micrographs_are_refused(refusing: Refusing, tmp_path: Path):
    metrics = read_run_metrics(refusing.run / "metrics.json")
    assert (refusing.run / "ood.npz").exists() and metrics.ood is not None
    assert metrics.ood.source == "test" and metrics.ood.quantile == 0.99 and len(metrics.ood.thresholds) == 1
    with open(refusing.run / "predictions_test.csv") as fh:
        scores = [float(r["ood"]) for r in csv.DictReader(fh)]
    scores = np.array(scores)
    assert metrics.ood.n == len(scores) and metrics.ood.refused == np.mean(scores > REFUSE)
    assert metrics.ood.flagged == np.mean((scores > 1) & (scores <= REFUSE)) and metrics.ood.refuse_over == REFUSE
    rows = predict(open_predictor(refusing.run), [_held_out_micrographs(tmp_path / "new", 300)])
    refused = [r for r in rows if r.status == NOT_MICROGRAPH]
    assert len(refused) <= 0.02 * len(rows)  # the threshold promises about 1%


@pytest.mark.parametrize("kind", ["noise", "flat", "gradient", "photograph", "text"])
def test_what_is_not_a_micrograph_is_refused(refusing: Refusing, tmp_path: Path, kind: str):
    folder = _non_micrographs(tmp_path / kind, kind)
    model = open_predictor(refusing.run)
    rows = predict(model, [folder])
    assert all(r.status in (NO_FUNGUS, NOT_MICROGRAPH) and r.class_ is None for r in rows)
    # the detector alone refuses them too, flat fields included (which the variance filter catches first)
    pixels = np.stack([decode_one(Path(r.path), model.image_size)[0] for r in rows])
    assert np.all(model.answer(pixels).ood > REFUSE)


def test_both_backends_refuse_the_same_images(refusing: Refusing, tmp_path: Path):
    folders = [_held_out_micrographs(tmp_path / "new", 60)]
    folders += [_non_micrographs(tmp_path / kind, kind, 5) for kind in ("noise", "gradient", "text")]
    for tta in (False, True):
        torch_rows, onnx_rows = (predict(open_predictor(refusing.run, b), folders, tta=tta) for b in ("torch", "onnx"))
        assert [r.status for r in torch_rows] == [r.status for r in onnx_rows]
        assert sum(r.status in (NO_FUNGUS, NOT_MICROGRAPH) for r in torch_rows) >= 15  # the 15 non-micrographs
        ood = np.array([[a.ood, b.ood] for a, b in zip(torch_rows, onnx_rows, strict=True) if a.ood is not None])
        assert len(ood) >= 70  # every image but the blank fields and low-contrast gradients
        assert np.allclose(ood[:, 0], ood[:, 1], rtol=1e-4)


def test_refused_images_do_not_count_toward_their_specimen(refusing: Refusing, tmp_path: Path):
    specimen = tmp_path / "specimen"
    specimen.mkdir()
    rng = np.random.default_rng(5)
    for k in range(3):
        make_image(rng, 1).save(specimen / f"H2_700a_{k + 1}.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(specimen / "H2_700a_9.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(specimen / "H3_701a_1.png")
    model = open_predictor(refusing.run)
    rows = predict(model, [specimen])
    decided, noise_only = by_specimen(rows, model, Answers.of(model))
    classified = [r for r in decided.rows if r.class_ is not None]
    assert decided.images == 4 and decided.classified == len(classified) >= 2
    mean_h2 = np.mean([r.probabilities["H2"] for r in classified])
    assert abs(decided.probabilities["H2"] - mean_h2) < 1e-6  # the noise image is not in the mean
    assert noise_only.status == NOT_MICROGRAPH and noise_only.class_ is None


def test_evaluate_flags_each_image_and_counts_the_refused(refusing: Refusing, tmp_path: Path, capsys):
    held = write_folder(tmp_path / "held", samples_per_class=3, patches=4, seed=7)
    out = tmp_path / "evaluation"
    assert main(["evaluate", str(refusing.run), "--data", str(held), "--out", str(out)]) == 0
    assert "refused as not a fungus micrograph:" in capsys.readouterr().out
    evaluation = read_evaluation(out / "metrics.json")
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == evaluation.scores.n == evaluation.ood.n == 36
    assert evaluation.ood.refused == np.mean([float(r["ood"]) > REFUSE for r in rows]) <= 0.1
    assert evaluation.ood.flagged == np.mean([1 < float(r["ood"]) <= REFUSE for r in rows])


def test_the_page_says_not_a_fungus_micrograph(refusing: Refusing, tmp_path: Path):
    testclient = pytest.importorskip("fastapi.testclient")
    from defungi.serve.web import create_app

    folder = _non_micrographs(tmp_path / "noise", "noise", 2)
    client = testclient.TestClient(create_app(open_predictor(refusing.run)))
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in sorted(folder.iterdir())]
    body = client.post("/api/predict", files=files).json()
    assert [i["status"] for i in body["images"]] == [NOT_MICROGRAPH] * 2
    assert body["specimen"]["status"] == NOT_MICROGRAPH and "class" not in body["specimen"]


def test_a_cross_validation_refuses_by_the_mean_of_its_folds_scores(tmp_path: Path, capsys):
    data = write_folder(tmp_path / "data", samples_per_class=SAMPLES_PER_CLASS, patches=PATCHES)
    run = tmp_path / "cv"
    fit_run(tiny_config(data, RICHER | {"data.cv_folds": 3, "data.val_fraction": 0.35}), run)
    metrics = read_run_metrics(run / "metrics.json")
    assert metrics.ood.source == "out of fold" and len(metrics.ood.thresholds) == 3
    with open(run / "oof.csv") as fh:
        oof = list(csv.DictReader(fh))
    assert metrics.ood.refused == np.mean([float(r["ood"]) > REFUSE for r in oof]) <= 0.03
    model = open_predictor(run)
    noise = _non_micrographs(tmp_path / "noise", "noise", 5)
    capsys.readouterr()
    assert main(["predict", str(run), str(noise), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["status"] == NOT_MICROGRAPH for r in rows)
    assert len(model.trained.detectors) == 3


# a pair of backbones side by side reads its first member's middle map (models.concat)
@pytest.mark.parametrize(
    ("model", "middle"),
    [("efficientnet-lite0", "blocks.3"), ("efficientnet-lite0+efficientnet-lite1", "members.0.blocks.3")],
)
def test_a_frozen_lite_reads_a_middle_map_beside_its_head_and_both_backends_agree(
    model: str, middle: str, tmp_path: Path
):
    data = write_folder(tmp_path / "data", samples_per_class=SAMPLES_PER_CLASS, patches=PATCHES)
    over = {"data.image_size": 32, "data.val_fraction": 0.25, "train.amp": False, "train.epochs": 2}
    over |= {"train.model": model, "train.pretrained": True, "train.freeze_backbone": True}
    run = tmp_path / "lite0"
    fit_run(tiny_config(data, over | {"train.model_args": {}, "data.normalize": "pretrained"}), run)
    detector = open_predictor(run).trained.detectors[0]
    assert [(r.module, r.kind) for r in detector.readings] == [(middle, "channel means"), ("classifier", "input")]
    stores = {p.parent for p in (tmp_path / "cache" / "features").glob("*/*.keys.npy")}
    assert len(stores) == 2  # the middle map's channel means and the head's input, from one pass, per image
    assert main(["export", str(run)]) == 0
    folders = [_held_out_micrographs(tmp_path / "new", 30), _non_micrographs(tmp_path / "noise", "noise", 5)]
    torch_rows, onnx_rows = (predict(open_predictor(run, b), folders) for b in ("torch", "onnx"))
    assert [r.status for r in torch_rows] == [r.status for r in onnx_rows]
    assert np.allclose([r.ood for r in torch_rows], [r.ood for r in onnx_rows], rtol=1e-4)
    assert all(r.status == NOT_MICROGRAPH for r in torch_rows[-5:])


def test_a_broken_or_foreign_detector_file_is_one_clear_line(refusing: Refusing, tmp_path: Path):
    from defungi.errors import DefungiError
    from defungi.train.checkpoint import read_ood

    stored = refusing.run / "ood.npz"
    detector = read_ood(stored)  # the convmixer's detector reads its head's input alone (no middle measured)
    assert [(r.module, r.kind) for r in detector.readings] == [("head", "input")] and detector.held_out >= 99
    broken, foreign = tmp_path / "broken.npz", tmp_path / "foreign.npz"
    broken.write_bytes(stored.read_bytes()[:100])
    np.savez(foreign, schema_version=1, weights=np.zeros(3))
    for path, said in ((broken, "unreadable"), (foreign, "not a defungi detector")):
        with pytest.raises(DefungiError, match=f"{path.name}: {said}"):
            read_ood(path)
    np.savez(foreign, schema_version=99)
    with pytest.raises(DefungiError, match="schema_version 99"):
        read_ood(foreign)
    assert read_ood(tmp_path / "absent.npz") is None  # a run trained without one answers every image


def test_a_micrograph_unlike_the_training_ones_is_answered_and_flagged_not_refused(
    refusing: Refusing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Scores over 1 and up to REFUSE: answered, flagged on the image and on its specimen; over REFUSE:
    refused. A specimen none of whose images was answered says every reason with its count."""
    model = open_predictor(refusing.run)
    folder = _held_out_micrographs(tmp_path / "new", 8)
    answer = Predictor.answer

    def scored(self: Predictor, images: np.ndarray, *args, **kwargs) -> Scores:  # the first three images' scores set
        return Scores(
            answer(self, images, *args, **kwargs).probabilities, np.r_[1.2, 0.5, 2.0, [0.3] * (len(images) - 3)]
        )

    monkeypatch.setattr(Predictor, "answer", scored)
    rows = predict(model, [folder])
    assert len(rows) == 8 and rows[0].unlike_training and rows[0].class_ is not None
    assert not rows[1].unlike_training and rows[1].class_ is not None
    assert rows[2].status == NOT_MICROGRAPH and rows[2].class_ is None and rows[2].ood == 2.0
    (specimen,) = by_specimen(rows, model, Answers.of(model), group_by="folder")
    assert specimen.unlike_training == 1 and specimen.refused == 1
    assert specimen.flag == "1 of 7 images unlike the training specimens: check them"
    mixed = [ImageAnswer(f"{k}.png", status=NOT_MICROGRAPH) for k in range(2)] + [
        ImageAnswer("c.png", status=NO_FUNGUS)
    ]
    (none,) = by_specimen(mixed, model, Answers.of(model), "folder")
    assert none.status == "no image answered: 2 not a fungus micrograph, 1 no fungus visible"
