"""Per-step JSON lines (``log_steps``) and TensorBoard events (``logger="tensorboard"``, skipped without the
tensorboard package) of a training run, and what resume does with them."""
import json
import math
import sys

import pytest

from salunet.train import train
from salunet.train.loggers import RunLoggers
from salunet.train.config import resolve_config
from salunet.train.rundir import RunDir

TINY = dict(model="salunet_c18", width=4, data="digits", train_subset=128, test_subset=64, batch_size=32,
            eval_batch_size=64, lr=0.05, ema_decay=0.9, progress=False)  # 4 steps per epoch


def test_per_step_json_lines_cover_every_step_once(tmp_path):
    train(resolve_config(overrides=dict(TINY, epochs=2, log_steps=True, out=str(tmp_path), name="s")))
    files = RunDir(tmp_path / "s")
    rows = files.read_steps()
    metrics = files.read_metrics()
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["epoch"] for r in rows] == [1] * 4 + [2] * 4
    for r in rows:
        assert set(r) == {"step", "epoch", "loss", "acc", "lr", "grad_norm", "time"}
        assert math.isfinite(r["loss"]) and 0 <= r["acc"] <= 1 and r["grad_norm"] > 0 and r["lr"] > 0
    for m in metrics:  # an epoch's lr is its last step's
        assert rows[m["step"] - 1]["lr"] == m["lr"]
    assert math.isclose(sum(r["loss"] for r in rows[:4]) / 4, metrics[0]["train_loss"], rel_tol=1e-9)
    assert rows[0]["lr"] < rows[3]["lr"]  # warm-up: the lr changes from step to step


def test_no_step_file_unless_asked(tmp_path):
    train(resolve_config(overrides=dict(TINY, epochs=1, out=str(tmp_path), name="n")))
    assert not RunDir(tmp_path / "n").steps.exists() and not RunDir(tmp_path / "n").tensorboard_dir.exists()


def test_resume_drops_the_step_lines_past_the_checkpoint(tmp_path):
    cfg = resolve_config(overrides=dict(TINY, log_steps=True))
    files = RunDir(tmp_path)
    files.append_steps([{"step": s, "epoch": 1 + (s - 1) // 4} for s in range(1, 11)])  # killed in epoch 3
    with open(files.steps, "a") as f:
        f.write('{"step": 11, "ep')  # and mid-line
    loggers = RunLoggers(cfg, tmp_path, start_step=8)
    loggers.step(9, 3, loss=1.0, acc=0.5, lr=0.1, grad_norm=2.0)
    loggers.close()
    assert [r["step"] for r in files.read_steps()] == list(range(1, 10))


def test_step_lines_are_written_in_batches_and_on_close(tmp_path, monkeypatch):
    from salunet.train import loggers as L

    cfg = resolve_config(overrides=dict(TINY, log_steps=True))
    lg = RunLoggers(cfg, tmp_path)
    lg.step(1, 1, loss=1.0, acc=0.5, lr=0.1, grad_norm=2.0)
    assert not RunDir(tmp_path).steps.exists()  # buffered
    monkeypatch.setattr(L, "FLUSH_S", 0.0)
    lg.step(2, 1, loss=1.0, acc=0.5, lr=0.1, grad_norm=2.0)
    assert len(RunDir(tmp_path).read_steps()) == 2  # at most FLUSH_S seconds late
    monkeypatch.setattr(L, "FLUSH_S", 1e9)
    lg.step(3, 1, loss=1.0, acc=0.5, lr=0.1, grad_norm=2.0)
    lg.close()
    assert len(RunDir(tmp_path).read_steps()) == 3


def test_a_diverged_run_keeps_the_steps_it_took(tmp_path, monkeypatch):
    """The run stops in epoch 2: epoch 1 stays (checkpoint, metrics) and so do the step lines up to the stop."""
    from salunet.train import faults
    from salunet.train.stopping import TrainingDiverged

    def hit(kind, n):
        if kind == "step" and n == 6:
            raise TrainingDiverged("stop here")

    monkeypatch.setattr(faults, "hit", hit)
    with pytest.raises(TrainingDiverged):
        train(resolve_config(overrides=dict(TINY, epochs=3, log_steps=True, out=str(tmp_path), name="d")))
    assert [r["step"] for r in RunDir(tmp_path / "d").read_steps()] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_without_the_package_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"pip install 'salunet\[tensorboard\]'"):
        train(resolve_config(overrides=dict(TINY, epochs=1, logger="tensorboard", out=str(tmp_path), name="t")))
    assert not (tmp_path / "t").exists()


def test_an_unknown_logger_is_a_config_error():
    with pytest.raises(ValueError, match="logger: 'wandb' is not one of none, tensorboard"):
        resolve_config(overrides={"logger": "wandb"})


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_per_step_and_per_epoch_with_the_lr(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install "
                                              "'salunet[tensorboard]')")
    train(resolve_config(overrides=dict(TINY, epochs=2, logger="tensorboard", log_steps=True, out=str(tmp_path),
                                        name="tb")))
    files = RunDir(tmp_path / "tb")
    sc = _scalars(files.tensorboard_dir)
    steps, metrics = files.read_steps(), files.read_metrics()
    for tag in ("step/loss", "step/acc", "step/lr", "step/grad_norm"):
        assert [s for s, _ in sc[tag]] == list(range(1, 9)), tag
    assert [v for _, v in sc["step/lr"]] == pytest.approx([r["lr"] for r in steps], rel=1e-6)
    assert [v for _, v in sc["step/loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    for tag in ("epoch/train_loss", "epoch/test_acc", "epoch/lr", "epoch/ema_test_acc", "epoch/epoch_s"):
        assert [s for s, _ in sc[tag]] == [4, 8], tag  # at the epoch's last step
    assert [v for _, v in sc["epoch/test_acc"]] == pytest.approx([m["test_acc"] for m in metrics], rel=1e-6)
    assert [v for _, v in sc["epoch/lr"]] == pytest.approx([m["lr"] for m in metrics], rel=1e-6)


def test_tensorboard_on_resume_hides_what_an_interrupted_attempt_wrote_past_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from torch.utils.tensorboard import SummaryWriter

    train(resolve_config(overrides=dict(TINY, epochs=1, logger="tensorboard", out=str(tmp_path), name="r")))
    with SummaryWriter(str(RunDir(tmp_path / "r").tensorboard_dir)) as w:  # an attempt killed in epoch 2
        for step in (5, 6):
            w.add_scalar("step/loss", 999.0, step)
    train(resume=str(tmp_path / "r"), epochs=2)
    sc = _scalars(RunDir(tmp_path / "r").tensorboard_dir)
    assert [s for s, _ in sc["step/loss"]] == list(range(1, 9))
    assert 999.0 not in [v for _, v in sc["step/loss"]]
    assert [s for s, _ in sc["epoch/test_acc"]] == [4, 8]
    assert json.loads(RunDir(tmp_path / "r").config.read_text())["logger"] == "tensorboard"
