import dataclasses
import json
from pathlib import Path

import pytest

from defungi.config import load_config
from defungi.experiments.studies import STUDIES, run_study
from tests.conftest import write_folder

SMALL_STUDY = {
    "data.image_size": 16,
    "train.epochs": 2,
    "train.batch_size": 8,
    "study.epochs": 1,
    "study.full_curve_epochs": 1,
    "study.subset_fraction": 0.5,
    "study.curve_fractions": "[0.5, 1.0]",
    "study.grid_batch_sizes": "[8]",
    "study.grid_lrs": "[0.001, 0.002]",
    "study.grid2_lr_factors": "[1.0, 2.0]",
    "study.cv_folds": 2,
    "study.split_ratios": "[0.7, 0.8]",
    "study.split_repeats": 1,
    "study.depths": "[8, 16]",
    "study.depth_lr_factors": "[1.0, 2.0]",
    "train.model_args": '{"dim": 8, "kernel_size": 3, "patch_size": 4}',
}


@pytest.mark.parametrize("name", ["resnet34", "convmixer"])
def test_study_runs_every_step_reports_and_resumes(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(STUDIES, name, dataclasses.replace(STUDIES[name], model="convmixer"))  # a tiny stand-in, same steps
    data = write_folder(tmp_path / "d", samples_per_class=8, patches=3)
    config = load_config("quick", {"data.root": str(data), **SMALL_STUDY})
    out = tmp_path / "study"
    state = run_study(name, config, out)
    assert len(state["steps"]) == 7
    page = (out / "report.html").read_text()
    assert page.count("<h2>") == 7 and page.count("data:image/png;base64") >= 10
    md = (out / "report.md").read_text()
    assert "published study (random split)" in md and "grouped split" in md
    for step in state["steps"].values():
        for fig in step["figures"]:
            assert (next(out.glob(f"*-{next(k for k, v in state['steps'].items() if v is step)}")) / fig).exists()
    grid_step = "grid20" if name == "resnet34" else "grid_full"
    assert state["steps"][grid_step]["choice"]["train.batch_size"] == 8
    stamp = (out / "study.json").stat().st_mtime_ns
    # interrupted after the grids: drop later steps, run again, only those are redone
    saved = json.loads((out / "study.json").read_text())
    later = list(saved["steps"])[4:]
    for key in later:
        del saved["steps"][key]
    (out / "study.json").write_text(json.dumps(saved))
    again = run_study(name, config, out)
    assert again["steps"]["grid_full"]["seconds"] == state["steps"]["grid_full"]["seconds"]
    assert list(again["steps"]) == list(state["steps"])
    assert again["steps"]["final"]["test"] == state["steps"]["final"]["test"]  # finished fits read back
    assert (out / "study.json").stat().st_mtime_ns != stamp
