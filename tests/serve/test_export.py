import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from defungi.cli import main
from defungi.errors import DefungiError
from defungi.results.run import read_run_metrics
from defungi.serve.lite import dihedral_nhwc
from defungi.serve.predict import open_predictor
from tests.conftest import tiny_args, write_folder


def test_exported_model_matches_pytorch_and_predicts_without_torch(tiny_run_copy: Path, tmp_path: Path, capsys):
    assert main(["export", str(tiny_run_copy)]) == 0
    printed = capsys.readouterr().out
    assert "model.onnx (ONNX opset 17)" in printed and "images of the run's split.csv" in printed
    assert float(printed.rsplit(": ", 1)[1]) <= 1e-4
    held = write_folder(tmp_path / "held", samples_per_class=1, patches=3, seed=5)
    for tta in ("--tta", "--no-tta"):
        answers = []
        for backend in ("torch", "onnx"):
            assert main(["predict", str(tiny_run_copy), str(held), "--format", "json", tta, "--backend", backend]) == 0
            answers.append(json.loads(capsys.readouterr().out))
        torch_rows, onnx_rows = answers
        assert [r.get("class") for r in torch_rows] == [r.get("class") for r in onnx_rows]
        assert [r.get("status") for r in onnx_rows].count("no fungus visible") == 1  # the blank field
        diffs = [
            abs(a["probabilities"][c] - b["probabilities"][c])
            for a, b in zip(torch_rows, onnx_rows, strict=True)
            if "class" in a
            for c in "H1 H2 H3".split()
        ]
        assert max(diffs) < 1e-4
    script = (
        "import sys\nfrom defungi.cli import main\n"
        f"code = main(['predict', {str(tiny_run_copy)!r}, {str(held)!r}, '--backend', 'onnx', '--by-sample'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "per specimen (3 with a known class)" in done.stdout


def test_dihedral_views_match_the_training_ones():
    import torch

    from defungi.data.augment import dihedral

    x = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    for k in range(8):
        ours = dihedral(torch.from_numpy(x).permute(0, 3, 1, 2), k).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(dihedral_nhwc(x, k), ours)


def test_missing_or_foreign_onnx_file_is_one_clear_error(tmp_path: Path):
    with pytest.raises(DefungiError, match="defungi export"):
        open_predictor(tmp_path, "onnx")
    bogus = tmp_path / "other.onnx"
    bogus.write_bytes(b"not a model")
    with pytest.raises(DefungiError, match="not a model written by 'defungi export'"):
        open_predictor(bogus, "onnx")


def test_both_backends_decide_alike_for_a_run_trained_in_bf16(tmp_path: Path, monkeypatch, capsys):
    """A CPU with native bf16 trains in bf16 autocast; answers are fp32 on both backends."""
    monkeypatch.setattr("defungi.train.loop.cpu_has_native_bf16", lambda: True)
    data, run = write_folder(tmp_path / "data"), tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *tiny_args({"train.amp": True})]) == 0
    assert read_run_metrics(run / "metrics.json").protocol.precision == "bfloat16"
    assert main(["export", str(run)]) == 0
    held = write_folder(tmp_path / "held", samples_per_class=3, patches=4, seed=11)
    capsys.readouterr()
    answers = []
    for backend in ("torch", "onnx"):
        assert main(["predict", str(run), str(held), "--format", "json", "--backend", backend]) == 0
        answers.append([r for r in json.loads(capsys.readouterr().out) if "class" in r])
    torch_rows, onnx_rows = answers
    assert len(torch_rows) == 3 * 3 * 4 and [r["class"] for r in torch_rows] == [r["class"] for r in onnx_rows]
    torch_probs, onnx_probs = ([[r["probabilities"][c] for c in ("H1", "H2", "H3")] for r in rows] for rows in answers)
    assert np.abs(np.array(torch_probs) - np.array(onnx_probs)).max() < 1e-4


def test_a_frozen_backbone_cv_answers_from_one_trunk_pass_on_either_engine_and_exports_one_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The folds' heads share the frozen backbone: the run's default answers (one pass of the trunk, the
    engine measured faster) are those of the folds' whole models averaged, refusals included, on
    torch and onnxruntime alike; the exported graph holds the backbone once."""
    import onnx
    import torch

    import defungi.train.checkpoint as checkpoint_module
    from defungi.models import create_model
    from defungi.models.ensemble import SharedTrunk
    from defungi.serve.predictor import torch_predictor
    from defungi.train.frozen import ENGINE_ENV

    mixer = {"dim": 16, "depth": 2, "kernel_size": 3, "patch_size": 4}
    torch.save(create_model("convmixer", num_classes=1000, **mixer).state_dict(), tmp_path / "w.pt")
    data = write_folder(tmp_path / "data", samples_per_class=80, patches=4)  # >= 99 validation images per fold
    over = {
        "train.model_args": mixer,
        "train.freeze_backbone": True,
        "data.normalize": "pretrained",
        "data.val_fraction": 0.25,
        "train.amp": False,
    }
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--cv", "2", "--weights", str(tmp_path / "w.pt"),
                 *tiny_args(over)]) == 0  # fmt: skip
    held = write_folder(tmp_path / "held", samples_per_class=2, patches=4, seed=7)
    shared = torch_predictor(run, "cpu")
    assert isinstance(shared.trained.model, SharedTrunk) and len(shared.trained.detectors) == 2
    from defungi.data.cache import decode_one
    from defungi.serve.predict import expand_paths

    pixels = np.stack([decode_one(f, shared.image_size)[0] for f in expand_paths([held])])
    monkeypatch.setattr(checkpoint_module, "shared_trunk", lambda model, states, head: None)  # each fold's whole model
    whole = torch_predictor(run, "cpu").scores(pixels, False)
    monkeypatch.undo()
    for engine in ("torch", "onnxruntime"):
        monkeypatch.setenv(ENGINE_ENV, engine)
        ours = torch_predictor(run, "cpu").scores(pixels, False)
        assert np.abs(ours.probabilities - whole.probabilities).max() < 1e-5, engine
        assert np.abs(ours.ood - whole.ood).max() < 1e-4 * max(1.0, np.abs(whole.ood).max()), engine
    assert main(["export", str(run)]) == 0
    convs = sum(node.op_type == "Conv" for node in onnx.load(str(run / "model.onnx")).graph.node)
    assert convs == sum(isinstance(m, torch.nn.Conv2d) for m in shared.trained.model.trunk.modules())
    on_onnx = open_predictor(run, "onnx").scores(pixels, False)
    assert np.abs(on_onnx.probabilities - whole.probabilities).max() < 1e-4
    assert np.array_equal(on_onnx.ood > 1, whole.ood > 1)
