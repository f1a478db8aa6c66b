from defungi.experiments.studies.steps import within_noise


def test_a_choice_whose_interval_overlaps_the_runner_up_is_within_noise():
    overlapping = within_noise({"a": (0.70, [0.60, 0.78]), "b": (0.66, [0.57, 0.75]), "c": (0.5, [0.4, 0.6])})
    assert overlapping.startswith(" Within noise") and "runner-up's (b:" in overlapping
    apart = within_noise({"a": (0.90, [0.85, 0.95]), "b": (0.60, [0.50, 0.70])})
    assert "lies above the runner-up's (b:" in apart
    assert within_noise({"a": (0.9, [0.8, 1.0])}) == ""
