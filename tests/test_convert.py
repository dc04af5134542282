"""salunet.convert on architectures it has never seen: what it replaces, with which width and dim, what it keeps,
what it reports. Calibration / trainability at init: tests/test_convert_calibration.py."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salunet
from salunet import GALU, SALU, SWALU
from salunet.models import ACTS, NORMS, create_model
from salunet.models.layers import LayerNorm2d as OwnLayerNorm2d
from salunet.models.layers import TokenBatchNorm

# every normalization type PyTorch has (subclasses included by isinstance): none may be left behind
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm) + \
    ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _norms_left(model):
    return [n for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]


class ConvNeXtLayerNorm2d(nn.LayerNorm):
    """timm/ConvNeXt-style channels-first LayerNorm: an nn.LayerNorm that normalises dim 1 of NCHW."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


# ---- the foreign models ----------------------------------------------------------------------------------------

def mobilenet_like():
    def ir(cin, cout, act):
        return nn.Sequential(nn.Conv2d(cin, cin * 4, 1, bias=False), nn.BatchNorm2d(cin * 4), act(),
                             nn.Conv2d(cin * 4, cin * 4, 3, padding=1, groups=cin * 4, bias=False),
                             nn.BatchNorm2d(cin * 4), act(), nn.Conv2d(cin * 4, cout, 1, bias=False),
                             nn.BatchNorm2d(cout))
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU6(), ir(8, 8, nn.ReLU6),
                         ir(8, 16, nn.Hardswish), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def groupnorm_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.InstanceNorm2d(16, affine=True), nn.LeakyReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def mlp_bn1d():
    return nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.PReLU(), nn.Linear(32, 5))


def syncbn_net():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.SyncBatchNorm(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 4))


def rmsnorm_tokens():
    return nn.Sequential(nn.Linear(12, 24), nn.RMSNorm(24), nn.SiLU(), nn.Linear(24, 12), nn.LayerNorm(12))


def volumetric_net():
    return nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ELU(),
                         nn.Conv3d(6, 6, 3, padding=1), nn.InstanceNorm3d(6), nn.Mish(),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 3))


def conv1d_then_tokens():
    """(N, C, L) convs, then (N, L, D) tokens: the old "Conv1d present => 3-D is (N, C, L)" rule got the token
    part wrong; L == 6 == D makes a wrong dim run silently."""
    return nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.InstanceNorm1d(6, affine=True), nn.ReLU(),
                         nn.Conv1d(6, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(), Transpose(),
                         nn.Linear(6, 6), nn.GELU(), nn.LayerNorm(6), nn.Linear(6, 2))


