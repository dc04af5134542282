"""Config: defaults < recipe < file < overrides, type checks, unknown keys, recipes valid."""
import dataclasses
import json

import pytest

from salunet.train.config import RECIPES, TrainConfig, config_from_json, parse_value, resolve_config


def test_precedence():
    cfg = resolve_config("cpu-quick", {"lr": "0.2"}, base={"epochs": 3, "lr": 0.01})
    assert cfg.lr == 0.2 and cfg.epochs == 3 and cfg.width == 16 and cfg.recipe == "cpu-quick"
    assert resolve_config().lr == TrainConfig().lr


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_resolves(recipe):
    cfg = resolve_config(recipe)
    assert cfg.epochs > 0 and cfg.lr > 0


def test_types_and_parsing():
    cfg = resolve_config(None, {"width": "none", "flip": "false", "model_overrides": '{"salu_b0": 0.3}',
                                "warmup_epochs": "2", "ema_decay": "0.9"})
    assert cfg.width is None and cfg.flip is False and cfg.model_overrides == {"salu_b0": 0.3}
    assert cfg.warmup_epochs == 2.0 and isinstance(cfg.warmup_epochs, float)


@pytest.mark.parametrize("over,match", [
    ({"lrr": "1"}, "unknown config key 'lrr'"),
    ({"epochs": "ten"}, "epochs: 'ten' is not an integer"),
    ({"epochs": "0"}, "epochs must be positive"),
    ({"batch_size": "-4"}, "batch_size must be positive"),
    ({"optimizer": "lion"}, "optimizer: 'lion' is not one of"),
    ({"flip": "maybe"}, "not a boolean"),
    ({"lr": "nan"}, "lr must be a finite positive number"),
    ({"ema_decay": "1.0"}, "ema_decay must be in"),
    ({"width": "wide"}, "width: 'wide' is not an integer"),
    ({"model_overrides": "[1]"}, "model_overrides: \\[1\\] has type list, expected dict"),
])
def test_bad_values(over, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(None, over)


def test_unknown_recipe_and_config_file(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'fast'; choose one of"):
        resolve_config("fast")
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"epochs": 2, "nope": 1}))
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        config_from_json(p)
    p.write_text(json.dumps({"epochs": "two"}))
    with pytest.raises(ValueError, match="epochs: 'two' is not an integer"):
        config_from_json(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        config_from_json(p)
    with pytest.raises(FileNotFoundError):
        config_from_json(tmp_path / "missing.json")


def test_defaults_are_the_quick_digits_run():
    """Bare ``salunet train`` must fit the README's budget: the defaults are the cpu-quick settings."""
    defaults, quick = dataclasses.asdict(resolve_config()), dataclasses.asdict(resolve_config("cpu-quick"))
    assert {k: v for k, v in quick.items() if k != "recipe"} == {k: v for k, v in defaults.items() if k != "recipe"}
    assert defaults["data"] == "digits" and defaults["width"] == 16 and defaults["epochs"] <= 6
    assert defaults["flip"] is False  # digits are not mirror-symmetric


def test_recipes_do_not_inherit_the_digits_defaults():
    for name in ("cifar-resnet", "cifar-vit", "imagenet-resnet"):
        cfg = resolve_config(name)
        assert cfg.width is None and cfg.flip is True, name
    assert resolve_config("cifar-resnet").crop_padding == 4
    assert resolve_config("cifar-vit").ema_decay == 0.0  # the ViT-CIFAR baseline has no EMA


def test_every_field_round_trips_through_its_string_form():
    """Field types come from typing.get_type_hints (no eval of annotation strings)."""
    for f in dataclasses.fields(TrainConfig):
        v = getattr(TrainConfig(), f.name)
        text = json.dumps(v) if isinstance(v, dict) else ("none" if v is None else str(v))
        assert parse_value(f.name, text) == v, f.name


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        parse_value("epoch", "1")
