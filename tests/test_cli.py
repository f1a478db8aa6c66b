import json
from dataclasses import replace
from pathlib import Path

import pytest

from defungi.cli import main
from defungi.results.run import read_run_metrics
from tests.conftest import tiny_args, write_folder

TRAIN = tiny_args()


def _one_line_error(capsys: pytest.CaptureFixture, code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("defungi: error:") and "\n" not in err and needle in err, err


def test_evaluate_and_predict_a_trained_run(tiny_run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    run = tiny_run_copy  # evaluate writes into RUN/evaluations
    unseen = write_folder(tmp_path / "unseen", samples_per_class=1, patches=2, seed=5)
    assert main(["evaluate", str(run), "--data", str(unseen), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scores"]["n"] == 6
    assert main(["evaluate", str(run), "--data", str(unseen), "--json", "--prior-weight", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["prior_weight"] == 0
    with pytest.raises(SystemExit):
        main(["evaluate", str(run), "--data", str(unseen), "--prior-weight", "-0.5"])
    assert "balanced decision" in capsys.readouterr().err
    (unseen / "H1" / "broken.jpg").write_bytes(b"junk")
    assert main(["predict", str(run), str(unseen), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8 and sum("error" in r for r in rows) == 1
    assert [Path(r["path"]).name for r in rows if r.get("status") == "no fungus visible"] == ["H1_99a_1.jpg"]
    assert all(abs(sum(r[c] for c in ("H1", "H2", "H3")) - 1) < 1e-4 for r in rows if "class" in r)
    assert main(["predict", str(run), str(unseen / "H2"), "--format", "csv"]) == 0
    header = "level,specimen,path,label,class,decision,confidence,probability,set,set_size,answer,H1,H2,H3,"
    header += "refusal_score,status"
    assert capsys.readouterr().out.splitlines()[0] == header


def test_resume_of_a_finished_run_reads_it_back(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *TRAIN]) == 0
    first = capsys.readouterr().out
    assert "F1" in first and f"run folder: {run}" in first
    stamps = {name: (run / name).stat().st_mtime_ns for name in ("best.pt", "last.pt", "metrics.json")}
    assert main(["train", "--resume", str(run)]) == 0
    assert capsys.readouterr().out == first  # the same metrics line and folder
    assert {name: (run / name).stat().st_mtime_ns for name in stamps} == stamps  # nothing trained or rewritten


def test_resume_continues_an_interrupted_run(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *TRAIN]) == 0
    full = read_run_metrics(run / "metrics.json").part("test")
    (run / "metrics.json").unlink()  # as if stopped after its last epoch, before scoring
    assert main(["train", "--resume", str(run)]) == 0
    resumed = read_run_metrics(run / "metrics.json").part("test")
    assert replace(resumed, seconds=None) == replace(full, seconds=None)
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 2


def test_study_takes_no_model_option(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exc:
        main(["study", "resnet34", "--model", "convmixer", "--out", str(tmp_path / "s")])
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err


def test_one_cell_grid(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    pytest.importorskip("optuna")  # not on the GPU check's machine
    args = [
        "grid",
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "g"),
        "--batch-sizes",
        "16",
        "--lrs",
        "1e-3",
        *TRAIN,
    ]
    assert main(args) == 0
    assert "0 cells done before, 1 fitted by this worker" in capsys.readouterr().out
    assert json.loads((tmp_path / "g" / "grid.json").read_text())["best"] == {"train.batch_size": 16, "train.lr": 1e-3}


def test_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture):
    _one_line_error(capsys, main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]), "nope")


def test_one_class_folder(tmp_path: Path, capsys: pytest.CaptureFixture):
    data = write_folder(tmp_path / "d", samples_per_class=2, patches=1, classes=("H1",))
    _one_line_error(capsys, main(["train", "--data", str(data), "--out", str(tmp_path / "r")]), "only one class")


def test_empty_class_folder(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    (tiny_data / "H5").mkdir()
    _one_line_error(capsys, main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "r")]), "H5")


def test_unknown_config_key_and_model(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    _one_line_error(
        capsys,
        main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--set", "train.lerning_rate=1"]),
        "lerning_rate",
    )
    _one_line_error(
        capsys,
        main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "r2"), "--model", "nonet"]),
        "unknown model",
    )


def test_evaluate_and_predict_without_a_run(tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture):
    _one_line_error(capsys, main(["evaluate", str(tmp_path), "--data", str(tiny_data)]), "no checkpoint")
    _one_line_error(capsys, main(["predict", str(tmp_path), str(tiny_data)]), "no checkpoint")


def test_report_redraws_a_run_folder_from_its_files(tiny_run_copy: Path, tmp_path: Path, capsys):
    run = tiny_run_copy
    for figure in ("training_curves.png", "confusion_test.png", "excluded.png"):
        (run / figure).unlink()
    for checkpoint in ("best.pt", "last.pt"):
        (run / checkpoint).unlink()  # no model needed
    assert main(["report", str(run)]) == 0
    assert all((run / f).exists() for f in ("training_curves.png", "confusion_test.png", "excluded.png"))
    capsys.readouterr()
    _one_line_error(capsys, main(["report", str(tmp_path)]), "neither a study folder")


def test_the_cache_command_shows_what_training_cached_and_clears_it(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), *TRAIN]) == 0
    capsys.readouterr()
    assert main(["cache"]) == 0
    files = {line.split()[0]: int(line.split()[3]) for line in capsys.readouterr().out.splitlines()[:-1]}
    assert files["decoded"] > 0  # the tiny images, decoded once per content
    assert main(["cache", "--clear"]) == 0
    assert "cleared" in capsys.readouterr().out
    assert main(["cache"]) == 0
    assert all(int(line.split()[3]) == 0 for line in capsys.readouterr().out.splitlines()[:-1])