def convnext_like():
    """ConvNeXt-style block with the channels-first LayerNorm subclass, W == C == 8."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ConvNeXtLayerNorm2d(8), nn.Conv2d(8, 8, 1), nn.GELU(),
                         OwnLayerNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def transformer_encoder():
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, activation="gelu"), 2)


CASES = {  # name: (builder, input shape, {path: (type, width, dim)} spot checks)
    "mobilenet_relu6": (mobilenet_like, (2, 3, 16, 16), {"2": (SWALU, 8, 1), "4.2": (SWALU, 32, 1)}),
    "groupnorm_cnn": (groupnorm_net, (2, 3, 8, 8), {"1": (SALU, 16, 1), "4": (SALU, 16, 1)}),
    "mlp_bn1d": (mlp_bn1d, (4, 10), {"1": (SALU, 32, 1), "2": (SWALU, 32, 1)}),
    "syncbatchnorm": (syncbn_net, (2, 3, 8, 8), {"1": (SALU, 6, 1), "2": (SWALU, 6, 1)}),
    "rmsnorm_tokens": (rmsnorm_tokens, (2, 5, 12), {"1": (SALU, 24, -1), "2": (SWALU, 24, -1),
                                                    "4": (SALU, 12, -1)}),
    "batchnorm3d_instancenorm3d": (volumetric_net, (2, 2, 4, 4, 4), {"1": (SALU, 6, 1), "2": (SWALU, 6, 1),
                                                                     "4": (SALU, 6, 1), "5": (SWALU, 6, 1)}),
    "instancenorm1d_batchnorm1d_tokens": (conv1d_then_tokens, (2, 4, 6), {
        "1": (SALU, 6, 1), "2": (SWALU, 6, 1), "4": (SALU, 6, 1), "8": (GALU, 6, -1), "9": (SALU, 6, -1)}),
    "layernorm_subclasses": (convnext_like, (2, 3, 8, 8), {"1": (SALU, 8, 1), "3": (GALU, 8, 1),
                                                           "4": (SALU, 8, 1)}),
    "transformer_encoder": (transformer_encoder, (2, 5, 32), {"layers.0.norm1": (SALU, 32, -1),
                                                              "layers.1.activation": (GALU, 64, -1)}),
}


@pytest.mark.parametrize("case", CASES)
def test_convert_foreign_models(case):
    build, shape, expect = CASES[case]
    model = build()
    assert _norms_left(model), "the test model must contain norms"
    x = torch.randn(shape)
    y0 = model.eval()(x)
    report = salunet.convert(model, example_input=x)
    assert not _norms_left(model), _norms_left(model)
    assert report.replaced and report.ok, str(report)
    mods = dict(model.named_modules())
    for path, (cls, width, dim) in expect.items():
        m = mods[path]
        assert type(m) is cls and m.num_features == width and m.dim == dim, (path, m)
    gates = [m for m in model.modules() if isinstance(m, (SWALU, GALU))]
    assert gates and all(g.num_features is not None for g in gates), str(report)
    for mode in (True, False):
        y = model.train(mode)(x)
        assert y.shape == y0.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- which dim a norm normalises ------------------------------------------------------------------------------

def test_permuting_layernorm_with_w_equal_c_gets_dim_1():
    """isinstance says "LayerNorm: last dim"; the forward normalises dim 1. W == C == 8 would run either way."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ConvNeXtLayerNorm2d(8))
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    salunet.convert(m, example_input=x, calibrate=False)
    assert isinstance(m[1], SALU) and m[1].dim == 1 and m[1].num_features == 8


def test_permuting_norm_without_affine_is_resolved_by_the_producing_conv():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), ConvNeXtLayerNorm2d(8, elementwise_affine=False))
    salunet.convert(m, example_input=torch.randn(2, 3, 8, 8))
    assert isinstance(m[1], SALU) and m[1].dim == 1


def test_ambiguous_or_untraced_norm_subclass_is_reported_not_guessed():
    # first layer, no affine parameter, C == W: nothing says which dim it normalises
    m = nn.Sequential(ConvNeXtLayerNorm2d(8, elementwise_affine=False), nn.Conv2d(8, 2, 1))
    report = salunet.convert(m, example_input=torch.randn(2, 8, 8, 8))
    assert isinstance(m[0], ConvNeXtLayerNorm2d) and not report.ok
    assert "0" in dict(report.not_replaced) and "dims 1, 2, 3" in dict(report.not_replaced)["0"]
    # no example_input: an overridden forward is never trusted
    m = convnext_like()
    report = salunet.convert(m)
    assert isinstance(m[1], ConvNeXtLayerNorm2d) and "pass example_input" in dict(report.not_replaced)["1"]
    assert isinstance(m[4], SALU) and m[4].dim == 1  # the project's own LayerNorm2d is known


def test_project_norms_are_known_without_example_input():
    m = nn.Sequential(OwnLayerNorm2d(8), nn.Flatten(2), Transpose(), TokenBatchNorm(8))
    report = salunet.convert(m)
    assert report.ok, str(report)
    assert (m[0].num_features, m[0].dim) == (8, 1) and (m[3].num_features, m[3].dim) == (8, -1)


