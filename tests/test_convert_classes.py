"""convert on other libraries' module classes: the ``classes`` mapping, the built-in table of timm's classes
(KNOWN_CLASSES, matched by name), the report line for an unknown activation *module*, calibration on the tokens a
ViT's head reads; and, when timm is installed, timm's resnet18 / convnext_atto / efficientnet_b0 / vit_tiny
converted in full and trained a few steps with the documented recipe."""
import math

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import salunet
from salunet.convert import KNOWN_CLASSES
from salunet.nn import GALU, SALU, SWALU, SaluFamily


class GELU(nn.Module):  # the shape of timm.layers.activations.GELU: a module of its own, not a torch.nn.GELU
    def forward(self, x):
        return Fn.gelu(x)


class RmsNorm2d(nn.Module):  # the shape of timm's RmsNorm2d: no torch norm base, normalises dim 1 of NCHW
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_features, self.eps = channels, eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps)
        return x * self.weight.view(1, -1, 1, 1)


def _net(act=GELU, norm=RmsNorm2d):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), act(), nn.Conv2d(8, 6, 3, padding=1), act(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def test_an_unknown_activation_module_is_reported_as_a_module_with_the_mapping_that_replaces_it():
    torch.manual_seed(0)
    m = _net(norm=nn.BatchNorm2d)
    r = salunet.convert(m, example_input=torch.randn(2, 3, 8, 8))
    lines = dict(r.not_replaced)
    assert set(lines) == {"2", "4"}
    assert lines["2"] == ("GELU: a module class convert does not know, whose forward calls gelu (1 call(s)); pass "
                          "classes={'test_convert_classes.GELU': 'gelu'} to replace it")
    assert "called as a function in forward code" not in str(r)


def test_forward_code_that_calls_an_activation_keeps_the_forward_code_line():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return Fn.relu(self.conv(x))

    r = salunet.convert(Block(), example_input=torch.randn(1, 3, 4, 4))
    assert r.not_replaced == [("<model>", "relu called as a function in forward code (1 call(s)); replace it by a "
                                          "module to convert it")]


@pytest.mark.parametrize("key", [GELU, "test_convert_classes.GELU"])
def test_classes_maps_activation_and_norm_modules(key):
    torch.manual_seed(0)
    m = _net()
    r = salunet.convert(m, example_input=torch.randn(2, 3, 8, 8), classes={key: "gelu", RmsNorm2d: "norm"})
    assert r.ok and [p for p, *_ in r.replaced] == ["1", "2", "4"]
    assert isinstance(m[1], SALU) and (m[1].num_features, m[1].dim) == (8, 1)  # probed through its weight
    assert isinstance(m[2], GALU) and (m[2].num_features, m[2].dim) == (8, 1)
    assert isinstance(m[4], GALU) and m[4].num_features == 6
    assert not any(isinstance(x, (GELU, RmsNorm2d)) for x in m.modules())
    m(torch.randn(1, 3, 8, 8)).sum().backward()


def test_a_subclass_matches_its_mapped_base_and_act_kind_follows_the_mapping():
    class Swish(GELU):
        def forward(self, x):
            return Fn.silu(x)

    m = _net(act=Swish, norm=nn.BatchNorm2d)
    r = salunet.convert(m, example_input=torch.randn(2, 3, 8, 8), classes={GELU: "act"})
    assert r.ok and isinstance(m[2], SWALU) and isinstance(m[4], SWALU)
    m = _net(act=Swish, norm=nn.BatchNorm2d)
    r = salunet.convert(m, act="keep", example_input=torch.randn(2, 3, 8, 8), classes={GELU: "act"})
    assert dict(r.kept)["2"] == "Swish, as asked (act='keep')" and isinstance(m[2], Swish)


def test_bad_mappings_are_refused():
    with pytest.raises(ValueError, match=r"the kind must be one of norm, act, gelu"):
        salunet.convert(_net(), classes={GELU: "relu"})
    with pytest.raises(ValueError, match="not an nn.Module class or a qualified class name"):
        salunet.convert(_net(), classes={"GELU": "gelu"})


def test_timm_classes_are_known_by_name_without_importing_timm():
    """Classes with timm's module path and name (as timm defines them) convert with no mapping."""
    gelu = type("GELU", (GELU,), {"__module__": "timm.layers.activations", "__qualname__": "GELU"})
    rms = type("RmsNorm2d", (RmsNorm2d,), {"__module__": "timm.layers.norm", "__qualname__": "RmsNorm2d"})
    assert KNOWN_CLASSES["timm.layers.activations.GELU"] == "gelu" and KNOWN_CLASSES["timm.layers.norm.RmsNorm2d"] == "norm"
    m = _net(act=gelu, norm=rms)
    r = salunet.convert(m, example_input=torch.randn(2, 3, 8, 8))
    assert r.ok and isinstance(m[1], SALU) and m[1].dim == 1 and isinstance(m[2], GALU) and isinstance(m[4], GALU)


class TinyViT(nn.Module):
    """timm's ViT in miniature: a class token far smaller than the patch tokens (timm initialises it at std 1e-6
    and the position table at 0.02), pre-norm blocks, a final norm over *all* tokens, a head on the class token."""

    def __init__(self, dim=16, tokens=9):
        super().__init__()
        self.cls = nn.Parameter(torch.full((1, 1, dim), 0.02))
        self.proj = nn.Linear(12, dim)
        self.norm1, self.fc1, self.act = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU()
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):  # x: (B, tokens, 12)
        t = torch.cat([self.cls.expand(len(x), -1, -1), self.proj(x)], 1)  # (B, 1 + tokens, dim)
        t = t + self.act(self.fc1(self.norm1(t)))
        t = self.norm(t)
        return self.head(t[:, 0])

    def pre_logits(self, x):
        feats = {}
        h = self.head.register_forward_pre_hook(lambda m, a: feats.setdefault("x", a[0]))
        self(x)
        h.remove()
        return feats["x"]


