from pathlib import Path

import pytest

from defungi.config import config_from_dict, load_config, same_config
from defungi.errors import DefungiError


def test_profiles_overrides_and_round_trip():
    quick, paper = load_config("quick"), load_config("paper")
    assert quick.data.image_size < paper.data.image_size == 224
    config = load_config(
        "quick", {"train.lr": "0.01", "train.tta": "false", "train.model_args": '{"dim": 8}', "data.seed": None}
    )
    assert config.train.lr == 0.01 and config.train.tta is False and config.train.model_args == {"dim": 8}
    assert config_from_dict(config.to_dict()) == config
    assert "study" not in config.to_dict()  # a run carries no study's options (the profile's [study] table)


def test_a_dotted_key_into_the_model_args_reads_its_value_and_keeps_the_others():
    config = load_config("transfer", {"train.model_args.pool_border": "0.3", "train.model_args.extra": "true"})
    assert config.train.model_args == {"pool_border": 0.3, "extra": True}
    kept = load_config("quick", {"train.model_args.depth": "16"})
    assert kept.train.model_args == load_config("quick").train.model_args | {"depth": 16}


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("train.lrr", "1", "unknown config key"),
        ("train.epochs", "many", "wants int"),
        ("data.split", "stratified", "use one of"),
        ("train.tta", "maybe", "true/false"),
        ("train.model_args", "8", "wants a dict"),
        ("study.grid_lrs", "[0.1]", "sizes a published study, not a run"),
        ("train.prior_weight", "-1", "0 \\(balanced decision\\) to 1"),
    ],
)
def test_bad_values_name_the_key(key: str, value: str, needle: str):
    with pytest.raises(DefungiError, match=needle):
        load_config("quick", {key: value})


def test_unknown_profile():
    with pytest.raises(DefungiError, match="unknown profile"):
        load_config("fast")


def test_same_config_resolves_roots_and_fills_keys_added_later(tmp_path: Path):
    (tmp_path / "d").mkdir()
    a = load_config("quick", {"data.root": str(tmp_path / "d")}).to_dict()
    b = load_config("quick", {"data.root": str(tmp_path / "x" / ".." / "d")}).to_dict()
    assert same_config(a, b)
    older = a | {"train": {k: v for k, v in a["train"].items() if k != "cached_views"}}  # saved before the key existed
    assert same_config(older, a)
    assert not same_config(a, load_config("quick", {"data.root": str(tmp_path / "d"), "train.lr": 0.5}).to_dict())


def test_pretrained_weights_bring_their_normalisation_unless_it_is_set():
    pretrained = {"train.model": "efficientnet-lite0", "train.pretrained": True}
    assert load_config("quick").data.normalize == "luma"  # from scratch: the profile's
    assert load_config("quick", pretrained).data.normalize == "pretrained"
    assert load_config("quick", pretrained | {"data.normalize": "luma"}).data.normalize == "luma"


def test_a_profile_variant_is_its_base_with_its_own_values_over_it(tmp_path: Path):
    lite2, transfer = load_config("transfer-lite2").to_dict(), load_config("transfer").to_dict()
    assert (lite2["train"]["model"], lite2["data"]["image_size"], lite2["profile"]) == (
        "efficientnet-lite2",
        260,
        "transfer-lite2",
    )
    assert lite2["train"]["model_args"] == transfer["train"]["model_args"] == {"pool_border": 0.15}
    differ = {(t, k) for t in ("data", "train") for k in transfer[t] if lite2[t][k] != transfer[t][k]}
    assert differ == {("data", "image_size"), ("train", "model")}
    (tmp_path / "mine.toml").write_text('base = "transfer-lite2"\n[train]\nlr = 0.5\n')
    mine = load_config(str(tmp_path / "mine.toml"))
    assert (mine.train.lr, mine.train.model, mine.data.image_size, mine.train.pretrained) == (
        0.5,
        "efficientnet-lite2",
        260,
        True,
    )


@pytest.mark.parametrize("profile", ["transfer", "transfer-lite2", "transfer-pair"])
def test_a_pretrained_profile_runs_its_model_at_the_side_its_weights_were_trained_at(profile: str):
    from defungi.models import model_entry

    config = load_config(profile)
    assert config.train.pretrained and config.data.image_size == model_entry(config.train.model).input_size


def test_a_profile_is_named_by_its_own_profile_key_else_by_its_file(tmp_path: Path):
    (tmp_path / "mine.toml").write_text('base = "transfer-lite2"\n[train]\nlr = 0.5\n')
    (tmp_path / "ours.toml").write_text('base = "quick"\nprofile = "our-lab"\n')
    assert load_config(str(tmp_path / "mine.toml")).profile == "mine"  # not its base's name
    assert load_config(str(tmp_path / "ours.toml")).profile == "our-lab"
    assert load_config("transfer-lite2").profile == "transfer-lite2" and load_config("quick").profile == "quick"