def test_timm_style_norm_act_subclass_is_probed_and_keeps_children():
    """A BatchNorm2d subclass holding its activation (timm's BatchNormAct2d): probed through the ReLU."""
    class BatchNormAct2d(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(super().forward(x))

    m = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4))
    x = torch.randn(2, 3, 6, 6)  # output 4x4 with 4 channels: dims 1, 2, 3 all have size 4
    report = salunet.convert(m, example_input=x)
    assert report.ok, str(report)
    assert isinstance(m[1], nn.Sequential) and isinstance(m[1][0], SALU) and m[1][0].dim == 1
    assert isinstance(m[1][1], SWALU) and m[1][1].num_features == 4
    assert m(x).shape == (2, 4, 4, 4)


# ---- activations ----------------------------------------------------------------------------------------------

def test_activation_sizes_come_from_the_producing_layer():
    """A residual sum keeps the conv's channel tag; a token tensor after a permute gets it from its Linear."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv1d(5, 5, 1), nn.ReLU()
            self.proj, self.act2 = nn.Linear(5, 7), nn.ReLU()

        def forward(self, x):  # x: (N, 5, L=7)
            h = self.act(self.conv(x) + x)  # (N, 5, 7)
            return self.act2(self.proj(h.transpose(1, 2)))  # (N, 7, 7): tokens, D == L

    m = Block()
    report = salunet.convert(m, example_input=torch.randn(2, 5, 7))
    assert (m.act.num_features, m.act.dim) == (5, 1) and (m.act2.num_features, m.act2.dim) == (7, -1), str(report)


def test_untraceable_layout_gets_scalar_gate_and_says_so():
    m = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))  # activation on the raw (N, 3, 4, 4) input
    report = salunet.convert(m, example_input=torch.randn(2, 3, 4, 4))
    assert m[0].num_features is None and "could not trace which dim" in str(report)


def test_without_example_input_gates_are_scalar_and_said_so():
    m = mlp_bn1d()
    report = salunet.convert(m)
    assert isinstance(m[2], SWALU) and m[2].num_features is None
    assert "scalar: pass example_input" in str(report)


def test_shared_activation_stays_shared():
    relu = nn.ReLU()
    m = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu)
    salunet.convert(m, example_input=torch.randn(3, 4))
    assert m[1] is m[3] and isinstance(m[1], SWALU) and m[1].num_features == 4


def test_transformer_activation_function_becomes_galu():
    model = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True, activation="gelu")
    report = salunet.convert(model, example_input=torch.randn(2, 3, 16))
    assert isinstance(model.activation, GALU) and model.activation.num_features == 24
    assert isinstance(model.norm1, SALU) and model.norm1.dim == -1
    assert ("activation", "gelu (function)", "GALU(24, dim=-1)") in report.replaced
    model.eval()(torch.randn(2, 3, 16))  # the native fast path is off: it would bypass the new modules


@pytest.mark.parametrize("fn", [F.silu, F.leaky_relu, F.elu, F.relu])
def test_stored_activation_functions_only_replaced_when_asked(fn):
    def layer():
        torch.manual_seed(0)
        return nn.TransformerEncoderLayer(8, 2, 12, batch_first=True, activation=fn, dropout=0.0)

    x = torch.randn(2, 3, 8)
    m = layer()
    salunet.convert(m, example_input=x)
    assert isinstance(m.activation, SWALU) and m.activation.num_features == 12
    # act="keep": the function stays exactly what it was (it used to become nn.ReLU), and it is reported
    m = layer()
    report = salunet.convert(m, act="keep", example_input=x)
    assert m.activation is fn and isinstance(m.norm1, SALU)
    assert dict(report.kept)["activation"].startswith(fn.__name__)
    # nothing asked: nothing changes at all, fast-path flag included
    m, ref = layer(), layer()
    report = salunet.convert(m, norm="keep", act="keep", gelu="keep", example_input=x)
    assert not report.replaced and m.activation is fn
    assert m.activation_relu_or_gelu == ref.activation_relu_or_gelu
    torch.testing.assert_close(m.eval()(x), ref.eval()(x))


def test_unknown_stored_activation_is_reported():
    m = nn.TransformerEncoderLayer(8, 2, 12, batch_first=True, activation=torch.tanh)
    report = salunet.convert(m, example_input=torch.randn(2, 3, 8))
    assert m.activation is torch.tanh and "tanh" in dict(report.not_replaced)["activation"]


# ---- functional calls -----------------------------------------------------------------------------------------

class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.lrn = nn.LocalResponseNorm(2)
        self.w = nn.Parameter(torch.full((4,), 0.25))

    def forward(self, x):
        x = self.lrn(self.conv(x)).relu()
        x = torch.relu_(x) + F.mish(x) + F.hardtanh(x) + F.selu(x) + F.prelu(x, self.w) + F.leaky_relu(x)
        x = F.gelu(F.layer_norm(x, x.shape[-1:]))
        return x


CALLS = ["relu", "mish", "hardtanh", "selu", "prelu", "leaky_relu", "gelu", "layer_norm"]


def test_report_lists_functional_calls_and_unknown_norms():
    report = salunet.convert(Functional(), example_input=torch.randn(1, 3, 8, 8))
    reasons = " ".join(why for _, why in report.not_replaced)
    assert not report.ok
    for name in CALLS:
        assert f"{name} called as a function" in reasons, (name, str(report))
    assert "2 call(s)" in reasons  # Tensor.relu() and torch.relu_ are both "relu"
    assert "unknown normalization type LocalResponseNorm" in reasons


def test_functional_calls_reported_only_for_kinds_being_replaced():
    report = salunet.convert(Functional(), act="keep", norm="keep", example_input=torch.randn(1, 3, 8, 8))
    reasons = " ".join(why for _, why in report.not_replaced)
    assert "gelu called" in reasons
    assert not any(f"{n} called" in reasons for n in CALLS if n != "gelu")


# ---- one factory ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("build,shape", [(groupnorm_net, (2, 3, 8, 8)), (mlp_bn1d, (4, 10)),
                                         (volumetric_net, (2, 2, 4, 4, 4))])
def test_every_model_norm_name_works_in_convert(norm, build, shape):
    m = build()
    x = torch.randn(shape)
    report = salunet.convert(m, norm=norm, example_input=x)
    assert report.ok, str(report)
    assert m.train()(x).shape == m.eval()(x).shape
    made = NORMS[norm](8)  # the layer type(s) that the name stands for (BatchNorm: of the input's rank)
    want = list(made.children()) if isinstance(made, nn.Sequential) else [made]
    for w in want:
        kind = nn.modules.batchnorm._BatchNorm if isinstance(w, nn.modules.batchnorm._BatchNorm) else type(w)
        assert any(isinstance(x, kind) for x in m.modules()), (norm, kind)


@pytest.mark.parametrize("act", list(ACTS))
def test_every_model_act_name_works_in_convert(act):
    m = mobilenet_like()
    x = torch.randn(2, 3, 16, 16)
    salunet.convert(m, act=act, example_input=x)
    assert m(x).shape == (2, 5)
    assert type(ACTS[act](8)) in {type(x) for x in m.modules()}, act
    if act != "relu":  # every ReLU-family module was replaced by the named one
        assert not any(isinstance(x, (nn.ReLU, nn.ReLU6)) for x in m.modules())
    if act == "prelu":
        assert isinstance(m[2], nn.PReLU) and m[2].weight.numel() == 8


def test_token_norm_the_factory_refuses_is_reported():
    m = rmsnorm_tokens()
    report = salunet.convert(m, norm="groupnorm", example_input=torch.randn(2, 5, 12))
    assert isinstance(m[1], nn.RMSNorm) and "groupnorm needs channel-first" in dict(report.not_replaced)["1"]


def test_same_callable_works_in_create_model_and_convert():
    calls = []

    def gn(c, *, dim=1):
        calls.append((c, dim))
        return nn.GroupNorm(2, c)

    create_model("salunet_c18", num_classes=3, width=4, norm_layer=gn)
    m = groupnorm_net()
    salunet.convert(m, norm=gn, act="relu", example_input=torch.randn(2, 3, 8, 8))
    assert (16, 1) in calls and isinstance(m[1], nn.GroupNorm) and isinstance(m[2], nn.ReLU)


def test_bad_names_list_the_valid_choices():
    with pytest.raises(ValueError, match="unknown norm 'rms'; choose one of salu, batchnorm.*'keep'"):
        salunet.convert(mlp_bn1d(), norm="rms")
    with pytest.raises(ValueError, match="unknown act 'tanh'"):
        salunet.convert(mlp_bn1d(), act="tanh")
    with pytest.raises(ValueError, match="calibrate=True needs example_input"):
        salunet.convert(mlp_bn1d(), calibrate=True)


# ---- dtype, device, report --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_keeps_dtype(dtype):
    m = mlp_bn1d().to(dtype)
    x = torch.randn(4, 10, dtype=dtype)
    report = salunet.convert(m, example_input=x)
    assert report.ok and not _norms_left(m)
    assert all(p.dtype == dtype for p in m.parameters())
    y = m(x)
    assert y.dtype == dtype and y.shape == (4, 5) and torch.isfinite(y).all()


def test_keeps_meta_device():
    m = groupnorm_net().to("meta")
    report = salunet.convert(m)
    assert not _norms_left(m) and all(p.is_meta for p in m.parameters())
    assert m(torch.empty(2, 3, 8, 8, device="meta")).shape == (2, 5)
    m = mlp_bn1d().to("meta")
    report = salunet.convert(m, example_input=torch.empty(4, 10, device="meta"))
    assert all(p.is_meta for p in m.parameters()) and m[2].num_features == 32
    assert "not calibrated: meta tensors" in str(report)


def test_keep_options():
    m = groupnorm_net().double()
    report = salunet.convert(m, norm="identity", act="keep", example_input=torch.randn(1, 3, 8, 8).double())
    assert isinstance(m[1], nn.Identity) and isinstance(m[2], nn.SiLU)
    assert dict(report.kept)["2"].startswith("SiLU")


def test_report_is_in_model_order_and_readable():
    m = mobilenet_like()
    report = salunet.convert(m, example_input=torch.randn(2, 3, 16, 16))
    order = {name: i for i, (name, _) in enumerate(m.named_modules())}
    paths = [p for p, _, _ in report.replaced]
    assert paths == sorted(paths, key=order.__getitem__) and paths[:3] == ["1", "2", "3.1"]
    text = str(report)
    lines = text.splitlines()
    assert lines[0].startswith("salunet.convert: 12 replaced") and "  replaced:" in lines
    assert [ln.split()[0] for ln in lines[2:5]] == ["1", "2", "3.1"]
    long_reasons = str(salunet.convert(convnext_like())) + str(
        salunet.convert(Functional(), example_input=torch.randn(1, 3, 8, 8)))
    assert all(len(ln) <= 120 for ln in lines + long_reasons.splitlines())


def test_timm_model_if_installed():
    timm = pytest.importorskip("timm", reason="timm not installed (optional extra: pip install salunet[timm])")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    salunet.convert(model, example_input=x)
    assert not _norms_left(model) and model(x).shape == (2, 3)


def test_factory_refusal_leaves_a_stored_function_exactly_as_it_was():
    def narrow_only(c, *, dim=1):
        if c is None or c > 10:
            raise ValueError("too wide")
        return nn.ReLU()

    m = nn.TransformerEncoderLayer(8, 2, 12, batch_first=True, activation=F.relu)
    report = salunet.convert(m, act=narrow_only, example_input=torch.randn(2, 3, 8))
    assert m.activation is F.relu and "too wide" in dict(report.not_replaced)["activation"]
    assert m.eval()(torch.randn(2, 3, 8)).shape == (2, 3, 8)


class FrozenBatchNorm2d(nn.Module):
    """torchvision's kind: BatchNorm statistics as buffers, no nn.BatchNorm base class."""

    def __init__(self, n):
        super().__init__()
        for name, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), v))

    def forward(self, x):
        scale = self.weight / (self.running_var + 1e-5).sqrt()
        return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)


