import logging
from pathlib import Path

import numpy as np
import pytest

from defungi.experiments import meter as meter_module
from defungi.experiments.meter import FitPlan, JobMeter, Probe, fit_seconds, job_plan, planned_job, step_plan
from defungi.experiments.protocols import dataset_for, fit_run, plan_fits
from defungi.jobs import train_job
from defungi.results.plan import Rate, StepPlan, read_plan
from tests.conftest import tiny_config

RATE = Rate("m", "float32", train_images_per_s=10.0, eval_images_per_s=100.0)


def _fake_probe() -> Probe:
    """A probe that measures nothing: every model trains at 10 images/s and answers at 100."""
    probe = Probe()
    probe._measure = lambda config, key: Rate(key, "float32", RATE.train_images_per_s, RATE.eval_images_per_s)
    return probe


def test_a_cross_validation_plans_each_fold_and_member_with_its_parts(tiny_data: Path):
    config = tiny_config(tiny_data, {"data.cv_folds": 3, "train.ensemble": 2})
    data = dataset_for(config, progress=False)
    fits = plan_fits(config, data)
    assert len(fits) == 6 and {f.config.train.seed for f in fits} == {0, 1}
    assert sum(f.sizes["test"] for f in fits) == 2 * len(data.labels)  # every image tested once per member
    assert all(f.images == 2 * f.sizes["train"] for f in fits)  # 2 epochs of its training part
    partial = plan_fits(tiny_config(tiny_data, {"data.cv_folds": 3, "data.cv_fit_folds": 1}), data)
    assert len(partial) == 1 and partial[0].sizes["test"] == fits[0].sizes["test"]


def test_a_fits_estimate_counts_epochs_scoring_and_the_refusal_readings(tiny_data: Path):
    sizes = {"train": 100, "val": 200, "test": 50}
    plain = FitPlan(tiny_config(tiny_data, {"train.tta": False, "train.ood": False}), sizes)
    epoch, rest = fit_seconds(plain, RATE)
    assert epoch == pytest.approx(100 / 10 + 200 / 100) and rest == pytest.approx(250 / 100)
    tta = FitPlan(tiny_config(tiny_data, {"train.tta": True, "train.ood": False}), sizes)
    assert fit_seconds(tta, RATE)[1] == pytest.approx(8 * 250 / 100)
    refusing = FitPlan(tiny_config(tiny_data, {"train.tta": False, "train.ood": True}), sizes)
    assert fit_seconds(refusing, RATE)[1] == pytest.approx(250 / 100 + 350 / 100)  # one pass reads every part


def test_the_meter_credits_epochs_up_to_the_steps_estimate_and_records_its_time(tiny_data: Path, tmp_path: Path):
    probe = _fake_probe()
    config = tiny_config(tiny_data, {"train.tta": False, "train.ood": False})
    split = {"train": np.arange(100), "val": np.arange(20)}
    step = step_plan("s", "a step", [FitPlan.of(config, split)], probe)
    assert step.fits == 1 and step.epochs == 2 and step.images == 200
    assert step.estimate_seconds == pytest.approx(2 * (100 / 10 + 20 / 100) + 20 / 100)
    path = tmp_path / "plan.json"
    meter = JobMeter(job_plan([step, step_plan("t", "another", [], probe)], probe), path, probe)
    with meter_module.metering(meter), meter_module.current_step("s") as planned:
        assert planned is step
        ticket = meter_module.on_fit(config, split)
        ticket.epoch()
        assert meter.done_s == pytest.approx(10.2)
        ticket.epoch(), ticket.epoch(), ticket.epoch()  # more epochs than planned: no more than the fit's estimate
        ticket.done()
        assert meter.done_s == pytest.approx(step.estimate_seconds)
    saved = read_plan(path)
    assert saved.steps[0].done and saved.steps[0].seconds is not None and not saved.steps[1].done
    assert saved.seconds is None  # a step is left


def test_a_resumed_job_keeps_the_time_already_spent_and_finished_steps_estimates(tmp_path: Path):
    path = tmp_path / "plan.json"
    probe = _fake_probe()
    first = job_plan(
        [StepPlan("a", "A", 1, 2, 3, 40.0, done=True, seconds=50.0), StepPlan("b", "B", 1, 2, 3, 60.0)], probe
    )
    first.steps[1].seconds = 25.0  # interrupted after 25 s
    JobMeter(first, path, probe).save()
    again = job_plan([StepPlan("a", "A", 0, 0, 0, 0.0, done=True), StepPlan("b", "B", 1, 2, 3, 70.0)], probe, path)
    assert (again.steps[0].estimate_seconds, again.steps[0].seconds, again.steps[0].fits) == (40.0, 50.0, 1)
    assert (again.steps[1].estimate_seconds, again.steps[1].seconds) == (70.0, 25.0)


def test_train_prints_its_plan_and_then_the_measured_time(tiny_data: Path, tmp_path: Path, caplog):
    config = tiny_config(tiny_data, {"data.cv_folds": 2})
    with caplog.at_level(logging.INFO, logger="defungi"):
        train_job(config, tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if "whole job" in r.getMessage() or " px (" in r.getMessage()]
    assert any("trains" in line and "img/s" in line for line in lines)  # the probe's speed
    totals = [line.split() for line in lines if "whole job (at most" in line]
    assert len(totals) == 2 and totals[0][-1] == "-" and totals[1][-1] != "-"  # before, then measured
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="defungi"):
        fit_run(config, tmp_path / "run")  # read back: nothing planned
    assert not any("whole job" in r.getMessage() for r in caplog.records)


def test_a_job_inside_a_planned_job_is_not_planned_again(tiny_data: Path):
    probe_steps = []
    with planned_job(lambda probe: [step_plan("x", "x", [], probe)], 3) as outer:
        with planned_job(lambda probe: probe_steps.append(1) or [], 3) as inner:
            assert outer is not None and inner is None and not probe_steps


def test_a_frozen_backbones_feature_pass_is_credited_when_it_ends_not_at_the_fits_end(tiny_data: Path):
    probe = Probe()
    probe._measure = lambda config, key: Rate(key, "float32", 10.0, 100.0, backbone_images_per_s=5.0)
    config = tiny_config(tiny_data, {"train.tta": False, "train.ood": False})
    split = {"train": np.arange(100), "val": np.arange(20)}
    step = step_plan("s", "a step", [FitPlan(config, {"train": 100, "val": 20}, cold_features=120)], probe)
    meter = JobMeter(job_plan([step], probe), None, probe)
    with meter_module.metering(meter), meter_module.current_step("s"):
        ticket = meter_module.on_fit(config, split)
        ticket.features(120)  # 120 images at 5/s, before the first epoch
        assert meter.done_s == pytest.approx(24.0)
        assert "about" in meter.status() and meter.status().startswith(f"{100 * 24 / step.estimate_seconds:.0f}%")
        ticket.epoch(), ticket.epoch()
        ticket.done()
        assert meter.done_s == pytest.approx(step.estimate_seconds)  # the step's whole estimate, no more
