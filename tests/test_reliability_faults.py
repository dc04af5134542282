"""Faults survived (issue 6): ``kill -9`` at chosen points, corrupt checkpoints, two runs on one directory, a
full disk, a killed torchrun worker. Every case ends with the final weights of an uninterrupted run, bitwise
(model, EMA, optimizer state and RNG state of the last checkpoint).

The trainer runs as a real ``python -m salunet train`` process; the deterministic failure points come from the
``SALUNET_FAULT`` test hook (``salunet/train/faults.py``). The data is a 128/64-image slice of the embedded
digits saved as an .npz (no scikit-learn import in the subprocesses), the model cnn4 at width 4: 4 steps per
epoch, 3 epochs, a few seconds per process.
"""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from salunet.cli import main
from salunet.data import load_arrays
from salunet.train import faults, loop
from salunet.train.checkpoint import CheckpointError, RunLock, list_checkpoints, load_checkpoint
from salunet.train.config import resolve_config
from salunet.train.distributed import DistInfo
from salunet.train.resume import RunPlan, resume_config

STEPS_PER_EPOCH, EPOCHS = 4, 3


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    d = load_arrays("digits")
    p = tmp_path_factory.mktemp("data") / "digits128.npz"
    np.savez(p, x_train=d.x_train[:128], y_train=d.y_train[:128], x_test=d.x_test[:64], y_test=d.y_test[:64])
    return p


def args(npz, out, name):
    return ["--model", "cnn4", "--width", "4", "--data", "npz", "--data-path", str(npz), "--batch-size", "32",
            "--epochs", str(EPOCHS), "--ema-decay", "0.9", "--progress", "false", "--device", "cpu",
            "--out", str(out), "--name", name]


def env(fault=None):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "SALUNET_KERNELS": "eager"}
    e.pop("SALUNET_FAULT", None)
    if fault:
        e["SALUNET_FAULT"] = fault
    return e


def salunet(argv, fault=None, torchrun=0, max_restarts=0):
    launcher = [sys.executable, "-m", "salunet"]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun),
                    "--max-restarts", str(max_restarts), "-m", "salunet"]
    return subprocess.run([*launcher, "train", *argv], env=env(fault), capture_output=True, text=True, timeout=300)


def final_state(run_dir):
    return load_file(str(run_dir / "checkpoints" / f"epoch_{EPOCHS:04d}.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    keys = [k for k in a if k.startswith("s/")]  # model, ema, optim, rng
    assert any(k.startswith("s/model/") for k in keys) and any(k.startswith("s/optim/") for k in keys)
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def assert_clean_finish(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))  # one line per epoch, none lost or doubled
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / ".lock").exists()