def test_norms_convert_does_not_know_are_reported_not_kept_silently():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), nn.ReLU())
    report = salunet.convert(m, example_input=torch.randn(2, 3, 8, 8))
    assert not report.ok and any("unknown normalization type FrozenBatchNorm2d" in why
                                 for _, why in report.not_replaced), str(report)


def test_lazy_norms_are_initialised_then_converted():
    m = nn.Sequential(nn.LazyConv2d(4, 1), nn.LazyBatchNorm2d(), nn.ReLU())
    report = salunet.convert(m, example_input=torch.randn(2, 3, 8, 8))
    assert report.ok, str(report)
    assert isinstance(m[1], SALU) and m[1].num_features == 4 and m(torch.randn(2, 3, 8, 8)).shape == (2, 4, 8, 8)
    lazy = nn.Sequential(nn.LazyConv2d(4, 1), nn.LazyBatchNorm2d())
    report = salunet.convert(lazy, act="keep")  # no example_input: it cannot be sized, and says so
    assert any("not initialised yet; pass example_input" in why for _, why in report.not_replaced), str(report)


def test_unbatched_instance_norm_normalises_dim_0():
    """InstanceNorm1d takes an unbatched (C, L) input: the channels are dim 0 there."""
    for length in (10, 6):  # 6 == C: the wrong dim would even run
        m = nn.Sequential(nn.Conv1d(4, 6, 1), nn.InstanceNorm1d(6, affine=True), nn.ReLU())
        report = salunet.convert(m, example_input=torch.randn(4, length))
        assert report.ok, str(report)
        assert isinstance(m[1], SALU) and m[1].dim % 2 == 0 and m(torch.randn(4, length)).shape == (6, length)
        # and the gate after it sees the channels where they are too
        assert isinstance(m[2], SWALU) and (m[2].num_features, m[2].dim % 2) == (6, 0)