def test_calibration_matches_the_scale_of_the_class_token_the_head_reads():
    torch.manual_seed(0)
    x = torch.randn(64, 9, 12) * 3
    m = TinyViT()
    with torch.no_grad():
        assert m.pre_logits(x).pow(2).mean().sqrt() == pytest.approx(1.0, abs=1e-3)  # LayerNorm: unit scale
    salunet.convert(m, example_input=x)
    assert isinstance(m.norm, SALU) and m.norm.dim == -1
    with torch.no_grad():
        feats = m.pre_logits(x).double()
        # float64 reference: the final SALU's formula on the class token of its input, with its own a, b
        captured = {}
        h = m.norm.register_forward_pre_hook(lambda mod, a: captured.setdefault("t", a[0]))
        m(x)
        h.remove()
        t0 = captured["t"][:, 0].double()
        a, b = m.norm.log_a.double().exp(), m.norm.log_b.double().exp()
        ref = a * t0 / torch.sqrt(1 + a * b * t0 * t0)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)
    assert ref.pow(2).mean(0).sqrt().mean().item() == pytest.approx(1.0, rel=0.02)  # unit rms per channel
    patch = captured["t"][:, 1:]
    assert patch.pow(2).mean().sqrt() > 5 * t0.pow(2).mean().sqrt()  # the averaged scale would have been wrong


# ---- timm's zoo (skipped without timm; timm needs torchvision at import) ------------------------------------------

TIMM_MODELS = [("resnet18", {}, 32), ("convnext_atto", {}, 32), ("efficientnet_b0", {}, 32),
               ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}, 32)]


def _leftovers(model):
    """Norm / activation modules of torch or of KNOWN_CLASSES still in ``model`` (SALU family excluded)."""
    from salunet.convert import _ClassKinds

    kinds = _ClassKinds(None)
    return [f"{n}: {type(m).__name__}" for n, m in model.named_modules()
            if not isinstance(m, SaluFamily) and (kinds.act(m) is not None or kinds.norm_spec(m) is not None)]


@pytest.mark.parametrize("name,kw,size", TIMM_MODELS, ids=[n for n, *_ in TIMM_MODELS])
def test_timm_models_convert_in_full_and_train_with_the_documented_recipe(name, kw, size):
    timm = pytest.importorskip("timm", reason="timm not importable (pip install 'salunet[timm]'; timm imports torchvision)")
    from salunet.train.optim import adaptive_clip_, agc_parameters, make_optimizer, set_lr

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, size, size, generator=g), torch.randint(0, 5, (16,), generator=g)
    report = salunet.convert(model, example_input=x)
    assert report.ok, str(report)
    assert _leftovers(model) == []
    assert "called as a function" not in str(report)
    # the recipe the README and docs/SPEC.md section 6 give: SGD-Nesterov, AGC 0.01, SALU learning-rate scale 0.1
    opt = make_optimizer(model, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, salu_lr_scale=0.1)
    set_lr(opt, 0.01)
    clip = agc_parameters(model)
    model.train()
    losses = []
    for _ in range(6):
        loss = Fn.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        adaptive_clip_(clip, 0.01)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses
