"""Every registered model: shapes, finiteness, gradients, batch size 1, train == eval without norms,
parameter counts, and the init rule (stage std within [0.5, 2])."""
import pytest
import torch
from torch import nn

import salunet
from salunet.models import ACTS, NORMS, create_model, list_models

SMALL = {"width": 8}
SMALL_VIT = {"width": 24, "depth": 2}


def small(name, **kw):
    extra = SMALL_VIT if name in ("salunet_t", "vit_ln") else SMALL
    return create_model(name, num_classes=7, **{**extra, **kw})


def _input(name, n):
    side = 64 if "50" in name else 32  # ImageNet stem: keep layer4 at 2x2 so BatchNorm works at batch size 1
    return torch.randn(n, 3, side, side)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_param(name):
    m = small(name)
    y = m(_input(name, 2))
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    y.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("name", list_models())
def test_batch_size_one_train_mode(name):
    m = small(name).train()
    y = m(_input(name, 1))
    y.sum().backward()
    assert y.shape == (1, 7) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", list_models("salunet_*"))
def test_norm_free_train_equals_eval(name):
    m = small(name)
    x = _input(name, 3)
    y_train = m.train()(x)
    torch.testing.assert_close(m.eval()(x), y_train)
    assert not any(isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) for mod in m.modules())
    assert len(list(m.buffers())) == 0  # no running statistics at all


@pytest.mark.parametrize("name,classes,count", [("resnet18_bn", 10, 11_173_962), ("resnet50_bn", 1000, 25_557_032),
                                                ("vit_ln", 10, 6_268_810)])
def test_exact_parameter_counts(name, classes, count):
    m = create_model(name, num_classes=classes)
    assert sum(p.numel() for p in m.parameters()) == count


def test_salunet_and_twin_share_structure():
    s, b = create_model("salunet_c18", num_classes=10), create_model("resnet18_bn", num_classes=10)
    # every BatchNorm(C) became SALU(C): 2C parameters each, plus 2C per SWALU
    n_act = sum(isinstance(m, salunet.SWALU) for m in s.modules())
    extra = sum(2 * m.num_features for m in s.modules() if isinstance(m, salunet.SWALU))
    assert n_act == 17 and sum(p.numel() for p in s.parameters()) == 11_173_962 + extra


def _stage_stds(m, x):
    out = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: out.__setitem__(n, o.std().item()))
             for n, mod in m.stages().items()]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("name,width,shape", [("salunet_c18", 16, (16, 3, 32, 32)), ("salunet_c18", None, (8, 3, 32, 32)),
                                              ("salunet_c50", 16, (4, 3, 64, 64)), ("salunet_c50", None, (2, 3, 64, 64)),
                                              ("salunet_t", 96, (8, 3, 32, 32)), ("salunet_t", None, (4, 3, 32, 32))])
def test_init_keeps_stage_std_in_range(name, width, shape):
    m = create_model(name, num_classes=10, width=width)
    stds = _stage_stds(m, torch.randn(shape))
    assert len(stds) >= 5
    bad = {k: round(v, 3) for k, v in stds.items() if not 0.5 <= v <= 2.0}
    assert not bad, f"stage std out of [0.5, 2] at init: {bad}"


def test_naive_init_would_fail_the_rule():
    """The check can fail: PyTorch's default conv init and a0 = b0 = 1 lose the signal (SPEC.md)."""
    m = create_model("salunet_c18", num_classes=10, width=16, conv="default", salu_a0=1.0, salu_b0=1.0)
    stds = _stage_stds(m, torch.randn(16, 3, 32, 32))
    assert stds["layer4"] < 0.5


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("act", ["relu", "swalu", "prelu"])
def test_every_norm_act_pair_builds_and_runs(norm, act):
    m = create_model("resnet18_bn", num_classes=3, width=8, norm_layer=norm, act_layer=act)
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize("norm", ["salu", "batchnorm", "layernorm", "identity", "batchnorm+salu"])
@pytest.mark.parametrize("act", list(ACTS))
def test_vit_norm_act_pairs(norm, act):
    m = create_model("vit_ln", num_classes=3, width=24, depth=1, norm_layer=norm, act_layer=act)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_callable_layers_and_width():
    m = create_model("salunet_c18", num_classes=10, width=4, norm_layer=lambda c, dim=1: nn.GroupNorm(2, c))
    assert sum(isinstance(x, nn.GroupNorm) for x in m.modules()) > 0
    assert create_model("salunet_t", num_classes=10, width=48).num_features == 48


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="resnet34"), "unknown model 'resnet34'; choose one of"),
    (dict(name="salunet_c18", norm_layer="rmsnorm"), "unknown norm_layer 'rmsnorm'; choose one of"),
    (dict(name="salunet_c18", act_layer="tanh"), "unknown act_layer"),
    (dict(name="salunet_c18", depth=3), "unknown override"),
    (dict(name="salunet_c18", width=0), "width must be a positive integer"),
    (dict(name="salunet_t", heads=5), "not divisible by heads"),
])
def test_bad_arguments(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        create_model(name, num_classes=10, **kwargs)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("salunet_c18", num_classes=0)


def test_list_models_pattern():
    assert list_models("salunet_*") == ["salunet_c18", "salunet_c50", "salunet_t"]
    assert set(list_models()) == {"salunet_c18", "resnet18_bn", "salunet_c50", "resnet50_bn", "salunet_t", "vit_ln"}
