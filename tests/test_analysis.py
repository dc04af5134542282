"""salunet.analysis: statistics against inputs with known answers, and hook capture."""
import math

import pytest
import torch
from torch import nn

from salunet import SALU, SWALU, create_model
from salunet.analysis import capture as C
from salunet.analysis import stats as S


def test_effective_rank_known_answers():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(500, 1, generator=g, dtype=torch.float64), torch.randn(1, 32, generator=g, dtype=torch.float64)
    assert S.effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)  # rank one
    z = torch.randn(200, 16, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(z - z.mean(0))  # centred orthonormal columns: all singular values equal
    assert S.effective_rank(q) == pytest.approx(16.0, rel=1e-9)  # -> D
    iso = torch.randn(20000, 8, generator=g)
    assert 7.8 < S.effective_rank(iso) <= 8.0
    assert S.effective_rank(torch.ones(10, 4)) == 1.0  # constant: degenerate, minimum


def test_isotropy_known_answers():
    g = torch.Generator().manual_seed(1)
    assert S.isotropy(torch.randn(50000, 10, generator=g)) == pytest.approx(1.0, abs=0.01)
    rank1 = torch.randn(1000, 1, generator=g) * torch.ones(1, 10)
    assert S.isotropy(rank1) == pytest.approx(0.1, abs=1e-9)  # 1/D
    # two directions with variances 1 and 1: (2)^2 / (D * 2) = 2/D
    f = torch.zeros(4000, 10)
    f[:, :2] = torch.randn(4000, 2, generator=g)
    assert S.isotropy(f) == pytest.approx(0.2, abs=0.01)
    stats = S.spectrum_stats(f)
    assert stats["isotropy"] == pytest.approx(S.isotropy(f)) and stats["effective_rank"] == pytest.approx(
        S.effective_rank(f))


def test_spectrum_rejects_bad_input():
    with pytest.raises(ValueError, match="samples, dims"):
        S.effective_rank(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        S.isotropy(torch.randn(1, 4))
    with pytest.raises(ValueError, match="NaN"):
        S.effective_rank(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_moments_known_distributions():
    g = torch.Generator().manual_seed(2)
    n = 400_000
    gauss = S.moments(torch.randn(n, generator=g) * 3, channel_dim=None)
    assert gauss["variance"] == pytest.approx(9.0, rel=0.02)
    assert abs(gauss["skewness"]) < 0.02 and abs(gauss["excess_kurtosis"]) < 0.05
    expo = S.moments(torch.empty(n).exponential_(generator=g), channel_dim=None)
    assert expo["skewness"] == pytest.approx(2.0, rel=0.05) and expo["excess_kurtosis"] == pytest.approx(6.0, rel=0.1)
    uni = S.moments(torch.rand(n, generator=g), channel_dim=None)
    assert uni["excess_kurtosis"] == pytest.approx(-1.2, abs=0.02)
    # per channel along dim 1 of an NCHW map: channel c has variance (c+1)^2
    x = torch.randn(64, 3, 16, 16, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    m = S.moments(x, channel_dim=1)
    assert m["channels"] == 3 and m["channel_variance_mean"] == pytest.approx((1 + 4 + 9) / 3, rel=0.03)
    const = S.moments(torch.ones(5, 2), channel_dim=1)
    assert const["variance"] == 0 and const["skewness"] == 0 and const["channel_excess_kurtosis_mean"] == 0
    # constants whose float mean is inexact (0.1, 0.3, ...) are constant too: no shape, not skew +-1 / kurtosis -2
    for v in (0.1, 0.3, 0.7, 1.1):
        for n in (1000, 65536):
            c = S.moments(torch.full((2, n), v, dtype=torch.float64), channel_dim=0)
            assert c["variance"] == 0 and c["skewness"] == 0 and c["excess_kurtosis"] == 0, (v, n)
            assert c["channel_skewness_mean"] == 0 and c["channel_excess_kurtosis_mean"] == 0, (v, n)


def test_dormant_units_without_zeros():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 10, 4, 4, generator=g) + 5.0  # never zero
    x[:, 2] = 0.7  # constant (dead) unit with a nonzero value
    x[:, 7] = 0.7 + 1e-4 * torch.randn(256, 4, 4, generator=g)  # nearly constant
    assert S.dormant_fraction(x, channel_dim=1) == pytest.approx(0.2)
    scores = S.dormant_scores(x, channel_dim=1)
    assert scores[2] == 0 and scores[0] > 0.9
    with pytest.raises(ValueError, match="tau"):
        S.dormant_fraction(x, tau=-1)


def test_plasticity_spread_and_drift():
    # three parameters, two epochs: collapse to a narrow range while moving
    v = [[0.0, 1.0, 2.0], [0.9, 1.0, 1.1], [1.0, 1.0, 1.0]]
    p = S.plasticity(v)
    assert p["spread"][0] == pytest.approx(math.sqrt(2 / 3)) and p["spread"][2] == 0.0
    assert p["drift"] == pytest.approx([(0.9 + 0 + 0.9) / 3, (0.1 + 0 + 0.1) / 3])
    assert p["total_drift"][2] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="time >= 2"):
        S.plasticity([[1.0, 2.0]])


def test_salu_geometry_reports_every_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SALU(4, a_init=2.0, b_init=0.5), SWALU(4))
    rows = S.salu_geometry(model)
    assert [r["kind"] for r in rows] == ["SALU", "SWALU"]
    assert rows[0]["amplitude_gmean"] == pytest.approx(2.0) and rows[0]["width_gmean"] == pytest.approx(1.0)
    assert rows[1]["amplitude_gmean"] == pytest.approx(10.0)


def test_capture_stages_and_features():
    model = create_model("salunet_c18", num_classes=10, width=8)
    x = torch.randn(6, 3, 16, 16)
    out = C.capture(model, x)
    assert list(out) == ["stem", "layer1", "layer2", "layer3", "layer4", "features"]
    assert out["layer4"].shape == (6, 64, 2, 2) and out["features"].shape == (6, 64)
    assert model.training  # mode restored
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.eval()
    torch.testing.assert_close(out["features"], model.forward_features(x).detach())


def test_capture_removes_hooks_on_error():
    model = create_model("salunet_c18", num_classes=10, width=8)
    with pytest.raises(RuntimeError):
        C.capture(model, torch.randn(2, 5, 16, 16))  # wrong channel count fails inside the forward
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="unknown stage"):
        C.capture(model, torch.randn(2, 3, 16, 16), names=["layer9"])


