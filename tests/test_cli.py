import json
import logging
import shutil
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest

from defungi import jobs
from defungi.cli import main
from defungi.experiments.studies import STUDIES, runner
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
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows if "class" in r)
    assert main(["predict", str(run), str(unseen / "H2"), "--format", "csv"]) == 0
    header = "level,specimen,path,label,class,decision,confidence,probability,set,set_size,answer,p_H1,p_H2,p_H3,"
    header += "refusal_score,grey_variance,status"
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


def test_resume_of_a_finished_run_says_that_its_data_changed(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *TRAIN]) == 0
    first = capsys.readouterr().out
    for name in ("H2_50a_1.jpg", "H2_50a_2.jpg"):  # 2 added
        shutil.copy(tiny_data / "H2" / "H2_1a_1.jpg", tiny_data / "H2" / name)
    (tiny_data / "H3" / "H3_1a_1.jpg").unlink()  # 1 removed
    with open(tiny_data / "H1" / "H1_1a_1.jpg", "ab") as fh:  # 1 changed
        fh.write(b"\0")
    with caplog.at_level(logging.WARNING, logger="defungi"):
        assert main(["train", "--resume", str(run)]) == 0
    assert capsys.readouterr().out == first  # its results, read back
    (warning,) = [r.getMessage() for r in caplog.records if "changed since it trained" in r.getMessage()]
    assert "\n" not in warning and f"the images in {tiny_data} changed since it trained: 2 added (e.g." in warning
    assert "1 removed (e.g." in warning and "1 changed (e.g." in warning and "H3_1a_1.jpg" in warning
    assert "these results are from the old data; train into a new --out" in warning


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


def test_study_help_names_the_registered_studies(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(STUDIES, "mylab-study", STUDIES["convmixer"])  # a study registered, named in the help
    with pytest.raises(SystemExit) as exc:
        main(["study", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "a published study: resnet34, convmixer, mylab-study" in " ".join(out.split())


def _lab_profile(folder: Path, key: str) -> Path:
    """A lab's own profile: the shipped quick.toml copied to mylab.toml, its profile key line made key
    ("" removes it), its learning rate and its studies' epochs changed."""
    text = (resources.files("defungi") / "configs" / "quick.toml").read_text()
    for shipped, own in (
        ('profile = "quick"', key),
        ("lr = 1e-3", "lr = 5e-3"),
        ("[study]\nepochs = 2", "[study]\nepochs = 7"),
    ):
        assert shipped in text
        text = text.replace(shipped, own)
    (folder / "mylab.toml").write_text(text)
    return folder / "mylab.toml"


class _Planned(Exception):
    """Raised where a study's steps would be planned: the command got there with its config and options."""


@pytest.mark.parametrize("key", ['profile = "mylab"', ""])
@pytest.mark.parametrize("command", ["train", "study", "run"])
def test_train_study_and_run_take_a_labs_own_profile_file(
    command: str, key: str, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    profile, seen = _lab_profile(tmp_path, key), []

    def plan_study(study, config, out_dir, options, probe, data):
        seen.append((study.name, config.profile, config.train.lr, options.epochs))
        raise _Planned

    def train_job(config, out):
        seen.append(("train", config.profile, config.train.lr, None))

    monkeypatch.setattr(runner, "plan_study", plan_study)
    monkeypatch.setattr(jobs, "train_job", train_job)
    args = {"train": ["train"], "study": ["study", "convmixer"], "run": ["run"]}[command]
    argv = [*args, "--data", str(tiny_data), "--profile", str(profile), "--out", str(tmp_path / "out")]
    if command == "train":
        assert main(argv) == 0
    else:
        with pytest.raises(_Planned):
            main(argv)
    name = {"train": "train", "study": "convmixer", "run": "resnet34"}[command]  # the main job plans resnet34 first
    assert seen == [(name, "mylab", 5e-3, None if command == "train" else 7)]


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


@pytest.mark.parametrize(
    "option, key",
    [
        (["predict", "RUN", "IMAGES", "--prior-weight"], "train.prior_weight"),
        (["curve", "--out", "OUT", "--cv"], "data.cv_folds"),
        (["grid", "--out", "OUT", "--batch-sizes"], "train.batch_size"),
        (["grid", "--out", "OUT", "--lrs"], "train.lr"),
    ],
)
def test_an_option_that_sets_a_config_key_refuses_what_the_key_refuses(option, key, capsys):
    from defungi.cli import build_parser
    from defungi.config import RULES, Config, config_keys

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([*option, str(RULES[key].refused)])
    assert RULES[key].fix in capsys.readouterr().err  # the key's own fix, word for word
    default = config_keys(Config())[key]  # and the key's default passes
    assert parser.parse_args([*option, str(default)]) is not None
