"""``salunet experiment``: every experiment end to end at tiny scale (embedded digits, width 4, one or two
epochs), writing its JSON and PNG; option checking; nothing left behind on bad input."""
import json
import math

import pytest

from salunet.analysis.experiments import EXPERIMENTS, args_from_dict, run_experiment
from salunet.cli import main

TINY = {"data": "digits", "seeds": 1}


def _run(tmp_path, name, **kw):
    out = run_experiment(name, out=str(tmp_path), name=name, **kw)
    d = tmp_path / name
    assert json.loads((d / "results.json").read_text())["experiment"] == name
    assert list(d.glob("*.png")), f"{name} wrote no figure"
    return out, d


def test_variance(tmp_path):
    out, _ = _run(tmp_path, "variance", depth=12, dim=32, samples=256, settings="1.5:0.1,1:1")
    curves = out["curves"]
    assert all(len(v) == 13 for v in curves.values())
    bounded = next(v for k, v in curves.items() if k.startswith("SALU a0=1.5"))
    # bounded at A^2 = 15 and nonvanishing: the stack neither explodes nor collapses
    assert all(0.5 < v < 15 for v in bounded)
    assert curves["LayerNorm"][-1] == pytest.approx(1.0, abs=0.05)


def test_a_failing_figure_keeps_the_results(tmp_path, monkeypatch):
    """The measurements reach results.json before any figure is drawn: a plotting error costs the PNG only."""
    from salunet.analysis import plots

    def broken(*a, **k):
        raise RuntimeError("no display")

    monkeypatch.setattr(plots, "plot_variance", broken)
    with pytest.raises(RuntimeError, match="no display"):
        run_experiment("variance", out=str(tmp_path), name="v", depth=4, dim=8, samples=32, settings="1:1")
    saved = json.loads((tmp_path / "v" / "results.json").read_text())
    assert saved["experiment"] == "variance" and all(len(c) == 5 for c in saved["curves"].values())


def test_plasticity_tracks_every_slope(tmp_path):
    out, d = _run(tmp_path, "plasticity", **TINY, epochs=2, width=4, train_subset=0, test_subset=0)
    for v in ("batchnorm", "identity", "salu"):
        seed = out["variants"][v]["seeds"][0]
        assert set(seed["layers"]) == {"act1", "act2", "act3"}
        assert len(seed["pooled"]["spread"]) == 3  # init + 2 epochs
        assert len(seed["final_slopes"]["act3"]) == 16  # 4 * width hidden units, one slope each
        assert seed["pooled"]["mean"][0] == pytest.approx(0.25)  # PReLU's init
        assert seed["pooled"]["total_drift"][-1] > 0  # the slopes moved
        # within-layer spread: around each layer's own mean, so never above the spread pooled over layers
        assert [seed["layers"][k]["units"] for k in ("act1", "act2", "act3")] == [4, 8, 16]
        assert len(seed["within_spread"]) == 3 and seed["within_spread"][0] == 0  # every slope 0.25 at init
        assert all(w <= p + 1e-12 for w, p in zip(seed["within_spread"], seed["pooled"]["spread"]))
        assert out["variants"][v]["final_within_spread_mean"] == pytest.approx(seed["within_spread"][-1])
    assert (d / "runs.jsonl").read_text().count("\n") == 3