def test_plots_take_more_series_than_the_palette_has(tmp_path):
    """Nine checkpoints / models / variants (the palette has eight colours): every plot is still drawn."""
    from salunet.analysis import plots

    stages = {s: {"effective_rank": 3.0 + i, "isotropy": 0.5, "variance": 1.0 + i, "channel_skewness_mean": 0.1,
                  "channel_excess_kurtosis_mean": 0.2} for i, s in enumerate(("stem", "layer1"))}
    rep = {"checkpoints": [{"label": f"ck{i}", "stages": stages} for i in range(9)]}
    sweep = {"chance": 0.1, "summary": {f"m{i}": [{"batch_size": 1, "mean": 0.3, "std": 0.01, "diverged": True},
                                                  {"batch_size": 2, "mean": 0.4, "std": None, "diverged": False}]
                                        for i in range(9)}}
    band = {"mean": [1.0, 0.9], "p10": [0.8, 0.7], "p90": [1.2, 1.1], "spread": [0.1, 0.2]}
    plast = {"variants": {f"v{i}": {"pooled": band, "within_spread": [0.0, 0.1] if i % 2 else None}
                          for i in range(9)}}
    for fn, result in ((plots.plot_representation, rep), (plots.plot_batch_sweep, sweep),
                       (plots.plot_plasticity, plast)):
        out = fn(result, tmp_path / f"{fn.__name__}.png")
        assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_within_group_spread_is_the_std_around_each_groups_mean():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 5, generator=g, dtype=torch.float64) + 10  # (time, units) of a layer far from the other
    b = torch.randn(3, 11, generator=g, dtype=torch.float64) - 10
    spreads = [a.std(1, unbiased=False).tolist(), b.std(1, unbiased=False).tolist()]
    got = S.within_group_spread(spreads, [5, 11])
    centred = torch.cat([a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)], 1)
    assert got == pytest.approx(centred.std(1, unbiased=False).tolist(), rel=1e-12)
    pooled = torch.cat([a, b], 1).std(1, unbiased=False)
    assert all(p > 5 * w for p, w in zip(pooled.tolist(), got))  # pooling counts the gap between the groups
    with pytest.raises(ValueError, match="one spread series per group"):
        S.within_group_spread(spreads, [5])


