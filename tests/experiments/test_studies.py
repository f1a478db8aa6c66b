import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from defungi import jobs
from defungi.config import config_from_dict, load_config
from defungi.errors import DefungiError
from defungi.experiments.studies import STUDIES
from defungi.jobs import main_job, redraw_job, study_job
from defungi.models import create_model
from defungi.report.combined import build_combined_report
from defungi.results.plan import read_plan
from defungi.results.run import read_run_metrics
from defungi.results.schema import to_dict
from defungi.results.study import read_study
from tests.conftest import write_folder

pytestmark = pytest.mark.slow  # both studies end to end, in tiny: about a minute

SMALL_RUN = {
    "data.image_size": 16,
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.model_args": '{"dim": 8, "kernel_size": 3, "patch_size": 4}',
}
SMALL_STUDY = {
    "study.epochs": 1,
    "study.curve_fractions": "[0.5, 1.0]",
    "study.grid_batch_sizes": "[8]",
    "study.grid_lrs": "[0.001, 0.002]",
    "study.final_folds": 2,
    "study.random_folds": 1,
    "study.random_config": '{"train.epochs": 3}',  # the random CV's own schedule
    "study.resnet34.subset_fraction": 0.5,
    "study.resnet34.grid2_lr_factors": "[1.0, 2.0]",
    "study.resnet34.cv_folds": 2,
    "study.resnet34.full_curve_epochs": 1,
    "study.convmixer.split_ratios": "[0.75]",
    "study.convmixer.split_repeats": 1,
    "study.convmixer.depths": "[8, 16]",
    "study.convmixer.depth_lr_factors": "[1.0, 2.0]",
    "study.convmixer.config": '{"train.ensemble": 2}',  # in place of the quick profile's width 128
}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory):
    """Both studies run once on tiny images, with a tiny ConvMixer standing in for each model."""
    root = tmp_path_factory.mktemp("studies")
    data = write_folder(root / "d", samples_per_class=8, patches=3)
    # the ResNet-34 study (a tiny ConvMixer standing in) starts from weights in a file, as --weights does
    torch.save(create_model("convmixer", 1000, **json.loads(SMALL_RUN["train.model_args"])).state_dict(), root / "w.pt")
    options = SMALL_STUDY | {"study.resnet34.config": json.dumps({"train.weights": str(root / "w.pt")})}
    config = load_config("quick", {"data.root": str(data), **SMALL_RUN})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFUNGI_CACHE", str(root / "cache"))
        for name in STUDIES:
            mp.setitem(STUDIES, name, dataclasses.replace(STUDIES[name], model="convmixer"))
        for name in ("resnet34", "convmixer"):
            study_job(name, config, root / f"study-{name}", options)
        yield {
            name: (read_study(root / f"study-{name}" / "study.json"), (config, options), root / f"study-{name}")
            for name in ("resnet34", "convmixer")
        }


@pytest.mark.parametrize("name", ["resnet34", "convmixer"])
def test_study_runs_every_step_reports_and_resumes(name: str, studies):
    state, (config, options), out = studies[name]
    assert [type(s.result) for s in state.steps.values()] == [s.result_type for s in STUDIES[name].steps]
    page = (out / "report.html").read_text()
    assert page.count("<h2>") == len(STUDIES[name].steps) and page.count("data:image/png;base64") >= 14
    md = (out / "report.md").read_text()
    assert f"{name}, published (random split)" in md and f"{name}, random 2-fold CV (1 fitted), per specimen |" in md
    assert "| split | fold | test images / specimens |" in md and "| larger than noise |" in md
    assert "| grouped | 1 | " in md and "| grouped | 0 | " not in md  # folds counted 1..K, as in folds.png
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / link).exists(), link
    grid_step = state.steps["grid20" if name == "resnet34" else "grid_full"].result
    assert grid_step.choice["train.batch_size"] == 8 and "95% interval over specimens" in grid_step.summary
    assert "| 95% interval |" in md
    # interrupted after four steps: drop the later ones, run again; finished fits are read back
    saved = read_study(out / "study.json")
    saved.steps = dict(list(saved.steps.items())[:4])
    (out / "study.json").write_text(json.dumps(to_dict(saved)))
    study_job(name, config, out, options)
    again = read_study(out / "study.json")
    assert list(again.steps) == list(state.steps)
    assert all(again.steps[key].seconds == state.steps[key].seconds for key in saved.steps)  # kept as they were
    assert again.steps["final"].result.test == state.steps["final"].result.test


@pytest.mark.parametrize("name", ["resnet34", "convmixer"])
def test_each_steps_plan_lists_the_fits_it_ran_beside_its_measured_time(name: str, studies):
    _, _, out = studies[name]
    state, plan = read_study(out / "study.json"), read_plan(out / "plan.json")  # as the last run left them
    assert [s.name for s in plan.steps] == [f"{name}/{key}" for key in state.steps]
    for number, step in enumerate(plan.steps, start=1):
        ran = len(list((out / f"{number:02d}-{step.name.split('/')[1]}").rglob("last.pt")))  # one per fit
        assert step.fits == ran, step.name
        assert step.done and step.seconds is not None and step.seconds > 0
        assert (step.estimate_seconds > 0) == (ran > 0)
        assert state.steps[step.name.split("/")[1]].estimate_seconds == step.estimate_seconds
    assert plan.rates and plan.seconds == sum(s.seconds for s in plan.steps)