def test_ablation_and_checkpoint_analyses(tmp_path):
    out, d = _run(tmp_path, "ablation", data="digits", seeds=2, epochs=1, width=4, pairs="salu:swalu,batchnorm:relu")
    labels = [t["label"] for t in out["table"]]
    assert labels == ["salu + swalu", "batchnorm + relu"]
    assert all(t["seeds"] == 2 and t["mean"] is not None and t["std"] is not None for t in out["table"])
    # same seed -> same data order: the two pairs of seed 0 trained on identical batches, so they differ only
    # by the layers; rerunning one cell reproduces its accuracy exactly (the grid is deterministic)
    runs = {(r["norm"], r["seed"]): r for r in out["runs"]}
    again = run_experiment("ablation", out=str(tmp_path), name="again", data="digits", seeds=1, epochs=1, width=4,
                           pairs="salu:swalu")
    assert again["runs"][0]["test_acc"] == runs[("salu", 0)]["test_acc"]

    salu_run, bn_run = runs[("salu", 0)]["run_dir"], runs[("batchnorm", 0)]["run_dir"]
    geo, _ = _run(tmp_path, "geometry", checkpoints=f"{salu_run},{bn_run}")
    layers = geo["checkpoints"][0]["layers"]
    assert layers and all(l["amplitude_gmean"] > 0 and l["width_gmean"] > 0 for l in layers)
    assert any(l["downsample"] for l in layers)
    assert geo["checkpoints"][1]["layers"] == []  # the BN twin has no SALU-family layer
    rep, _ = _run(tmp_path, "representation", checkpoints=f"{salu_run},{bn_run}", labels="salu,bn", images=64)
    for ck in rep["checkpoints"]:
        assert list(ck["stages"]) == ["stem", "layer1", "layer2", "layer3", "layer4", "features"]
        for s in ck["stages"].values():
            assert 1 <= s["effective_rank"] <= s["dims"] and 0 < s["isotropy"] <= 1
            assert math.isfinite(s["excess_kurtosis"])
    curves, _ = _run(tmp_path, "curves", runs=f"{salu_run},{bn_run}", labels="salu,bn")
    assert set(curves["final"]) == {"salu", "bn"}


def test_batch_sweep_and_init_study(tmp_path):
    out, _ = _run(tmp_path, "batch-sweep", **TINY, epochs=1, width=4, batch_sizes="4,32", train_subset=512,
                  test_subset=200)
    rows = out["summary"]["salunet_c18"]
    assert [r["batch_size"] for r in rows] == [4, 32]
    assert rows[0]["lr"] == pytest.approx(0.05 * math.sqrt(4 / 128))  # the documented sqrt rule
    out, _ = _run(tmp_path, "init-study", **TINY, epochs=1, width=4, configs="default,naive", lrs="0.05",
                  train_subset=512, test_subset=200)
    assert [t["config"] for t in out["table"]] == ["default", "naive"] and out["best"] is not None


def test_batch_sweep_per_device(tmp_path):
    """--global-batch N: every size is a micro-batch of an N-image optimizer step at one learning rate (what DDP
    on N / size ranks computes without SyncBatchNorm); a size that does not divide N is refused before any run."""
    out, d = _run(tmp_path, "batch-sweep", **TINY, epochs=1, width=4, models="resnet18_bn", batch_sizes="4,32",
                  global_batch=32, base_lr=0.03, train_subset=256, test_subset=100)
    assert [(r["batch_size"], r["accum_steps"], r["lr"]) for r in out["runs"]] == [(4, 8, 0.03), (32, 1, 0.03)]
    for line, accum in zip((d / "runs.jsonl").read_text().splitlines(), (8, 1)):
        cfg = json.loads(line)["config"]
        assert (cfg["batch_size"], cfg["accum_steps"], cfg["lr"]) == (32, accum, 0.03)
    assert out["x_label"].startswith("per-device batch") and out["summary"]["resnet18_bn"][0]["batch_size"] == 4
    with pytest.raises(ValueError, match="each per-device batch size must divide it"):
        run_experiment("batch-sweep", out=str(tmp_path), name="bad", **TINY, batch_sizes="3,4", global_batch=32)
    assert not (tmp_path / "bad" / "runs.jsonl").exists()


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown experiment"):
        args_from_dict("nope", {})
    with pytest.raises(ValueError, match="unknown option"):
        args_from_dict("ablation", {"epoch": 3})
    with pytest.raises(ValueError, match="option epochs: .three. is not an integer"):
        args_from_dict("ablation", {"epochs": "three"})
    assert args_from_dict("ablation", {"full": True}).epochs == 300  # --full: the paper's scale
    assert args_from_dict("ablation", {"full": True, "epochs": "7"}).epochs == 7  # explicit values win
    assert set(EXPERIMENTS) >= {"plasticity", "geometry", "representation", "batch-sweep", "variance", "ablation",
                                "init-study", "curves"}


