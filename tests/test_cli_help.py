"""``salunet train --help``: one line per config key, generated from the config's own field docs, with the
choices of the keys that take a fixed set of values."""
import dataclasses
import re

import pytest

from salunet.cli import main
from salunet.models import list_models
from salunet.train.config import FIELD_HELP, TrainConfig, field_choices


def test_every_config_field_has_one_help_line():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(FIELD_HELP) == sorted(names)
    for name, text in FIELD_HELP.items():
        assert text.strip() and "\n" not in text and len(text) < 160, name


@pytest.fixture
def train_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping: each option's help is one line
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    opts = {}  # option flag -> its help text
    for m in re.finditer(r"^  (--[a-z-]+)(?: \S+)?\s*\n?\s*(.*)$", out.split("options:", 1)[1], re.M):
        opts[m.group(1)] = m.group(2)
    return opts


def test_train_help_lists_every_field_with_its_doc_and_default(train_help):
    for f in dataclasses.fields(TrainConfig):
        if f.name == "recipe":  # set with --recipe, which has its own help
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in train_help, flag
        assert train_help[flag].startswith(FIELD_HELP[f.name]), flag
        assert "default " in train_help[flag], flag


@pytest.mark.parametrize("key", ["model", "data", "amp", "optimizer", "logger", "norm_layer", "act_layer", "crop"])
def test_train_help_lists_the_choices(train_help, key):
    choices = field_choices(key)
    assert choices
    assert f"one of: {', '.join(choices)}" in train_help["--" + key.replace("_", "-")]


def test_model_choices_are_the_registry():
    assert field_choices("model") == tuple(list_models())
    assert field_choices("lr") is None


def test_a_value_outside_the_choices_is_the_configs_one_line_error(capsys):
    assert main(["train", "--logger", "wandb"]) == 2
    assert capsys.readouterr().err.strip() == "salunet: error: logger: 'wandb' is not one of none, tensorboard"
