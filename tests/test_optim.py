"""train/optim.py: the learning-rate schedule, parameter groups (weight decay, the SALU learning-rate group),
AGC against its definition, and trainer defaults that a model declares (train/config.py)."""
import json
import math

import pytest
import torch
from torch import nn

import salunet
from salunet.models import MODEL_TRAIN_DEFAULTS, create_model
from salunet.train import adaptive_clip_, lr_at, param_groups, resolve_config
from salunet.train.optim import agc_parameters, make_optimizer, set_lr


def test_param_groups_exclude_salu_and_biases():
    m = create_model("salunet_t", num_classes=10, width=24, depth=1)
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(n.endswith("weight") for n in (names[id(p)] for p in decay["params"]))
    nd = {names[id(p)] for p in no_decay["params"]}
    assert any("log_a" in n for n in nd) and any("pos_embed" in n for n in nd) and any(n.endswith("bias") for n in nd)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert all(lr_at(s, 100, 10, 1.0, 0.0) >= lr_at(s + 1, 100, 10, 1.0, 0.0) for s in range(10, 99))
    assert not math.isnan(lr_at(5, 10, 0, 1.0, 0.0))


def test_agc_clips_each_unit_to_its_bound():
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1e-6]]))
    g = torch.tensor([[0.5, 0, 0, 0], [0, 0.01, 0, 0], [3.0, 4.0, 0, 0]])
    lin.weight.grad = g.clone()
    adaptive_clip_([lin.weight], 0.1)
    got = lin.weight.grad
    torch.testing.assert_close(got[0], g[0] * 0.1 / 0.5)  # 0.5 > 0.1 * 1: scaled to the bound 0.1
    torch.testing.assert_close(got[1], g[1])  # 0.01 < 0.1 * 2: untouched
    torch.testing.assert_close(got[2].norm(), torch.tensor(0.1 * 1e-3))  # tiny weights: eps = 1e-3 bounds it
    with pytest.raises(ValueError, match="must be > 0"):
        adaptive_clip_([lin.weight], 0.0)


def test_agc_parameters_skip_the_classifier_and_vectors():
    m = create_model("salunet_c18", num_classes=10, width=8, conv_ws="scaled", conv_bias=True)
    ps = {id(p) for p in agc_parameters(m)}
    assert id(m.fc.weight) not in ps and id(m.fc.bias) not in ps
    assert all(p.dim() >= 2 for p in agc_parameters(m))
    assert {id(c.weight) for c in m.modules() if isinstance(c, nn.Conv2d)} <= ps


def test_salu_learning_rate_group():
    m = create_model("salunet_c18", num_classes=10, width=8)
    assert len(param_groups(m, 5e-4)) == 2  # unchanged layout without a scale (old optimizer states load)
    groups = param_groups(m, 5e-4, salu_lr_scale=0.1)
    salu = {id(p) for s in m.modules() if isinstance(s, salunet.nn.SaluFamily) for p in s.parameters(recurse=False)}
    assert {id(p) for p in groups[2]["params"]} == salu and groups[2]["lr_scale"] == 0.1
    assert groups[2]["weight_decay"] == 0.0
    opt = make_optimizer(m, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, salu_lr_scale=0.1)
    set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.2, 0.02])


def test_model_declared_trainer_defaults(monkeypatch):
    monkeypatch.setitem(MODEL_TRAIN_DEFAULTS, "salunet_c18", {"agc": 0.02, "salu_lr_scale": 0.5})
    cfg = resolve_config(overrides={"model": "salunet_c18"})
    assert (cfg.agc, cfg.salu_lr_scale) == (0.02, 0.5)
    cfg = resolve_config(overrides={"model": "salunet_c18", "agc": 0.0})  # an explicit value wins
    assert (cfg.agc, cfg.salu_lr_scale) == (0.0, 0.5)
    cfg = resolve_config(overrides={"model": "resnet18_bn"})  # the twin declares nothing
    assert (cfg.agc, cfg.salu_lr_scale) == (0.0, 1.0)
    with pytest.raises(ValueError, match="salu_lr_scale"):
        resolve_config(overrides={"salu_lr_scale": 0})


@pytest.mark.parametrize("model,over", [("salunet_c18", {"conv_ws": "center"}), ("salunet_t", {"depth": 1}),
                                        ("salunet_c50", {"conv_ws": "scaled", "res_gain": 0.1})])
def test_agc_and_salu_lr_scale_train_every_architecture(tmp_path, model, over):
    """The trainer options reach a run of each architecture: recorded in its config, and the loss stays finite
    (what AGC and the SALU group do is tested on their own above)."""
    from salunet.train import train

    s = train(model=model, width=12 if model == "salunet_t" else 4, model_overrides=over, data="digits",
              train_subset=128, test_subset=64, batch_size=32, epochs=1, lr=0.05, agc=0.02, salu_lr_scale=0.5,
              ema_decay=0.0, progress=False, out=str(tmp_path), name="r")
    assert s["epochs"] == 1 and math.isfinite(s["final"]["train_loss"])
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (cfg["agc"], cfg["salu_lr_scale"]) == (0.02, 0.5)
