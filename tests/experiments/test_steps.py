from pathlib import Path
from typing import Any

import pytest

from defungi.errors import DefungiError
from defungi.experiments.studies import STUDIES
from defungi.experiments.studies.convmixer import ConvMixerOptions
from defungi.experiments.studies.resnet34 import ResNet34Options
from defungi.experiments.studies.runner import Study, StudyContext, StudyOptions, _same_options, load_options
from defungi.experiments.studies.steps import within_noise
from defungi.results.study import Curves, Depth, Final, FitSummary, Grid, SplitRatio, StudyState


def test_a_choice_whose_interval_overlaps_the_runner_up_is_within_noise():
    overlapping = within_noise({"a": (0.70, [0.60, 0.78]), "b": (0.66, [0.57, 0.75]), "c": (0.5, [0.4, 0.6])})
    assert overlapping.startswith(" Within noise") and "runner-up's (b:" in overlapping
    apart = within_noise({"a": (0.90, [0.85, 0.95]), "b": (0.60, [0.50, 0.70])})
    assert "lies above the runner-up's (b:" in apart
    assert within_noise({"a": (0.9, [0.8, 1.0])}) == ""


def _options(name: str, profile: str = "quick", **overrides: Any) -> StudyOptions:
    return load_options(STUDIES, name, profile, overrides)


@pytest.mark.parametrize("profile", ["quick", "full", "paper", "transfer"])
def test_every_profile_sizes_every_study_with_its_own_options(profile: str):
    resnet, convmixer = _options("resnet34", profile), _options("convmixer", profile)
    assert isinstance(resnet, ResNet34Options) and isinstance(convmixer, ConvMixerOptions)
    assert not hasattr(resnet, "split_ratios") and not hasattr(convmixer, "subset_fraction")
    if profile == "full":  # [study.convmixer]: its own sizes and its fits' width
        assert convmixer.epochs == 5 and convmixer.split_ratios == [0.6, 0.75, 0.9]
        assert convmixer.config == {"train.model_args": {"dim": 128}} and resnet.epochs == 6 and resnet.config == {}
    if profile == "quick":  # [study] for every study, [study.NAME] for one: the 3-hour budget
        assert convmixer.epochs == resnet.epochs == 2 and resnet.random_folds == convmixer.random_folds == 1
        assert resnet.random_config == convmixer.random_config == {"train.epochs": 20, "train.patience_epochs": 6}
        assert convmixer.split_ratios == [0.75, 0.9] and resnet.grid2_lr_factors == [1.0, 2.0]
        assert convmixer.config == {"train.model_args": {"dim": 128}} and resnet.config == {}
    if profile == "paper":  # [study]: every study
        assert resnet.final_folds == convmixer.final_folds == 5


def test_overrides_come_after_the_profile_and_a_study_section_after_every_study():
    assert _options("convmixer", **{"study.epochs": "1"}).epochs == 1  # over the profile's [study.convmixer]
    both = {"study.epochs": "1", "study.convmixer.epochs": "2", "study.convmixer.depths": "[8]"}
    assert _options("convmixer", **both).epochs == 2 and _options("resnet34", **both).epochs == 1
    assert _options("convmixer", **{"study.convmixer.config": '{"train.ensemble": 2}'}).config == {"train.ensemble": 2}


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("study.split_ratios", "[0.5]", "the convmixer study's own; use study.convmixer.split_ratios"),
        ("study.epoch", "3", "unknown config key 'study.epoch'; known: config, curve_fractions, epochs"),
        ("study.resnet34.depths", "[8]", "unknown config key 'study.resnet34.depths'"),  # checked whichever study runs
        ("study.convmixer", "3", "'study.convmixer' is a section"),
        ("study.convmixer.split_repeats", "two", "wants int"),
    ],
)
def test_a_bad_study_option_is_named(key: str, value: str, needle: str):
    with pytest.raises(DefungiError, match=needle):
        _options("convmixer", **{key: value})


def test_a_step_is_registered_with_its_result_type_and_refused_without_one():
    assert [s.result_type for s in STUDIES["convmixer"].steps] == [
        FitSummary, Curves, SplitRatio, Grid, FitSummary, Depth, Final
    ]  # fmt: skip
    study = Study("toy", "convmixer", {}, StudyOptions)

    def untyped(ctx: StudyContext[StudyOptions], out: Path) -> dict:
        return {}

    with pytest.raises(TypeError, match="not a StepResult"):
        study.step("untyped", "1. Untyped")(untyped)


def test_a_folder_of_an_earlier_version_resumes_where_an_option_it_lacks_is_at_its_default():
    def state(**options: Any) -> StudyState:
        return StudyState("convmixer", "convmixer", {}, {}, options)

    earlier, defaults = state(epochs=2), {"epochs": 6, "random_config": {}}
    _same_options(earlier, state(epochs=2, random_config={}), defaults, Path("out"))  # ran at the default
    with pytest.raises(DefungiError, match=r"other options \(study.convmixer.random_config\)"):
        _same_options(earlier, state(epochs=2, random_config={"train.epochs": 20}), defaults, Path("out"))
