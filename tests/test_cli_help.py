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


def test_salunet_models_shows_each_model_and_the_flags_it_declares_which_resolve_as_the_name_does(capsys):
    """``salunet models``: every registered model with its docstring's first sentence; the "trains by name with"
    flags, given to ``salunet train`` with a model that declares nothing, resolve to what the name declares."""
    import json
    import shlex

    from salunet.cli import build_parser
    from salunet.models import describe_model, model_train_defaults
    from salunet.train.config import resolve_config

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    heads = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert heads == list_models()
    for name in list_models():
        d = describe_model(name)
        assert d["summary"].endswith(".") and len(d["summary"]) > 30 and "``" not in d["summary"], name
    assert main(["models", "salunet_c18_v3", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    d = json.loads(line)
    assert (d["name"], d["architecture"], d["norm_layer"], d["declares"]) == (
        "salunet_c18_v3", "ResNet", "salu", model_train_defaults("salunet_c18_v3"))
    for name in ("salunet_c18_v3", "salunet_c50_v3", "salunet_t"):
        assert main(["models", name]) == 0
        text = " ".join(capsys.readouterr().out.split())
        flags = shlex.split(text.split("trains by name with: ", 1)[1])
        args = build_parser().parse_args(["train", *flags])
        given = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
        flagged = resolve_config(None, dict(given, model="resnet18_bn"))  # a model that declares nothing
        by_name = resolve_config(None, dict(model=name))
        assert {k: getattr(flagged, k) for k in model_train_defaults(name)} == model_train_defaults(name)
        assert dataclasses.replace(flagged, model=name) == by_name
    assert main(["models", "nothing*"]) == 2
    assert "no registered model matches 'nothing*'" in capsys.readouterr().err