@pytest.mark.parametrize("argv, message", [
    (["experiment", "ablation", "--pairs", "salu-swalu", "--data", "digits"], "norm:act"),
    (["experiment", "ablation", "--data", "cifar10"], "needs --data-path"),
    (["experiment", "representation"], "give --checkpoints"),
    (["experiment", "geometry", "--checkpoints", "/nonexistent/run"], "no such checkpoint"),
    (["experiment", "init-study", "--configs", "best", "--data", "digits"], "unknown init config"),
    (["experiment", "variance", "--depth", "0"], "must be positive"),
])
def test_bad_input_one_line_nothing_written(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # no run directory left behind


def test_full_false_keeps_cpu_defaults():
    assert args_from_dict("plasticity", {"full": "false"}).epochs == 15
    assert args_from_dict("plasticity", {"full": "true"}).epochs == 100


def test_representation_of_a_vit_pools_tokens(tmp_path):
    from salunet.train import train

    run = train({"model": "salunet_t", "width": 24, "model_overrides": {"depth": 2}, "epochs": 1,
                 "out": str(tmp_path), "name": "vit", "progress": False})["run_dir"]
    rep, _ = _run(tmp_path, "representation", checkpoints=run, images=64)
    stages = rep["checkpoints"][0]["stages"]
    assert list(stages) == ["embed", "layer1", "layer2", "features"]
    # the saved JSON sorts its keys; the network's order travels with it for redraws
    saved = json.loads((tmp_path / "representation" / "results.json").read_text())["checkpoints"][0]
    assert list(saved["stages"]) != saved["stage_order"] == ["embed", "layer1", "layer2", "features"]
    assert all(s["dims"] == 24 for s in stages.values())  # the hidden size, not the 17 tokens
    geo, _ = _run(tmp_path, "geometry", checkpoints=run)
    assert {l["stage"] for l in geo["checkpoints"][0]["layers"]} == {"layer1", "layer2", "head"}


def _fake_run(path, accs, losses=None):
    path.mkdir(parents=True)
    rows = [{"epoch": i + 1, "train_loss": 1.0 / (i + 1), "test_loss": 1.2 / (i + 1), "test_acc": a}
            for i, a in enumerate(accs)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_curves_average_runs_that_share_a_label(tmp_path):
    a0, a1 = _fake_run(tmp_path / "a0", [0.4, 0.5]), _fake_run(tmp_path / "a1", [0.5, 0.7])
    b = _fake_run(tmp_path / "b", [0.3, 0.6])
    out, d = _run(tmp_path, "curves", runs=f"{a0},{b},{a1}", labels="a,b,a")
    assert out["runs"] == {"a": [a0, a1], "b": [b]}
    fa = out["final"]["a"]
    assert fa["epoch"] == 2 and fa["test_acc"] == pytest.approx(0.6)
    assert fa["test_acc_std"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.5, 0.7
    assert fa["per_run_test_acc"] == [0.5, 0.7] and fa["train_loss"] == pytest.approx(0.5)
    assert out["final"]["b"]["test_acc"] == 0.6 and "test_acc_std" not in out["final"]["b"]  # one run: as is
    short = _fake_run(tmp_path / "short", [0.4])
    with pytest.raises(ValueError, match="label 'a': its runs have different epochs"):
        run_experiment("curves", out=str(tmp_path), name="bad", runs=f"{a0},{short}", labels="a,a")
    assert not (tmp_path / "bad").exists()  # nothing left behind
