"""analysis/dynamics.py: kernel statistics on known inputs, scale invariance where BatchNorm or scaled WS make a
kernel invariant (and not where centring does not), gain drift, the model left as it was, and the ``dynamics``
experiment end to end at tiny scale."""
import copy
import json
import math

import pytest
import torch

import salunet
from salunet.analysis.dynamics import dynamics_report, dynamics_summary, gain_stats, kernel_stats
from salunet.analysis.experiments import run_experiment


def test_kernel_stats_on_known_rows():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # norms 5, 1, 2
    g = torch.tensor([[0.6, 0.8], [0.0, 0.5], [0.0, -1.0]])  # along w, across w, against w
    st = kernel_stats(w, g)
    assert st["kernel_norm"] == pytest.approx((5 + 1 + 2) / 3)
    assert st["grad_ratio"] == pytest.approx((1 / 5 + 0.5 / 1 + 1 / 2) / 3)
    assert st["radial"] == pytest.approx((1 + 0 + 1) / 3)
    # a zero gradient row is not radial (no 0/0), a zero kernel row is left out
    st = kernel_stats(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.zeros(2, 2))
    assert st["radial"] == 0 and st["grad_ratio"] == 0 and st["kernel_norm"] == pytest.approx(math.sqrt(2) / 2)


def test_gain_stats_drift_and_spread():
    v = torch.tensor([1.0, math.e, math.e ** -2])
    st = gain_stats(v, 1.0)
    assert st["drift"] == pytest.approx(1.0)  # median of |log v| = {0, 1, 2}
    assert st["spread"] == pytest.approx(torch.tensor([0.0, 1.0, -2.0]).std(unbiased=False).item())
    assert gain_stats(v, math.e)["drift"] == pytest.approx(1.0)  # |{-1, 0, -3}| -> median 1
    # a log-parametrised gain is used as stored
    assert gain_stats(torch.ones(2), 1.0, log_value=torch.tensor([0.5, -0.5]))["drift"] == pytest.approx(0.5)


def _batches(n=2, size=8, hw=16, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, hw, hw, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("name, overrides, invariant", [
    ("resnet18_bn", {}, True),                   # every conv feeds a BatchNorm (train mode)
    ("salunet_c18_v2", {"conv_ws": "scaled"}, True),  # standardised kernels: invariant up to WS's eps
    ("salunet_c18_v2", {"conv_ws": "scaled_fixed"}, True),
    ("salunet_c18_v2", {}, False),               # centred kernels set the signal's scale
])
def test_radial_gradient_is_zero_exactly_where_kernels_are_scale_invariant(name, overrides, invariant):
    torch.manual_seed(0)
    m = salunet.create_model(name, num_classes=10, width=4, **overrides).train()
    rep = dynamics_report(m, _batches())
    radial = [k["radial"] for k in rep["kernels"].values()]
    assert len(radial) == sum(isinstance(c, torch.nn.Conv2d) for c in m.modules())
    if invariant:
        assert max(radial) < 1e-3
    else:
        assert min(radial) > 1e-3 and sum(radial) / len(radial) > 0.02
    assert all(k["grad_ratio"] > 0 for k in rep["kernels"].values())


def test_model_is_left_as_it_was_and_gains_drift_from_init():
    torch.manual_seed(0)
    m = salunet.create_model("salunet_c18_v2", num_classes=10, width=4).train()
    before = copy.deepcopy(m.state_dict())
    marker = torch.full_like(m.fc.weight, 7.0)
    m.fc.weight.grad = marker.clone()
    rep = dynamics_report(m, _batches())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert torch.equal(m.fc.weight.grad, marker) and m.layer1[0].conv1.weight.grad is None
    assert max(g["drift"] for g in rep["gains"].values()) < 1e-6  # at init every gain sits at its init value (float32)
    salu = m.layer2[0].na1.norm
    with torch.no_grad():
        salu.log_a += 0.25
    rep = dynamics_report(m, _batches())
    assert rep["gains"]["layer2.0.na1.norm.a"]["drift"] == pytest.approx(0.25, rel=1e-5)
    assert rep["gains"]["layer2.0.na1.norm.a"]["kind"] == "SALU.a"
    summ = dynamics_summary(rep, lambda n: n.split(".")[0])
    assert list(summ)[:2] == ["stem", "layer1"]
    assert summ["layer2"]["gains"]["SALU.a"]["drift"] > 0.01 > 1e-6 > summ["layer1"]["gains"]["SALU.a"]["drift"]
    with pytest.raises(ValueError, match="at least one"):
        dynamics_report(m, [])


def test_dynamics_experiment(tmp_path):
    out = run_experiment("dynamics", out=str(tmp_path), name="dyn", data="digits", configs="bn,ws-center",
                         width=4, images=64)
    d = tmp_path / "dyn"
    assert (d / "dynamics.png").exists()
    saved = json.loads((d / "results.json").read_text())
    assert [r["label"] for r in saved["models"]] == ["bn", "ws-center"]
    assert out == saved  # what it returns is what it wrote
    bn, center = (r["stages"]["layer3"]["kernels"] for r in saved["models"])
    assert bn["radial"] < 1e-3 < center["radial"]
    assert "BatchNorm2d.weight" in saved["models"][0]["stages"]["layer3"]["gains"]
    with pytest.raises(ValueError, match="unknown config"):
        run_experiment("dynamics", out=str(tmp_path), name="bad", data="digits", configs="nope")
