"""convert(..., example_input=x) calibrates the new SALUs so that a converted model is trainable at init
(docs/SPEC.md "Trainability at initialisation"): the same [0.5, 2] stage-std rule as the native SaluNet models."""
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
    """The check can fail: a0 = b0 = 1 SALUs lose the signal (docs/SPEC.md: 0.34 -> 0.03 at width 16)."""
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


def test_calibration_samples_every_position_not_one_pixel_column():
    """A batch of 128 at 32x32 once made the subsample stride equal the image width (only pixel column 0, the
    zero-padded border, was seen): the output rms then came out ~1.2 instead of 1."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
    nn.init.kaiming_normal_(m[0].weight)
    x = torch.randn(128, 3, 32, 32)
    salunet.convert(m, example_input=x)
    with torch.no_grad():
        rms = m(x).square().mean((0, 2, 3)).sqrt()
    assert (rms - 1).abs().max() < 0.05, rms


def test_conversion_keeps_each_submodule_mode():
    """Tracing and calibration run in eval mode and hand every submodule back its own mode: a frozen BatchNorm in
    a training model stays frozen; a new module takes the mode of the one it replaces."""
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8),
                      nn.BatchNorm1d(8))
    m.train()
    m[5].eval()  # frozen
    m[3].eval()  # dropout switched off
    salunet.convert(m, norm="keep", example_input=torch.randn(16, 4))
    assert [x.training for x in m] == [True, True, True, False, True, False]
    e = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU()).eval()
    salunet.convert(e, norm="batchnorm", example_input=torch.randn(16, 4))
    assert not any(x.training for x in e.modules())
    before = [b.clone() for b in e[1].buffers()]
    with torch.no_grad():
        e(torch.randn(16, 4) * 5 + 3)  # an eval forward must not move the new BatchNorm's running statistics
    assert all(torch.equal(a, b) for a, b in zip(before, e[1].buffers()))


def test_salu_behind_a_new_batchnorm_keeps_its_init():
    """norm="batchnorm+salu": in training the SALU sees batch-normalised input, which an eval-mode calibration
    pass cannot show it, so it is left at its init instead of being sized for the raw scale."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    report = salunet.convert(m, norm="batchnorm+salu", example_input=3 * torch.randn(8, 3, 16, 16))
    salu = next(x for x in m.modules() if isinstance(x, SALU))
    fresh = SALU(8)
    assert torch.equal(salu.log_a, fresh.log_a) and torch.equal(salu.log_b, fresh.log_b)
    assert not any("calibrated" in note for _, note in report.notes)
