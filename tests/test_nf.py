"""The normalization-free toolkit (models/nf.py, train/optim.py): weight standardisation against a float64
reference and gradcheck, folding, the residual gain, every option on ResNet-18 / ResNet-50 (gradients, batch
size 1, init stds), AGC against its definition, the SALU learning-rate group, and trainer defaults that a
model declares."""
import math

import pytest
import torch
from torch import nn

import salunet
from salunet.models import MODEL_TRAIN_DEFAULTS, NFConv2d, create_model, fold_nf_convs
from salunet.models.nf import ws_kernel
from salunet.train import adaptive_clip_, param_groups, resolve_config
from salunet.train.optim import agc_parameters, make_optimizer, set_lr
from helpers import stage_stds

OPTIONS = [{"conv_ws": "scaled"}, {"conv_ws": "center"}, {"conv_bias": True}, {"res_gain": 0.0},
           {"res_gain": 0.5}, {"conv_ws": "scaled", "conv_bias": True, "res_gain": 0.2}]


def _ref_scaled(w: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    w = w.double()
    out = torch.empty_like(w)
    for o in range(w.shape[0]):  # one output channel at a time, straight from the definition
        row = w[o].flatten()
        mu = row.mean()
        var = ((row - mu) ** 2).mean()
        out[o] = gain[o].double() * math.sqrt(2.0) * (w[o] - mu) / torch.sqrt(row.numel() * var + eps)
    return out


def test_scaled_ws_matches_float64_reference():
    w, gain = torch.randn(6, 4, 3, 3) * 3 + 1, torch.rand(6) + 0.5
    got = ws_kernel(w, "scaled", gain, 1e-4)
    torch.testing.assert_close(got.double(), _ref_scaled(w, gain, 1e-4), rtol=1e-5, atol=1e-6)
    rows = got.flatten(1).double()
    assert rows.mean(1).abs().max() < 1e-6  # zero mean per output channel
    # fan_in * var = 2 gain^2 (up to eps): the Kaiming-normal second moment, times the gain
    torch.testing.assert_close(rows.var(1, unbiased=False) * 36, 2 * gain.double() ** 2, rtol=1e-4, atol=0)


def test_centred_ws_removes_only_the_mean():
    w = torch.randn(5, 3, 3, 3) + 2
    got = ws_kernel(w, "center")
    assert got.flatten(1).mean(1).abs().max() < 1e-6
    torch.testing.assert_close(got - w, (got - w)[:, :1, :1, :1].expand_as(w))  # a constant per channel
    assert ws_kernel(w, "none") is w


@pytest.mark.parametrize("ws", ["none", "center", "scaled"])
def test_nfconv_gradcheck(ws):
    conv = NFConv2d(3, 4, 3, 1, 1, bias=True, ws=ws, res_gain=0.7).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.double, requires_grad=True)
    names = [n for n, _ in conv.named_parameters()]
    assert set(names) == {"weight", "bias", "res_gain"} | ({"gain"} if ws == "scaled" else set())
    params = [p.detach().clone().requires_grad_() for _, p in conv.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(conv, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))  # the input and every parameter


@pytest.mark.parametrize("overrides", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("name,side", [("salunet_c18", 32), ("salunet_c50", 64)])
def test_option_trains_at_batch_size_one(name, side, overrides):
    torch.manual_seed(0)
    m = create_model(name, num_classes=7, width=8, **overrides)
    x = torch.randn(1, 3, side, side)
    m(x).logsumexp(1).sum().backward()
    nf = [c for c in m.modules() if isinstance(c, NFConv2d)]
    assert nf, "the option built no NFConv2d"
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    if "res_gain" in overrides:  # the gain of every block is learnt (it gets a gradient even at 0)
        gains = [c.res_gain for c in nf if c.res_gain is not None]
        assert len(gains) == sum(1 for b in m.modules() if hasattr(b, "branch_end")) > 0
        assert all(g.grad.abs() > 0 for g in gains)


def test_defaults_build_the_papers_plain_convs():
    for name in ("salunet_c18", "resnet18_bn", "salunet_c50", "resnet50_bn"):
        m = create_model(name, num_classes=10, width=8)
        assert not any(isinstance(c, NFConv2d) for c in m.modules())
        assert all(c.bias is None for c in m.modules() if isinstance(c, nn.Conv2d))


def test_skipinit_blocks_start_as_their_shortcut():
    torch.manual_seed(0)
    m = create_model("salunet_c18", num_classes=10, width=8, res_gain=0.0)
    block = m.layer2[0]
    x = torch.randn(2, 8, 16, 16)
    ref = block.tail.act(block.shortcut(x))  # act(0 + shortcut): the branch contributes exactly nothing
    torch.testing.assert_close(block(x), ref)


def test_res_gain_is_refused_behind_a_normalizing_branch_end():
    with pytest.raises(ValueError, match="res_gain needs branches that end in a SALU"):
        create_model("resnet18_bn", num_classes=10, res_gain=0.0)
    with pytest.raises(ValueError, match="conv_ws must be one of"):
        create_model("salunet_c18", num_classes=10, conv_ws="bogus")
    with pytest.raises(ValueError, match="res_gain must be None"):
        create_model("salunet_c18", num_classes=10, res_gain=-1.0)


@pytest.mark.parametrize("name,side", [("salunet_c18", 32), ("salunet_c50", 64)])
def test_folding_gives_the_same_outputs(name, side):
    torch.manual_seed(0)
    m = create_model(name, num_classes=10, width=8, conv_ws="scaled", conv_bias=True, res_gain=0.3)
    with torch.no_grad():  # move gains and biases off their init so the fold has something to carry
        for c in m.modules():
            if isinstance(c, NFConv2d):
                c.gain.uniform_(0.5, 1.5)
                c.bias.normal_(0, 0.1)
    m.eval()
    x = torch.randn(3, 3, side, side)
    ref = m(x)
    n = sum(isinstance(c, NFConv2d) for c in m.modules())
    assert fold_nf_convs(m) == n > 0
    assert not any(isinstance(c, NFConv2d) for c in m.modules())
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("overrides", [{"conv_ws": "scaled"}, {"conv_ws": "center"}, {"conv_bias": True},
                                       {"conv_ws": "scaled", "conv_bias": True}], ids=str)
def test_ws_keeps_stage_std_in_range(overrides, seed):
    torch.manual_seed(seed)
    m = create_model("salunet_c18", num_classes=10, width=16, **overrides)
    stds = stage_stds(m, torch.randn(8, 3, 32, 32))
    bad = {k: round(v, 3) for k, v in stds.items() if not 0.5 <= v <= 2.0}
    assert not bad, f"stage std out of [0.5, 2] at init: {bad}"


# ---- trainer side ----------------------------------------------------------------------------------------

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
