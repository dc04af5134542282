"""convert(..., example_input=x) calibrates the new SALUs so that a converted model is trainable at init
(SPEC.md "Trainability at initialisation"): the same [0.5, 2] stage-std rule as the native SaluNet models."""
import pytest
import torch
from torch import nn

import salunet
from salunet import SALU
from salunet.convert import CALIBRATION_AMPLITUDE
from salunet.models import create_model
from helpers import stage_stds

LO, HI = 0.5, 2.0  # the models' init rule (tests/test_models.py)


def _converted_resnet18(seed, **kw):
    torch.manual_seed(seed)
    m = create_model("resnet18_bn", num_classes=10, width=16)
    x = torch.randn(16, 3, 32, 32)
    report = salunet.convert(m, example_input=x, **kw)
    return m, x, report


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converted_resnet18_keeps_stage_std_in_range(seed):
    m, _, report = _converted_resnet18(seed)
    assert report.ok and "calibrated 20 of 20 new SALU" in str(report), str(report)
    stds = stage_stds(m, torch.randn(16, 3, 32, 32))  # a fresh batch, not the calibration one
    bad = {k: round(v, 3) for k, v in stds.items() if not LO <= v <= HI}
    assert not bad, f"stage std out of [{LO}, {HI}] after calibrated convert: {bad}"


def test_without_calibration_the_rule_fails():
    """The check can fail: a0 = b0 = 1 SALUs lose the signal (SPEC.md: 0.34 -> 0.03 at width 16)."""
    m, x, report = _converted_resnet18(0, calibrate=False)
    assert "calibrated" not in str(report)
    assert stage_stds(m, x)["layer4"] < LO


def test_calibrated_salu_reproduces_unit_scale_output():
    m = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    with torch.no_grad():
        m[0].weight.mul_(torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0])[:, None])  # five very different scales
    x = torch.randn(512, 6)
    salunet.convert(m, example_input=x)
    salu = m[1]
    assert isinstance(salu, SALU)
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y.square().mean(0).sqrt(), torch.ones(5), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(salu.amplitude, torch.full((5,), CALIBRATION_AMPLITUDE))


def test_converted_resnet18_trains():
    m, x, _ = _converted_resnet18(1)
    y = torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(m.train()(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.8 * losses[0], losses
