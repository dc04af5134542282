"""The normalization-free toolkit's model side (models/nf.py): weight standardisation against a float64
reference and gradcheck, folding, the residual gain, every option on ResNet-18 / ResNet-50 (gradients, batch
size 1, init stds). The trainer side (AGC, the SALU learning-rate group, model-declared defaults) is tested in
test_optim.py."""
import math

import pytest
import torch
from torch import nn

from salunet.models import NFConv2d, create_model, fold_nf_convs
from salunet.models.nf import ws_kernel
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


def test_scaled_fixed_ws_is_scaled_ws_with_gain_one_and_has_no_gain():
    w = torch.randn(6, 4, 3, 3) * 3 + 1
    torch.testing.assert_close(ws_kernel(w, "scaled_fixed").double(), _ref_scaled(w, torch.ones(6), 1e-4),
                               rtol=1e-5, atol=1e-6)
    conv = NFConv2d(4, 6, 3, ws="scaled_fixed")
    assert conv.gain is None and [n for n, _ in conv.named_parameters()] == ["weight"]
    with torch.no_grad():  # scale-invariant (up to eps = 1e-4 against fan_in var = 36): doubling changes nothing
        conv.weight.normal_()
        before = conv.effective_weight().clone()
        conv.weight.mul_(2.0)
        torch.testing.assert_close(conv.effective_weight(), before, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="ws must be one of"):
        ws_kernel(w, "scaledd")


def test_centred_ws_removes_only_the_mean():
    w = torch.randn(5, 3, 3, 3) + 2
    got = ws_kernel(w, "center")
    assert got.flatten(1).mean(1).abs().max() < 1e-6
    torch.testing.assert_close(got - w, (got - w)[:, :1, :1, :1].expand_as(w))  # a constant per channel
    assert ws_kernel(w, "none") is w


@pytest.mark.parametrize("ws", ["none", "center", "scaled", "scaled_fixed"])
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
                                       {"conv_ws": "scaled", "conv_bias": True}, {"conv_ws": "scaled_fixed"}], ids=str)
def test_ws_keeps_stage_std_in_range(overrides, seed):
    torch.manual_seed(seed)
    m = create_model("salunet_c18", num_classes=10, width=16, **overrides)
    stds = stage_stds(m, torch.randn(8, 3, 32, 32))
    bad = {k: round(v, 3) for k, v in stds.items() if not 0.5 <= v <= 2.0}
    assert not bad, f"stage std out of [0.5, 2] at init: {bad}"


def test_v2_is_the_paper_model_with_centred_kernels_and_converts_as_is():
    import salunet

    torch.manual_seed(0)
    v2 = create_model("salunet_c18_v2", num_classes=10, width=8)
    torch.manual_seed(0)
    same = create_model("salunet_c18", num_classes=10, width=8, conv_ws="center")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(v2(x), same(x), rtol=0, atol=0)  # exactly the study's "ws-center" cell
    convs = [c for c in v2.modules() if isinstance(c, nn.Conv2d)]
    assert convs and all(isinstance(c, NFConv2d) and c.ws == "center" and c.bias is None for c in convs)
    report = salunet.convert(v2, example_input=x)  # already normalization-free: nothing to replace, nothing changes
    assert not report.replaced and not report.not_replaced
    torch.testing.assert_close(v2(x), same(x), rtol=0, atol=0)


def test_c50_v2_is_the_paper_c50_with_centred_kernels_and_the_basic_branch_gain():
    torch.manual_seed(0)
    v2 = create_model("salunet_c50_v2", num_classes=10, width=8)
    torch.manual_seed(0)
    same = create_model("salunet_c50", num_classes=10, width=8, conv_ws="center", branch_a0=1.2)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(v2(x), same(x), rtol=0, atol=0)
    blocks = len(v2.layer1)  # the closing SALU's gain is branch_a0 / sqrt(blocks): 1.2, not the paper row's 0.8
    assert v2.layer1[0].tail.norm.a.flatten()[0].item() == pytest.approx(1.2 / blocks**0.5, rel=1e-5)
    convs = [c for c in v2.modules() if isinstance(c, nn.Conv2d)]
    assert convs and all(isinstance(c, NFConv2d) and c.ws == "center" and c.bias is None for c in convs)
    ref = v2.eval()(x)
    fold_nf_convs(v2)  # inference: plain convs with the centred kernels, the same outputs
    assert not any(isinstance(c, NFConv2d) for c in v2.modules())
    torch.testing.assert_close(v2(x), ref, rtol=1e-5, atol=1e-5)
