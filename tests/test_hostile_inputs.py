"""The bad-input corpus, second round (issue 26): every config key bounded, every file of a run
folder checked, every output path checked first, images bounded by what they decode to, names and
folders that are not what they seem. Each case is one line (exit 2) and no traceback, or a listed
skip. With DEFUNGI_CORPUS=FILE each case is recorded as in test_bad_inputs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from defungi.config import RULES
from tests.conftest import nothing_decoded
from tests.test_bad_inputs import TINY, _cli, _train

Check = Callable[[str, list[Any], str], None]


@pytest.fixture
def refused(capsys: pytest.CaptureFixture) -> Iterator[Check]:
    """check(case, argv, needle): exit 2, the last line of stderr holds needle and says 'defungi',
    and no traceback was printed; every case runs, the test fails at the end listing the misses."""
    misses = []

    def check(case: str, argv: list[Any], needle: str) -> None:
        code, line, _ = _cli(case, argv, capsys)
        if not (code == 2 and needle in line and line.startswith("defungi")):
            misses.append((case, code, line))

    yield check
    assert not misses, misses


# ---- 3. every config key bounded, before any work ------------------------------------------------

WHERE_CHECKED = {"profile": "unknown profile", "data.root": "no such file", "train.weights": "no such file"}


def _bad_value(key: str) -> list[str]:
    """Options that give key its rule's refused value."""
    value = RULES[key].refused
    if key == "profile":
        return ["--profile", value]
    if key == "data.root":
        return ["--data", value]
    text = value if isinstance(value, str) else json.dumps(value)
    return ["--set", f"{key}={text}"]


@pytest.mark.parametrize("key", list(RULES))
def test_every_config_key_refuses_a_value_out_of_its_range(key: str, tiny_run, tmp_path: Path, refused):
    needle = WHERE_CHECKED.get(key, f"config key '{key}'")  # the session's folder: nothing is read from it
    refused(f"config {key}={RULES[key].refused}", _train(tiny_run.data, tmp_path / "run", *_bad_value(key)), needle)
    assert nothing_decoded(tmp_path / "cache") and not (tmp_path / "run").exists()


def test_a_profile_that_is_not_toml_is_one_line(tiny_data: Path, tmp_path: Path, refused):
    (tmp_path / "bad.toml").write_text("[train\nlr = ")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    for name in ("bad.toml", "binary.toml"):
        argv = _train(tiny_data, tmp_path / "run", "--profile", tmp_path / name)
        refused(f"profile {name}", argv, f"{name}: not a valid TOML profile")


def test_a_profile_whose_base_leads_back_to_it_is_one_line(tiny_data: Path, tmp_path: Path, refused):
    (tmp_path / "a.toml").write_text(f'base = "{tmp_path / "b.toml"}"\n')
    (tmp_path / "b.toml").write_text(f'base = "{tmp_path / "a.toml"}"\n')
    (tmp_path / "c.toml").write_text("base = 3\n")
    argv = _train(tiny_data, tmp_path / "run", "--profile", tmp_path / "a.toml")
    refused("profile a -> b -> a", argv, "b.toml: its base leads back to")
    refused("base = 3", _train(tiny_data, tmp_path / "run", "--profile", tmp_path / "c.toml"), "c.toml: base is 3")


def test_a_fit_whose_loss_is_not_finite_stops_naming_the_epoch(
    tiny_data: Path, tmp_path: Path, refused, monkeypatch: pytest.MonkeyPatch
):
    from defungi.experiments import fit as fit_module

    real = fit_module.train_one_epoch
    monkeypatch.setattr(fit_module, "train_one_epoch", lambda *a, **k: real(*a, **k) | {"loss": float("nan")})
    refused("training loss NaN", _train(tiny_data, tmp_path / "run"), "the training loss became nan in epoch 1")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_calibration_of_nan_probabilities_does_not_crash():
    import numpy as np

    from defungi.stats.metrics import calibration

    probs = np.full((4, 3), np.nan)
    assert calibration(probs, np.array([0, 1, 2, 0]))["count"][0] == 4


