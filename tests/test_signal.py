"""analysis/signal.py: statistics on inputs with known answers, the fused sites recomputed right, and the
``signal`` and ``nf-study`` experiments end to end at tiny scale."""
import json
import math

import pytest
import torch
from torch import nn

import salunet
from salunet.analysis.experiments import run_experiment
from salunet.analysis.signal import ChannelSums, signal_report, site_stats, stage_summary


def _stats(x, dim=1, width=None, gate=True):
    s = ChannelSums(kind="t")
    s.add(x, dim, width)
    return site_stats(s, gate)


def test_known_channel_statistics():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    ch0 = 2.0 + torch.randn(n, generator=g)  # mean 2, std 1: mean^2/var = 4; 97.7% positive -> stuck
    ch1 = 3.0 * torch.randn(n, generator=g)  # mean 0, std 3: ratio 0, balanced
    x = torch.stack([ch0, ch1], 1).view(n // 100, 100, 2).permute(0, 2, 1)  # (N, C=2, L=100)
    st = _stats(x, dim=1)
    assert st["mean2_var"] == pytest.approx((4 + 0) / 2, rel=0.02)
    assert st["within_std"] == pytest.approx((1 + 3) / 2, rel=0.01)
    # pooled: sqrt(mean within-variance + variance of the channel means) = sqrt((1 + 9) / 2 + 1)
    assert st["pooled_std"] == pytest.approx(math.sqrt(6), rel=0.01)
    assert st["stuck"] == 0.5  # channel 0 only
    assert st["silent"] == 0.0


def test_past_knee_fraction_and_silent_channels():
    u = torch.linspace(-1, 1, 10_001).view(1, 1, -1)  # uniform on [-1, 1]
    st = _stats(torch.cat([u, torch.zeros_like(u)], 1), dim=1, width=torch.tensor([0.5, 0.5]), gate=False)
    # channel 0: |x| > 0.5 for half its values; channel 1: all zero (silent, never past the knee)
    assert st["past_knee"] == pytest.approx(0.25, abs=1e-3)
    assert st["silent"] == 0.5 and st["mean2_var"] == pytest.approx(0.0, abs=1e-9)
    assert "stuck" not in st


def test_batches_accumulate_like_one_batch():
    x = torch.randn(64, 3, 4, 4) + torch.tensor([0.5, -1.0, 0.0]).view(1, 3, 1, 1)
    one = _stats(x)
    s = ChannelSums()
    for part in x.split(16):
        s.add(part, 1)
    two = site_stats(s, True)
    for k in ("mean2_var", "within_std", "pooled_std", "stuck"):
        assert two[k] == pytest.approx(one[k], rel=1e-9)


def test_fused_sites_match_the_unfused_model():
    """A SaluNet (fused SALU -> gate kernels) and the same weights in unfused modules report the same sites."""
    torch.manual_seed(0)
    m = salunet.create_model("salunet_c18", num_classes=10, width=4)
    x = torch.randn(8, 3, 16, 16)
    fused = signal_report(m, [x])
    block = m.layer1[0]
    # layer1.0.na1 is a fused SALUAct: its gate input is SALU(conv1(x)), computed here by the modules themselves
    h = block.conv1(m.stem(x))
    ref = _stats(block.na1.norm(h))
    site = fused["layer1.0.na1.act"]
    assert site["role"] == "gate"
    for k in ("mean2_var", "within_std", "stuck"):
        assert site[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9)
    tail = fused["layer1.0.tail.act"]  # gate input of the tail: SALU(branch) + shortcut
    branch = block.conv2(block.na1(h))
    ref_tail = _stats(block.tail.norm(branch) + block.shortcut(m.stem(x)))
    assert tail["within_std"] == pytest.approx(ref_tail["within_std"], rel=1e-6)
    assert fused["layer1.0.na1.norm"]["kind"] == "SALU" and "past_knee" in fused["layer1.0.na1.norm"]


def test_bn_model_sites_and_stage_summary():
    torch.manual_seed(0)
    m = salunet.create_model("resnet18_bn", num_classes=10, width=4).train()
    sites = signal_report(m, [torch.randn(8, 3, 16, 16)])
    assert sum(s["role"] == "norm" for s in sites.values()) == sum(isinstance(c, nn.BatchNorm2d) for c in m.modules())
    # in train mode BatchNorm centres every channel: its outputs (the ReLUs' inputs in the stem) have no mean
    assert sites["stem.1.1"]["mean2_var"] < 1e-6 and sites["stem.1.1"]["kind"] == "ReLU"
    summ = stage_summary(sites, lambda n: n.split(".")[0])
    assert list(summ) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert summ["layer1"]["gate"]["sites"] == 4  # two blocks, two gates each


def test_signal_and_nf_study_experiments(tmp_path):
    out = run_experiment("signal", out=str(tmp_path), name="sig", data="digits", configs="salunet,ws-scaled,bn",
                         width=4, images=64)
    d = tmp_path / "sig"
    assert (d / "signal.png").exists() and [m["source"] for m in out["models"]] == ["init"] * 3
    saved = json.loads((d / "results.json").read_text())
    labels = [r["label"] for r in saved["models"]]
    assert labels == ["salunet", "ws-scaled", "bn"]
    ws = saved["models"][1]["stages"]["layer2"]["norm"]["mean2_var"]
    plain = saved["models"][0]["stages"]["layer2"]["norm"]["mean2_var"]
    assert ws < plain  # weight standardisation removes the mean shift that plain convs create
    study = run_experiment("nf-study", out=str(tmp_path), name="nf", data="digits", configs="ws-scaled,bn",
                           seeds=1, epochs=1, width=4, train_subset=256, test_subset=128)
    assert [t["config"] for t in study["table"]] == ["ws-scaled", "bn"]
    assert all(0 <= t["mean"] <= 1 for t in study["table"])
    run = tmp_path / "nf" / "runs" / "ws-scaled-lr0.05-s0"
    assert json.loads((run / "config.json").read_text())["model_overrides"] == {"conv_ws": "scaled"}
    # ... and the signal experiment reads that run back as a checkpoint
    back = run_experiment("signal", out=str(tmp_path), name="sig2", data="digits", configs="", checkpoints=str(run),
                          width=4, images=32)
    assert len(back["models"]) == 1 and "epoch 1" in back["models"][0]["source"]
    with pytest.raises(ValueError, match="unknown nf-study config"):
        run_experiment("nf-study", out=str(tmp_path), name="bad", data="digits", configs="nope")


def test_a_cell_trained_pinned_is_probed_after_its_first_pin(tmp_path):
    """The v3 cell trains pinned (what salunet_c18_v3 declares), so at init it is probed as its first step sees it:
    every SALU's sqrt(ab) * rms(input) on the first 32 images at the pin's K 0.15 (unpinned it sits elsewhere)."""
    from salunet.analysis.experiments import _probe_setup, args_from_dict
    from salunet.train.recalibrate import salu_input_rms, salu_sites

    data, models = _probe_setup(args_from_dict("signal", dict(configs="v3,ws-scaled", data="digits", width=4,
                                                               images=64)))
    assert [(label, source) for label, source, _ in models] == [("v3", "init, pinned"), ("ws-scaled", "init")]
    x = data.normalize(data.x_train[:32])
    for (_, _, model), pinned in zip(models, (True, False)):
        rms = salu_input_rms(model, [x])
        for name, (_, salu) in salu_sites(model).items():
            k = (torch.exp(0.5 * (salu.log_a + salu.log_b)).detach().reshape(rms[name].shape) * rms[name]).double()
            assert torch.allclose(k, torch.full_like(k, 0.15), rtol=1e-3) == pinned, name
