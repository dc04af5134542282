"""salunet.convert on architectures it has never seen."""
import pytest
import torch
from torch import nn

import salunet
from salunet import GALU, SALU, SWALU

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d,
              nn.SyncBatchNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _no_norms_left(model):
    return not any(isinstance(m, NORM_TYPES) for m in model.modules())


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


CASES = {
    "mobilenet_relu6": (mobilenet_like, (2, 3, 16, 16)),
    "groupnorm_cnn": (groupnorm_net, (2, 3, 8, 8)),
    "mlp_bn1d": (mlp_bn1d, (4, 10)),
    "transformer_encoder": (lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, activation="gelu"), 2), (2, 5, 32)),
}


@pytest.mark.parametrize("case", CASES)
def test_convert_foreign_models(case):
    build, shape = CASES[case]
    model = build()
    x = torch.randn(shape)
    y0 = model.eval()(x)
    report = salunet.convert(model, example_input=x)
    assert _no_norms_left(model)
    assert report.replaced and report.ok, str(report)
    for mode in (True, False):
        y = model.train(mode)(x)
        assert y.shape == y0.shape and torch.isfinite(y).all()
    # every gate got per-channel parameters from the traced forward
    gates = [m for m in model.modules() if isinstance(m, (SWALU, GALU))]
    assert gates and all(g.num_features is not None for g in gates)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_transformer_activation_function_becomes_galu():
    model = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True, activation="gelu")
    salunet.convert(model, example_input=torch.randn(2, 3, 16))
    assert isinstance(model.activation, GALU) and model.activation.num_features == 24
    assert isinstance(model.norm1, SALU) and model.norm1.dim == -1


def test_report_lists_functional_calls_and_unknown_norms():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.lrn = nn.LocalResponseNorm(2)

        def forward(self, x):
            return torch.nn.functional.gelu(self.lrn(self.conv(x)))

    m = Odd()
    report = salunet.convert(m, example_input=torch.randn(1, 3, 8, 8))
    text = str(report)
    assert not report.ok
    assert "gelu called as a function" in text and "LocalResponseNorm" in text


def test_without_example_input_gates_are_scalar_and_said_so():
    m = mlp_bn1d()
    report = salunet.convert(m)
    assert isinstance(m[2], SWALU) and m[2].num_features is None
    assert "scalar: pass example_input" in str(report)


def test_keeps_dtype_and_options():
    m = groupnorm_net().double()
    salunet.convert(m, norm="identity", act="keep", example_input=torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert isinstance(m[1], nn.Identity) and isinstance(m[2], nn.SiLU)
    m2 = mlp_bn1d().double()
    salunet.convert(m2, example_input=torch.randn(4, 10, dtype=torch.float64))
    assert m2[1].log_a.dtype == torch.float64 and m2[2].log_a.dtype == torch.float64
    with pytest.raises(ValueError, match="unknown norm"):
        salunet.convert(mlp_bn1d(), norm="rms")


def test_norm_with_children_keeps_them():
    """timm-style norm+act modules (a BatchNorm2d subclass holding its activation) keep the activation."""
    class BatchNormAct2d(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(super().forward(x))

    m = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4))
    x = torch.randn(2, 3, 6, 6)
    salunet.convert(m, example_input=x)
    assert isinstance(m[1], nn.Sequential) and isinstance(m[1][0], SALU) and isinstance(m[1][1], SWALU)
    assert m(x).shape == (2, 4, 4, 4)


def test_timm_model_if_installed():
    timm = pytest.importorskip("timm", reason="timm not installed (optional extra: pip install salunet[timm])")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    salunet.convert(model, example_input=x)
    assert _no_norms_left(model) and model(x).shape == (2, 3)