# ---- 4. every file read from a run folder checked -----------------------------------------------

BROKEN = {
    "truncated": b'{"schema_version": 3, "kind": "fi',
    "empty": b"",
    "a list": b"[1, 2]",
    "not UTF-8": b"\xff\xfe{}",
}


def _readers(run: Path, data: Path, out: Path) -> dict[str, list[Any]]:
    """Commands that read a run folder: predict, evaluate, report, export, resume."""
    return {
        "predict": ["predict", run, data / "H1" / "H1_1a_1.jpg"],
        "evaluate": ["evaluate", run, "--data", data, "--out", out / "eval"],
        "report": ["report", run],
        "export": ["export", run, "--out", out / "m.onnx"],
        "resume": ["train", "--resume", run],
    }


@pytest.mark.parametrize("name", ["config.json", "metrics.json"])
def test_a_broken_json_file_of_a_run_folder_is_one_line_naming_it(
    name: str, tiny_run_copy: Path, tiny_run, tmp_path: Path, refused
):
    run, original = tiny_run_copy, (tiny_run_copy / name).read_bytes()
    for what, content in BROKEN.items():
        (run / name).write_bytes(content)
        for command, argv in _readers(run, tiny_run.data, tmp_path / what).items():
            if (command == "resume" and name == "metrics.json") or (command == "report" and name == "config.json"):
                continue  # a finished run is not resumed; a page is drawn from metrics.json, not the config
            refused(f"{name} {what} ({command})", argv, name)
    (run / name).write_bytes(original)


def test_an_empty_object_as_metrics_is_one_line(tiny_run_copy: Path, tiny_run, tmp_path: Path, refused):
    (tiny_run_copy / "metrics.json").write_text("{}")
    for command, argv in _readers(tiny_run_copy, tiny_run.data, tmp_path).items():
        if command != "resume":
            refused(f"metrics.json {{}} ({command})", argv, "metrics.json")


CSV_READERS = {"history.csv": ("report",), "split.csv": ("resume", "export")}  # the commands that read each


@pytest.mark.parametrize("name", list(CSV_READERS))
def test_a_garbage_csv_of_a_run_folder_is_one_line_naming_it(
    name: str, tiny_run_copy: Path, tiny_run, tmp_path: Path, refused
):
    run = tiny_run_copy
    (run / "metrics.json").rename(run / "metrics.keep")  # an interrupted run: resume checks split.csv
    argvs = _readers(run, tiny_run.data, tmp_path)
    for what, content in {"garbage": b"epoch,lr\nnot,a number\n1\n", "not UTF-8": b"\xff\xfe\x00,\n"}.items():
        (run / name).write_bytes(content)
        for command in CSV_READERS[name]:
            if command == "report":
                (run / "metrics.keep").rename(run / "metrics.json")
            refused(f"{name} {what} ({command})", argvs[command], name)
            if command == "report":
                (run / "metrics.json").rename(run / "metrics.keep")


def test_a_checkpoint_from_another_program_or_shape_is_one_line(tiny_run_copy: Path, tiny_run, tmp_path: Path, refused):
    import torch

    run = tiny_run_copy
    best = next(p for p in (run / "best.pt", run / "last.pt") if p.exists())
    original = torch.load(best, weights_only=False)
    image = tiny_run.data / "H1" / "H1_1a_1.jpg"
    for what, write in {
        "random bytes": lambda: best.write_bytes(b"PK\x03\x04 not a checkpoint"),
        "a list": lambda: torch.save([1, 2, 3], best),
        "a bare state dict": lambda: torch.save({"weight": torch.zeros(2)}, best),
        "another shape": lambda: torch.save(_reshaped(original), best),
    }.items():
        write()
        refused(f"checkpoint: {what} (predict)", ["predict", run, image], best.name)
        refused(f"checkpoint: {what} (export)", ["export", run, "--out", tmp_path / "m.onnx"], best.name)