def test_a_failed_conversion_leaves_the_model_as_it_was():
    """convert is atomic: when a forward raises (a bad example_input while tracing, or a replacement that fails
    in the calibration pass), every slot and attribute it changed is put back, the very same objects."""
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    before = {n: m for n, m in enc.named_modules()}
    acts = [l.activation for l in enc.layers]
    with pytest.raises(Exception):
        salunet.convert(enc, example_input=torch.randn(2, 5, 7))  # wrong feature size: the traced forward fails
    assert {n: m for n, m in enc.named_modules()} == before
    assert [l.activation for l in enc.layers] == acts and all(a is F.relu for a in acts)

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("broken replacement")

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    before = list(net)
    with pytest.raises(RuntimeError, match="broken replacement"):
        salunet.convert(net, norm=lambda c, *, dim=1: nn.Sequential(SALU(c, dim=dim), Broken()),
                        example_input=torch.randn(2, 3, 8, 8))
    assert list(net) == before and isinstance(net[1], nn.BatchNorm2d) and isinstance(net[2], nn.ReLU)


def test_new_modules_live_where_their_input_ran():
    """A model split over devices (meta stands in for the first GPU, the CPU for the second): a replacement
    without parameters of its own to copy (ReLU, an affine-free LayerNorm) goes to the device its input was on,
    not to the device of the model's first parameter."""
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).to("meta")
            self.b = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False), nn.ReLU())

        def forward(self, x):
            h = self.a(x.to("meta"))
            return self.b(torch.zeros(h.shape))  # the hand-over between devices

    m = Split()
    report = salunet.convert(m, example_input=torch.randn(2, 4), calibrate=False)
    assert report.ok, str(report)
    assert {p.device.type for p in m.a[1].parameters()} == {"meta"}
    assert {p.device.type for x in (m.b[1], m.b[2]) for p in x.parameters()} == {"cpu"}
    assert m(torch.randn(2, 4)).shape == (2, 8)