@pytest.fixture(scope="module")
def reference(npz, tmp_path_factory):
    """The uninterrupted run every fault case must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    r = salunet(args(npz, out, "ref"))
    assert r.returncode == 0, r.stderr[-2000:]
    return final_state(out / "ref")


# ---- kill -9 at several points, then --resume ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fault,kept", [
    ("step:2", []),                       # in the first epoch: no checkpoint yet, resume starts from config.json
    ("step:6", [1]),                      # mid-epoch 2
    ("eval:2", [1]),                      # during epoch 2's evaluation
    ("checkpoint:2", [1]),                # half-way through writing epoch 2's checkpoint
])
def test_kill9_then_resume_gives_identical_weights(npz, tmp_path, reference, fault, kept):
    run = tmp_path / "run"
    r = salunet(args(npz, tmp_path, "run"), fault=fault)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert [int(p.stem.split("_")[1]) for p in list_checkpoints(run)] == kept
    for p in list_checkpoints(run):
        load_checkpoint(p)  # what survived loads and verifies
    partial = list((run / "checkpoints").glob(".epoch_0002.safetensors.*.tmp")) if kept else []
    assert bool(partial) == fault.startswith("checkpoint")  # the interrupted write left only a temporary file

    r = salunet(["--resume", str(run), "--progress", "false"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"(resumed at epoch {kept[-1] if kept else 0})" in r.stdout
    if partial:
        assert "removed 1 partial file(s) of an interrupted write" in r.stderr
    assert_same_weights(final_state(run), reference)
    assert_clean_finish(run)


@pytest.mark.slow
def test_sigterm_stops_cleanly_then_resumes(npz, tmp_path, reference):
    """SIGTERM (a scheduler; torchrun stopping a job's other workers) mid-epoch: one line naming the checkpoint
    to continue from, exit code 1, the lock released; --resume then ends with the uninterrupted weights."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "salunet", "train", *args(npz, tmp_path, "run")],
                            env=env("step:6:stop"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_stopped(proc)
    proc.send_signal(signal.SIGTERM)  # pending while stopped, handled as soon as it continues
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=120) == 1
    err = proc.stderr.read().strip().splitlines()
    assert err == [f"salunet: stopped: terminated (SIGTERM) during epoch 2; the last good checkpoint is "
                   f"{run}/checkpoints/epoch_0001.safetensors; continue with --resume {run}"]
    assert not (run / ".lock").exists() and not list(run.rglob("*.tmp"))
    r = salunet(["--resume", str(run), "--progress", "false"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(final_state(run), reference)
    assert_clean_finish(run)


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    """A kill in the middle of appending to metrics.jsonl leaves half a line; resume drops it (the epoch is
    redone), and the file ends with exactly one line per epoch."""
    kw = dict(model="cnn4", width=4, train_subset=64, test_subset=32, batch_size=32, epochs=3, progress=False,
              out=str(tmp_path), name="m")
    loop.train(**kw)
    run = tmp_path / "m"
    final = load_file(str(list_checkpoints(run)[-1]))
    list_checkpoints(run)[-1].unlink()  # the crash came before epoch 3's checkpoint ...
    with open(run / "metrics.jsonl", "a") as f:  # ... while a second epoch-3 line was being appended
        f.write('{"epoch": 3, "train_lo')
    loop.train(resume=str(run))
    assert_same_weights(load_file(str(list_checkpoints(run)[-1])), final)
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ---- corrupt checkpoints: detected, named, and the previous good one is used ------------------------------------

def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        del data[len(data) - 100:]
    else:  # flip one bit of the tensor payload: only the checksum can tell
        data[-5] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_previous_good(npz, tmp_path, reference):
    run = tmp_path / "run"
    r = salunet(args(npz, tmp_path, "run"), fault="step:10")  # killed in epoch 3: epochs 1 and 2 saved
    assert r.returncode == -signal.SIGKILL
    first, newest = list_checkpoints(run)
    _damage(newest, "bitflip")
    with pytest.raises(CheckpointError, match=f"{newest}: checksum mismatch"):
        load_checkpoint(newest)
    load_checkpoint(first)  # the previous good checkpoint is still there and loads

    r = salunet(["--resume", str(run), "--progress", "false"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"salunet train: skipping {newest}: checksum mismatch, the file is corrupt" in r.stderr
    assert f"salunet train: resuming from the previous good checkpoint {first}" in r.stderr
    assert "(resumed at epoch 1)" in r.stdout
    assert_same_weights(final_state(run), reference)
    assert_clean_finish(run)


@pytest.mark.parametrize("how,message", [("truncate", "checksum mismatch, the file is corrupt"),
                                         ("bitflip", "checksum mismatch")])
def test_corrupt_checkpoint_named_and_previous_loadable(tmp_path, how, message):
    """In-process twin of the test above for both kinds of damage: the message names the file, the resume
    plan skips it and picks the previous good checkpoint."""
    loop.train(model="cnn4", width=4, train_subset=64, test_subset=32, batch_size=32, epochs=2, progress=False,
               out=str(tmp_path), name="c")
    first, newest = list_checkpoints(tmp_path / "c")
    _damage(newest, how)
    with pytest.raises(CheckpointError, match=f"{newest}: {message}"):
        load_checkpoint(newest)
    cfg, found, notes = resume_config(tmp_path / "c", {})
    assert found[0] == first and notes[0].startswith(f"skipping {newest}: {message}")
    # with every checkpoint damaged, resume refuses (it never silently starts over)
    _damage(first, how)
    before = {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"no checkpoint loads .*move checkpoints/ away to start the run over"):
        loop.train(resume=str(tmp_path / "c"))
    assert before == {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()}


# ---- two runs on one directory ----------------------------------------------------------------------------

def _wait_stopped(proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        assert proc.poll() is None, "the first run ended instead of stopping at the fault point"
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError("the first run never reached the fault point")


def _snapshot(d):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_second_run_on_a_live_run_directory_refuses(npz, tmp_path, reference, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "salunet", "train", *args(npz, tmp_path, "run")],
                             env=env("step:6:stop"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_stopped(first)  # alive, frozen mid-epoch 2, holding the run directory
        before = _snapshot(run)
        message = f"salunet: error: {run}: run directory is in use by process {first.pid} (a run is writing there)"
        for argv in (["train", *args(npz, tmp_path, "run")],  # the same command again
                     ["train", "--resume", str(run), "--progress", "false"]):  # or a resume of it
            code = main(argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and err[0].startswith(message), err
            assert _snapshot(run) == before  # nothing overwritten, nothing touched
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert_same_weights(final_state(run), reference)  # and the first run finished undisturbed


def test_run_that_loses_the_lock_race_touches_nothing_of_the_winner(tmp_path):
    """Two launches with the same --name can both pass the up-front checks; the one that then finds the lock
    taken must leave every file of the run that holds it (its config, metrics, a checkpoint being written)."""
    run = tmp_path / "exp"
    run.mkdir()
    winner = RunLock(run)
    winner.acquire()
    try:
        (run / "config.json").write_text("{}\n")
        (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / ".epoch_0002.safetensors.abc.tmp").write_bytes(b"x" * 10)
        before = _snapshot(run)
        cfg = resolve_config(None, {"model": "cnn4", "width": 4, "train_subset": 64, "test_subset": 32,
                                         "batch_size": 32, "epochs": 1, "progress": False, "device": "cpu",
                                         "out": str(tmp_path), "name": "exp"})
        with pytest.raises(ValueError, match="run directory is in use"):
            loop._train(RunPlan(cfg, run, None, True, []), DistInfo())
        assert _snapshot(run) == before
    finally:
        winner.release()


# ---- no space left on device ------------------------------------------------------------------------------

@pytest.mark.slow
def test_disk_full_while_saving_stops_cleanly_and_resumes(npz, tmp_path, reference):
    run = tmp_path / "run"
    r = salunet(args(npz, tmp_path, "run"), fault="checkpoint:2:enospc")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1, r.stderr
    assert err[0] == (f"salunet: stopped: no space left on device while writing {run}/checkpoints/"
                      f"epoch_0002.safetensors (epoch 2); free some space; the last good checkpoint is "
                      f"{run}/checkpoints/epoch_0001.safetensors; continue with --resume {run}")
    assert [p.name for p in list_checkpoints(run)] == ["epoch_0001.safetensors"]
    load_checkpoint(list_checkpoints(run)[0])
    assert not list(run.rglob("*.tmp")) and not (run / ".lock").exists()
    r = salunet(["--resume", str(run), "--progress", "false"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(final_state(run), reference)
    assert_clean_finish(run)


@pytest.mark.parametrize("where", ["metrics", "first_checkpoint"])
def test_disk_full_elsewhere(tmp_path, monkeypatch, capsys, where):
    """A full disk while appending to metrics.jsonl (epoch 2), or while saving a new run's first checkpoint."""
    from salunet.train import rundir

    real_append = rundir.append_jsonl

    def append(path, row):
        if row["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(path, row)

    def hit(point, n):  # the checkpoint write's midway hook: the disk fills up half-way through the file
        if point == "checkpoint":
            raise OSError(errno.ENOSPC, "No space left on device")

    if where == "metrics":
        monkeypatch.setattr(rundir, "append_jsonl", append)  # what RunDir.append_metrics writes with
    else:
        monkeypatch.setattr(faults, "hit", hit)
    code = main(["train", "--model", "cnn4", "--width", "4", "--train-subset", "64", "--test-subset", "32",
                 "--batch-size", "32", "--epochs", "3", "--progress", "false", "--out", str(tmp_path), "--name", "d"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    run = tmp_path / "d"
    if where == "metrics":
        assert err[0].startswith("salunet: stopped: no space left on device while writing to ")
        assert err[0].endswith(f"the last good checkpoint is {run}/checkpoints/epoch_0001.safetensors; "
                               f"continue with --resume {run}")
        assert [p.name for p in list_checkpoints(run)] == ["epoch_0001.safetensors"]
    else:
        assert err[0] == (f"salunet: stopped: no space left on device while writing {run}/checkpoints/"
                          "epoch_0001.safetensors (epoch 1); free some space; nothing was kept; run the same "
                          "command again")
        assert not run.exists()  # a new run that saved nothing leaves nothing


# ---- a torchrun worker killed -----------------------------------------------------------------------------

LOST = r"salunet: stopped: (rank 0 lost contact with the other ranks|terminated \(SIGTERM\)) during epoch 2[ ;]"


@pytest.fixture(scope="module")
def reference_2ranks(npz, tmp_path_factory):
    """2 ranks (gloo) sum gradients in another order than 1 process: the torchrun cases compare to this."""
    out = tmp_path_factory.mktemp("ref2")
    r = salunet(args(npz, out, "ref2"), torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return final_state(out / "ref2")


@pytest.mark.slow
def test_torchrun_worker_killed_stops_cleanly_then_resumes(npz, tmp_path, reference_2ranks):
    """Without --max-restarts: the job stops; the surviving rank says so in one line, naming the checkpoint
    to continue from; ``--resume`` under torchrun then ends with the uninterrupted 2-rank weights."""
    run = tmp_path / "run"
    r = salunet(args(npz, tmp_path, "run"), fault="step:6@1", torchrun=2)
    assert r.returncode != 0
    stopped = [line for line in r.stderr.splitlines() if line.startswith("salunet: stopped:")]
    assert len(stopped) == 1, r.stderr[-3000:]  # rank 0 (rank 1 died without a word)
    # rank 0 notices the dead peer in its next collective (in practice always first), or torchrun's SIGTERM
    assert re.match(LOST, stopped[0]), stopped[0]
    assert stopped[0].endswith(f"the last good checkpoint is {run}/checkpoints/epoch_0001.safetensors; continue "
                               f"with --resume {run} (under torchrun as before; torchrun --max-restarts N "
                               "restarts automatically)")
    assert "Traceback" not in "\n".join(line for line in r.stderr.splitlines() if "salunet" in line)
    assert [p.name for p in list_checkpoints(run)] == ["epoch_0001.safetensors"]
    r = salunet(["--resume", str(run), "--progress", "false"], torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(final_state(run), reference_2ranks)
    assert_clean_finish(run)


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_from_last_checkpoint(npz, tmp_path, reference_2ranks):
    """With --max-restarts 1 and rank 0 (the writer) killed: torchrun restarts the job, the new attempt finds
    the run directory of the failed one and continues from its last checkpoint, saying so."""
    run = tmp_path / "run"
    r = salunet(args(npz, tmp_path, "run"), fault="step:6@0", torchrun=2, max_restarts=1)
    assert r.returncode == 0, r.stderr[-3000:]
    stopped = [line for line in r.stderr.splitlines() if line.startswith("salunet: stopped:")]
    assert len(stopped) == 1 and re.match(LOST.replace("rank 0", "rank 1"), stopped[0]), r.stderr[-3000:]
    assert (f"torchrun restarts the job (restart 1 of 1), which continues from {run}/checkpoints/"
            "epoch_0001.safetensors") in r.stderr
    assert (f"salunet train: torchrun restart 1 of 1: resuming {run} from {run}/checkpoints/epoch_0001.safetensors "
            "(epoch 1)") in r.stderr
    assert_same_weights(final_state(run), reference_2ranks)
    assert_clean_finish(run)