def test_wd_sweep_script_groups_runs_by_prefix_and_weight_decay(tmp_path):
    """scripts/wd_sweep.py: runs named <prefix>[wd<wd>]-s<seed> become one cell per (family, weight decay), mean
    and std over seeds; other names (v2bias, v2lr0.1wd2e-3) stay out; a missing folder exits 2."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("wd_sweep", Path(__file__).parents[1] / "scripts" / "wd_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = {"v2-s0": 0.60, "v2-s1": 0.70, "v2wd2e-3-s0": 0.5, "v2bias-s0": 0.1, "v2lr0.1wd2e-3-s0": 0.2,
            "v2scaledwd4e-3-s0": 0.8, "resnet18_bnwd1e-4-s2": 0.9, "v2rc0.5wd8e-3-s1": 0.7}
    for name, acc in runs.items():
        (tmp_path / "r" / name).mkdir(parents=True)
        (tmp_path / "r" / name / "summary.json").write_text(json.dumps({"final": {"test_acc": acc, "train_loss": 1.0}}))
    assert mod.main([str(tmp_path / "r"), str(tmp_path / "out" / "sweep")]) == 0
    got = json.loads((tmp_path / "out" / "sweep.json").read_text())["summary"]
    centred = got["salunet_c18_v2 (centred kernels)"]
    assert [r["weight_decay"] for r in centred] == [5e-4, 2e-3]
    assert centred[0]["mean"] == pytest.approx(0.65) and centred[0]["std"] == pytest.approx(0.0707, abs=1e-4)
    assert centred[1]["per_seed"] == [0.5] and centred[1]["std"] is None
    assert got["salunet_c18_v2 + scaled WS"][0]["weight_decay"] == 4e-3
    assert got["resnet18_bn (BN + ReLU)"][0]["seeds"] == [2]
    rc = got["salunet_c18_v2 + SALU recalibrated, K = 0.5"]  # the "0.5" in the prefix is not a weight decay
    assert [(r["weight_decay"], r["per_seed"]) for r in rc] == [(8e-3, [0.7])]
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert mod.main([str(tmp_path / "nope"), str(tmp_path / "x")]) == 2


def test_seed_bars_script_reads_the_last_epoch_of_each_run(tmp_path, capsys):
    """scripts/seed_bars.py: each cell is the runs its glob matches, the last metrics row of each (mean, sample std,
    per run in folder order, mean training loss); panels keep the order given; JSON lines and a PNG are written;
    a glob matching nothing, a run without metrics and a cell without '=' exit 2."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("seed_bars", Path(__file__).parents[1] / "scripts" / "seed_bars.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, accs in {"a-s0": [0.1, 0.5], "a-s1": [0.2, 0.7], "b-s0": [0.3, 0.9]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"test_acc": a, "train_loss": 1 - a}) + "\n" for a in accs))
    out = tmp_path / "o"
    assert mod.main([f"p1::A={tmp_path}/a-s*", f"p2::B={tmp_path}/b-s*",
                     "--json", f"{out}.json", "--plot", f"{out}.png"]) == 0
    rows = [json.loads(r) for r in Path(f"{out}.json").read_text().splitlines()]
    assert [(r["panel"], r["label"]) for r in rows] == [("p1", "A"), ("p2", "B")]
    assert rows[0]["acc"] == pytest.approx([50.0, 70.0]) and rows[0]["mean"] == pytest.approx(60.0)
    assert rows[0]["std"] == pytest.approx(14.1421, abs=1e-3) and rows[0]["mean_train_loss"] == pytest.approx(0.4)
    assert rows[1]["std"] == 0.0 and rows[1]["acc"] == pytest.approx([90.0])
    assert "| p1 | A | 60.0 ± 14.1 | 50.0, 70.0 | 0.400 |" in capsys.readouterr().out
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "c-s0").mkdir()
    for bad in ([f"A={tmp_path}/nothing*"], [f"C={tmp_path}/c-s*"], [f"{tmp_path}/a-s*"]):
        assert mod.main(bad) == 2
    assert "seed_bars: error:" in capsys.readouterr().err