def test_the_random_final_cv_fits_the_folds_asked_and_pairs_on_their_images(studies):
    state, _, out = studies["resnet34"]
    final = state.steps["final"].result
    assert len(final.folds["random"]) == 1 and len(final.folds["grouped"]) == 2
    assert final.gap.n_images == final.test["random"].n < final.test["grouped"].n
    assert "1 of its 2 folds fitted, so" in final.summary and "train.epochs 3)" in final.summary
    assert final.timing["random"].epochs_run == 3 and final.timing["grouped"].epochs_run == 2 * 2  # over its folds


def test_each_study_carries_its_own_options_and_its_fits_none(studies):
    stored = {name: studies[name][0].options for name in studies}
    assert stored["convmixer"]["split_ratios"] == [0.75] and "split_ratios" not in stored["resnet34"]
    assert "subset_fraction" not in stored["convmixer"] and stored["resnet34"]["subset_fraction"] == 0.5
    weights = {name: config_from_dict(studies[name][0].config).train.weights for name in studies}
    assert weights["resnet34"].endswith("w.pt") and weights["convmixer"] == ""
    assert len(studies["convmixer"][0].steps["split_ratio"].result.scores) == 1
    fits = [json.loads(p.read_text()) for name in studies for p in studies[name][2].glob("0*/**/config.json")]
    assert len(fits) > 20 and not any("study" in fit for fit in fits)


def test_a_study_resumes_only_with_the_options_it_ran_with(studies):
    _, (config, options), out = studies["convmixer"]
    with pytest.raises(DefungiError, match=r"other options \(study.convmixer.depths\); use a new --out"):
        study_job("convmixer", config, out, options | {"study.convmixer.depths": "[8]"})


def test_final_fits_may_be_ensembles_while_explorations_fit_one_model(studies):
    state, _, out = studies["convmixer"]
    final = state.steps["final"].result
    assert "an ensemble of 2 fits" in final.summary
    for mode in ("grouped", "random"):
        fold = read_run_metrics(out / final.runs[mode] / "fold-0" / "metrics.json")
        assert fold.protocol.ensemble == 2 and fold.protocol.split == mode
    explored = [config_from_dict(json.loads(p.read_text())).train.ensemble for p in out.glob("0[2-6]-*/**/config.json")]
    assert explored and set(explored) == {1}


def test_depth_step_states_a_verdict_on_16_mixers(studies):
    depth = studies["convmixer"][0].steps["depth"].result
    assert {r.depth for r in depth.rows} == {8, 16}
    assert "16 mixers" in depth.summary and "claim" in depth.summary


def test_combined_report(studies, tmp_path: Path):
    page = build_combined_report([studies["resnet34"][2], studies["convmixer"][2]], tmp_path / "report")
    text = page.read_text()
    assert "resnet34, published (random split)" in text and "convmixer, grouped 2-fold CV, per specimen" in text
    assert text.count("data:image/png;base64") == 8 and text.count("random minus grouped") == 2
    assert "inference images/s" in text


def test_main_job_resumes_both_studies_and_returns_the_report(studies, monkeypatch: pytest.MonkeyPatch):
    _, (config, options), out = studies["resnet34"]
    real = jobs.transfer_overrides  # the transfer recipe, sized for tiny data
    monkeypatch.setattr(
        jobs, "transfer_overrides", lambda c, k: real(c, k) | {"train.batch_size": 8, "data.image_size": 32}
    )
    before = json.loads((out / "study.json").read_text())
    page, table = main_job(config, out.parent, options)
    assert page == out.parent / "report" / "report.html" and page.exists()
    assert "Beside the studies" in page.read_text() and (out.parent / "transfer" / "oof.csv").exists()
    plan = read_plan(out.parent / "plan.json")  # the whole job's steps: every study step, then the transfer recipe
    assert [s.name for s in plan.steps][-1] == "transfer" and len(plan.steps) == 15
    assert plan.steps[-1].fits == 2 and plan.steps[-1].seconds is not None and plan.seconds is not None
    assert "Time: the plan&#x27;s estimate" in page.read_text() or "Time: the plan's estimate" in page.read_text()
    assert "| convmixer, published (random split) |  | 0.780 | 0.810 | 0.790 | 0.800 |" in table.markdown()
    assert "transfer (efficientnet-lite0, grouped 2-fold CV), per specimen" in table.markdown()  # beside the studies
    for name in ("resnet34", "convmixer"):  # paired with each study's grouped recipe on the same images
        assert f"transfer minus the grouped final recipe of {name} (paired)" in page.read_text()
    again = json.loads((out / "study.json").read_text())
    assert again["steps"] == before["steps"]  # every step read back, nothing refitted


def test_study_page_is_rebuilt_from_its_files_without_a_model(studies, tmp_path: Path):
    _, _, out = studies["resnet34"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.pt", "*.png", "report.*"))
    (page,) = redraw_job(copy)
    assert page == copy / "report.html" and page.read_text().count("data:image/png;base64") >= 14
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()  # the same page, drawn again