def _reshaped(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint with every weight one row longer (another model's shape)."""
    import torch

    key = next(k for k, v in checkpoint.items() if isinstance(v, dict) and any(torch.is_tensor(t) for t in v.values()))
    state = {k: torch.cat([v, v[:1]]) if torch.is_tensor(v) and v.ndim else v for k, v in checkpoint[key].items()}
    return checkpoint | {key: state}


def test_a_broken_earlier_evaluation_does_not_block_the_next(tiny_run_copy: Path, tiny_run, capsys):
    folder = tiny_run_copy / "evaluations" / "data"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text('{"schema_ver')
    code, line, _ = _cli(
        "broken evaluations/NAME/metrics.json", ["evaluate", tiny_run_copy, "--data", tiny_run.data], capsys
    )
    assert code == 0 or (code == 2 and "metrics.json" in line), line


# ---- 5. every output path checked before the work ------------------------------------------------


def _unwritable_places(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Output paths no command can write, with what the refusal says: under a file, under /proc, and
    (not as root, whom permissions do not stop) in a read-only folder."""
    (tmp_path / "afile").write_text("x")
    places = {
        "under a file": (tmp_path / "afile" / "out", "afile is a file"),
        "under /proc": (Path("/proc/defungi-out"), "/proc is not writable"),
    }
    import os

    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        places["read-only folder"] = (locked / "out", "locked is not writable")
    return places


def test_every_output_path_is_checked_before_the_work(tiny_run, tmp_path: Path, refused):
    run, data = tiny_run.run, tiny_run.data
    image = data / "H1" / "H1_1a_1.jpg"
    commands = {
        "export --out": lambda out: ["export", run, "--out", out / "m.onnx"],
        "report --out": lambda out: ["report", "--compare", run, run, "--out", out],
        "data audit --out": lambda out: ["data", "audit", data, "--out", out],
        "explain --out": lambda out: ["explain", run, image, "--out", out],
        "study --out": lambda out: ["study", "convmixer", "--data", data, "--out", out],
        "data fetch --dest": lambda out: ["data", "fetch", "--dest", out, "--url", "http://127.0.0.1:9/none.zip"],
        "curve --out": lambda out: ["curve", "--data", data, "--out", out],
        "grid --out": lambda out: ["grid", "--data", data, "--out", out],
    }
    for where, (out, needle) in _unwritable_places(tmp_path).items():
        for command, argv in commands.items():
            refused(f"{command} {where}", argv(out), needle)
    (tmp_path / "folder.onnx").mkdir()
    refused("export --out a folder", ["export", run, "--out", tmp_path / "folder.onnx"], "is a folder; give a file")
    assert not list(tmp_path.glob("**/*.onnx*")) or [p.name for p in tmp_path.glob("**/*.onnx*")] == ["folder.onnx"]


def test_an_export_cleans_up_after_a_killed_one(tiny_run_copy: Path, capsys):
    stale = tiny_run_copy / ".model.onnx.999999999.tmp"  # a pid no process has
    stale.write_bytes(b"half an export")
    code, _, _ = _cli("export after a killed export", ["export", tiny_run_copy, "--opset", "13"], capsys)
    assert code == 0 and not stale.exists() and (tiny_run_copy / "model.onnx").exists()
    assert not list(tiny_run_copy.glob(".*.tmp"))


# ---- 6. the rest: every option of every command bounded -----------------------------------------


def test_command_options_are_bounded(tiny_run, tmp_path: Path, refused):
    run, data = tiny_run.run, tiny_run.data
    grid = ["grid", "--data", data, "--out", tmp_path / "g", *TINY]
    curve = ["curve", "--data", data, "--out", tmp_path / "c", *TINY]
    cases = {
        "export --opset 0": (["export", run, "--opset", "0", "--out", tmp_path / "m.onnx"], "--opset 0: use"),
        "export --opset 99": (["export", run, "--opset", "99", "--out", tmp_path / "m.onnx"], "--opset 99: use"),
        "serve --port 70000": (["serve", run, "--port", "70000"], "from 1 to 65535"),
        "serve --port -1": (["serve", run, "--port", "-1"], "from 1 to 65535"),
        "predict --group-by '(zzz)?'": (
            ["predict", run, data / "H1", "--by-sample", "--group-by", "(zzz)?"],
            "matches an empty name",
        ),
        "predict --group-by '(('": (["predict", run, data / "H1", "--group-by", "(("], "not a regular expression"),
        "grid --lrs ''": ([*grid, "--lrs", ""], "give one value or more"),
        "grid --lrs -1": ([*grid, "--lrs", "-1"], "use a learning rate in (0, 10]"),
        "grid --lrs 1e-3,x": ([*grid, "--lrs", "1e-3,x"], "'x': use a learning rate"),
        "grid --param 1.2.3": ([*grid, "--param", "train.lr=1.2.3"], "give KEY=V1,V2 with numbers"),
        "grid --fraction 1.5": ([*grid, "--fraction", "1.5"], "in (0, 1]"),
        "curve --fraction 0": ([*curve, "--fraction", "0"], "in (0, 1]"),
        "curve --cv 1": ([*curve, "--cv", "1"], "2 to 1000 folds"),
        "grid cell out of range": (
            [*grid, "--lrs", "1e-3", "--batch-sizes", "8", "--param", "train.weight_decay=-1"],
            "grid cell",
        ),
    }
    for case, (argv, needle) in cases.items():
        refused(case, argv, needle)
    assert not (tmp_path / "g").exists() and not (tmp_path / "c").exists() and not (tmp_path / "m.onnx").exists()


# ---- 1. images bounded by what they decode to ----------------------------------------------------


def _strip(path: Path, width: int = 60000) -> Path:
    """A width x 1 PNG: few pixels, past every pixel check, but no micrograph's shape."""
    from PIL import Image

    Image.new("L", (width, 1), 100).save(path)
    return path


def test_strips_and_images_over_the_pixel_limit_are_skipped_and_listed(
    tiny_data: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    from PIL import Image

    _strip(tiny_data / "H1" / "H1_901a_1.png", 15000)
    # over PIL's limit, under twice it (decoded with a warning before): the limit lowered to 20,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    Image.new("L", (150, 150), 128).save(tiny_data / "H2" / "H2_902a_1.png")
    code, _, _ = _cli(
        "15000 x 1 strip and 150 x 150 over a 20,000-pixel limit (train)", _train(tiny_data, tmp_path / "r"), capsys
    )
    excluded = (tmp_path / "r" / "excluded.csv").read_text()
    assert code == 0 and "more than 20 times as long as wide" in excluded and "over the limit of 20000" in excluded
    argv = ["predict", tmp_path / "r", tiny_data / "H1" / "H1_901a_1.png", tiny_data / "H2" / "H2_902a_1.png"]
    code, _, out = _cli("strip and over-limit image (predict)", argv, capsys)
    assert code == 0 and out.count("unreadable image (DecompressionBombError)") == 2


def test_the_page_answers_an_upload_of_strips_with_a_4xx(tiny_run, tmp_path: Path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from defungi.serve.predictor import torch_predictor
    from defungi.serve.web import create_app

    client = TestClient(create_app(torch_predictor(tiny_run.run)))
    strip = _strip(tmp_path / "strip.png", 20000).read_bytes()
    reply = client.post("/api/predict", files=[("files", ("strip.png", strip))])
    assert reply.status_code == 422 and "strip.png: not a micrograph's shape" in reply.json()["error"]
    good = (tiny_run.data / "H1" / "H1_1a_1.jpg").read_bytes()
    reply = client.post("/api/predict", files=[("files", ("strip.png", strip)), ("files", ("good.jpg", good))])
    shown = {i["name"]: i for i in reply.json()["images"]}
    assert reply.status_code == 200 and shown["strip.png"]["status"].startswith("not a micrograph's shape")


def test_square_crops_before_it_resizes():
    import numpy as np
    from PIL import Image

    from defungi.data.cache import square

    image = Image.new("RGB", (3000, 100), (0, 0, 0))
    image.paste((255, 255, 255), (1450, 0, 1550, 100))  # the central square is white, the sides black
    assert np.asarray(square(image, 16)).mean() > 240


# ---- 2. names and folders ------------------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_trains_and_prints(tiny_data: Path, tmp_path: Path, capsys):
    import os
    import shutil

    odd = tiny_data / "H1" / os.fsdecode(b"H1_90a_1\xff\xfe.jpg")
    shutil.copy(tiny_data / "H1" / "H1_1a_1.jpg", odd)
    code, line, _ = _cli("non-UTF-8 file name (train)", _train(tiny_data, tmp_path / "r"), capsys)
    assert code == 0, line
    # capsys writes UTF-8 strictly, as a terminal with a strict UTF-8 locale does
    code, line, out = _cli("non-UTF-8 file name (predict)", ["predict", tmp_path / "r", odd], capsys)
    assert code == 0 and "H1_90a_1\\udcff\\udcfe.jpg" in out, line


def test_an_unreadable_class_folder_is_one_line(tiny_data: Path, tmp_path: Path, refused, monkeypatch):
    import os

    locked = tiny_data / "H2"
    if os.geteuid() == 0:  # permissions do not stop root: the listing fails as it would for anyone else
        real = Path.iterdir

        def iterdir(self: Path):
            if self == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "iterdir", iterdir)
    else:
        locked.chmod(0)
    refused("unreadable class folder", _train(tiny_data, tmp_path / "r"), f"{locked}: cannot be read (Permission")
    locked.chmod(0o755)


def test_a_link_back_into_the_data_is_not_a_class(tiny_data: Path, tmp_path: Path):
    from defungi.data.scan import scan

    (tiny_data / "H7").symlink_to(".")
    (tiny_data / "H1" / "loop").symlink_to("..")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "H4").mkdir(parents=True)
    for f in sorted((tiny_data / "H3").glob("*.jpg"))[:4]:
        (elsewhere / "H4" / f.name.replace("H3", "H4")).write_bytes(f.read_bytes())
    (tiny_data / "H4").symlink_to(elsewhere / "H4")  # a class folder kept on another disk: followed
    records = scan(tiny_data)
    assert sorted({r.label for r in records}) == ["H1", "H2", "H3", "H4"]
    assert len(records) == len({r.path for r in records}) == 3 * 24 + 1 + 4


def _patched_zip(source: Path, path: Path, offset_local: int, offset_central: int, value: bytes) -> Path:
    """A one-member zip of source with bytes changed in the member's local and central headers."""
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.write(source, f"data/H1/{source.name}")
    raw = bytearray(path.read_bytes())
    central = raw.rindex(b"PK\x01\x02")
    raw[offset_local : offset_local + len(value)] = value
    raw[central + offset_central : central + offset_central + len(value)] = value
    path.write_bytes(bytes(raw))
    return path


def test_encrypted_and_unsupported_zips_are_one_line(tiny_data: Path, tmp_path: Path, refused):
    image = tiny_data / "H1" / "H1_1a_1.jpg"
    encrypted = _patched_zip(image, tmp_path / "encrypted.zip", 6, 8, b"\x01\x00")  # flag bit 0: encrypted
    unsupported = _patched_zip(image, tmp_path / "method97.zip", 8, 10, b"\x61\x00")  # method 97 (WavPack)
    refused("encrypted zip", _train(encrypted, tmp_path / "r1"), "encrypted.zip: not a readable .zip")
    refused("zip with compression method 97", _train(unsupported, tmp_path / "r2"), "method97.zip: not a readable")
    assert not list((tmp_path / "cache" / "unpacked").iterdir())


def test_a_grid_cell_that_fails_is_one_line_without_optuna_s_traceback(tiny_data: Path, tmp_path: Path, capsys):
    from defungi.cli import main

    grid = ["grid", "--data", tiny_data, "--out", tmp_path / "g", *TINY, "--batch-sizes", "8", "--lrs", "1e-3"]
    code = main([str(a) for a in [*grid, "--param", "train.model=nosuchnet"]])  # fails in every fit
    err = capsys.readouterr().err
    assert code == 2 and "unknown model 'nosuchnet'" in err.splitlines()[-1]
    assert "Traceback" not in err
