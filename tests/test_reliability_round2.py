"""Reliability, round two (issue 14): every case a hostile user found, each a test that failed before the fix.
Grouped by the root fix; docs/RELIABILITY.md ("Round two") lists them with the message each one now gives."""
import json
import random

import pytest
import torch

from salunet.models import create_model
from salunet.train.checkpoint import CheckpointError, checkpoint_from_bytes, load_checkpoint, save_checkpoint


# ---- 1. one checksum over the whole checkpoint -------------------------------------------------------------------

def _small_checkpoint(path):
    """A real (if tiny) training checkpoint: model, optimizer, EMA, RNG state, and the meta salunet train writes."""
    torch.manual_seed(0)
    model = create_model("cnn4", num_classes=10, in_chans=1, img_size=8, width=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "ema": None,
             "scaler": None, "rng": {"torch": torch.get_rng_state()}}
    meta = {"config": {"model": "cnn4", "width": 2, "epochs": 3, "lr": 0.05}, "epoch": 2, "step": 8,
            "num_classes": 10, "in_chans": 1, "image_size": 8, "mean": [0.5], "std": [0.25], "salunet": "0.1.0"}
    save_checkpoint(path, state, meta)
    return path.read_bytes()


def test_bit_flip_sweep_every_header_bit_and_sampled_tensor_bits_refused(tmp_path):
    """Every one-bit flip of the header (length prefix, JSON: dtypes, shapes, offsets, config, epoch, mean/std,
    checksum) and of 4,000 sampled tensor bits is refused with the checksum message. Before the fix, header
    flips that kept the JSON parseable (one in seven) loaded: `std` or `epoch` changed silently."""
    data = _small_checkpoint(tmp_path / "c.safetensors")
    checkpoint_from_bytes(data)  # the intact file loads
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    bits = list(range(header_end * 8)) + rng.sample(range(header_end * 8, len(data) * 8), 4000)
    loaded = []
    buf = bytearray(data)
    for bit in bits:
        buf[bit // 8] ^= 1 << (bit % 8)
        try:
            checkpoint_from_bytes(buf, "c")
            loaded.append(bit)
        except CheckpointError as exc:
            assert str(exc).startswith("c: checksum mismatch, the file is corrupt"), str(exc)
        buf[bit // 8] ^= 1 << (bit % 8)
    assert header_end > 1000 and not loaded, f"{len(loaded)} of {len(bits)} flips loaded, e.g. bit {loaded[:3]}"


def test_format_1_checkpoint_loads_with_a_warning(tmp_path):
    """Checkpoints written before the whole-file checksum still load (the committed long-run checkpoints are
    format 1), and say that their header is unprotected."""
    import hashlib

    from safetensors.torch import save as st_save

    from salunet.train import checkpoint as C

    tensors = {}
    skeleton = C._flatten({"model": {"w": torch.ones(2)}}, "s", tensors)
    meta = {"epoch": 1}
    digest = C._digest(tensors)
    data = st_save(tensors, metadata={"format": "salunet-checkpoint/1", "meta": json.dumps(meta),
                                      "skeleton": json.dumps(skeleton), "sha256": digest})
    path = tmp_path / "old.safetensors"
    path.write_bytes(data)
    with pytest.warns(RuntimeWarning, match="format 1 checkpoint .* not the header"):
        state, got = load_checkpoint(path)
    assert got == meta and torch.equal(state["model"]["w"], torch.ones(2))
    assert hashlib.sha256(data).hexdigest() != digest


# ---- shared small runs -----------------------------------------------------------------------------------------

import io  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from helpers import cifar_batch_bytes, make_image_folder, make_npz  # noqa: E402
from salunet.cli import main  # noqa: E402
from salunet.train import train  # noqa: E402
from salunet.train.checkpoint import list_checkpoints  # noqa: E402
from salunet.train.resume import claim_run_dir, plan_run  # noqa: E402
from salunet.train.rundir import RunDir  # noqa: E402

TINY = dict(model="cnn4", width=2, batch_size=16, train_subset=32, test_subset=16, progress=False, ema_decay=0.0)


def _one_line(capsys, code, expect_code=2):
    err = capsys.readouterr().err.strip()
    assert code == expect_code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def run1(tmp_path):
    """A finished 1-epoch run on an .npz (the data-change tests replace that file)."""
    npz = make_npz(tmp_path / "d.npz", n_train=48, n_test=16)
    train(**TINY, data="npz", data_path=str(npz), epochs=1, out=str(tmp_path / "runs"), name="r")
    return tmp_path / "runs" / "r", npz


def _files(d):
    return {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}


# ---- 2. the run-directory claim: atomic, re-checked under the lock ----------------------------------------------

def test_same_name_planned_before_a_run_finished_there_is_refused_untouched(tmp_path):
    """Run B plans `--name x` while x does not exist; run A then creates and finishes x (releasing its lock);
    B's claim, made under the lock, sees A's files and refuses without touching them."""
    plan = plan_run({**TINY, "out": str(tmp_path), "name": "x"}, None, {})
    finished = tmp_path / "x"
    (finished / "checkpoints").mkdir(parents=True)
    (finished / "config.json").write_text('{"model": "cnn4"}')
    (finished / "metrics.jsonl").write_text('{"epoch": 1}\n')
    before = _files(finished)
    with pytest.raises(ValueError, match="run directory already exists .*--resume"):
        claim_run_dir(plan)
    assert _files(finished) == before and not (finished / ".lock").exists()


def test_default_names_of_runs_started_in_the_same_second_differ(tmp_path):
    plans = [plan_run({**TINY, "out": str(tmp_path)}, None, {}) for _ in range(3)]
    assert len({p.run_dir for p in plans}) == 1  # the same second: the same default name
    claimed = [claim_run_dir(p) for p in plans]
    dirs = [d for d, _, _ in claimed]
    assert len(set(dirs)) == 3 and dirs[1].name == dirs[0].name + "-2" and dirs[2].name == dirs[0].name + "-3"
    for _, lock, _ in claimed:
        lock.release()


# ---- 3. torchrun restarts: matched by the job's launcher, not by a reusable run id -------------------------------

def test_torchrun_restart_never_adopts_another_jobs_directory(tmp_path, monkeypatch):
    from salunet.train import distributed as D
    from salunet.train.resume import _restart_run_dir
    from salunet.train.config import resolve_config

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "fixed-rdzv-id")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    other, mine, old = (RunDir(tmp_path / n) for n in ("job-a", "job-b", "legacy"))
    for r in (other, mine, old):
        r.path.mkdir()
    other.write_run_id("fixed-rdzv-id", ["otherhost:123:456"])  # an earlier job with the same --rdzv-id
    old.run_id_file.write_text("fixed-rdzv-id")  # salunet before: the bare id, which cannot tell jobs apart
    cfg = resolve_config(None, {**TINY, "out": str(tmp_path)})
    assert _restart_run_dir(cfg) is None
    mine.write_run_id("fixed-rdzv-id", [D.agent_identity(), "node2:1:2"])
    assert _restart_run_dir(cfg) == mine.path


# ---- 4. checkpoints ordered by epoch, and their recorded epoch checked -------------------------------------------

def test_checkpoints_ordered_as_numbers_past_epoch_9999(tmp_path):
    run = RunDir(tmp_path)
    run.checkpoint_dir.mkdir()
    for e in (9998, 10000, 9999, 10001):
        run.checkpoint(e).write_bytes(b"x")
    (run.checkpoint_dir / "epoch_x.safetensors").write_bytes(b"x")  # not an epoch: ignored
    assert [RunDir.epoch_of(p) for p in run.checkpoints()] == [9998, 9999, 10000, 10001]


def test_resume_refuses_a_checkpoint_whose_recorded_epoch_is_not_its_name(run1, capsys):
    run, _ = run1
    ckpt = list_checkpoints(run)[-1]
    os.replace(ckpt, RunDir(run).checkpoint(6))  # renamed: "epoch 6" would skip five epochs
    line = _one_line(capsys, main(["train", "--resume", str(run), "--epochs", "8"]))
    assert "epoch_0006.safetensors: records epoch 1, not the epoch of its name" in line


# ---- 5. outputs never alias inputs ---------------------------------------------------------------------------------

def test_eval_out_equal_to_the_checkpoint_is_refused(run1, capsys, tmp_path):
    run, _ = run1
    ckpt = list_checkpoints(run)[-1]
    before = ckpt.read_bytes()
    line = _one_line(capsys, main(["eval", str(ckpt), "--out", str(ckpt)]))
    assert "--out is the checkpoint, which writing the result would destroy" in line
    os.link(ckpt, tmp_path / "hardlink.json")  # the same file under another name
    line = _one_line(capsys, main(["eval", str(ckpt), "--out", str(tmp_path / "hardlink.json")]))
    assert "is the checkpoint" in line and ckpt.read_bytes() == before


# ---- 6. no file written through a symbolic link --------------------------------------------------------------------

def test_lock_that_is_a_symlink_never_truncates_its_target(run1, capsys, tmp_path):
    run, _ = run1
    victim = tmp_path / "precious.txt"
    victim.write_text("do not lose me")
    (run / ".lock").symlink_to(victim)
    line = _one_line(capsys, main(["train", "--resume", str(run), "--epochs", "2"]))
    assert ".lock: is a symbolic link, refused" in line and victim.read_text() == "do not lose me"


def test_metrics_symlink_and_linked_checkpoints_folder_refused(run1, capsys, tmp_path):
    run, _ = run1
    victim = tmp_path / "precious.txt"
    victim.write_text("keep")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    line = _one_line(capsys, main(["train", "--resume", str(run), "--epochs", "2"]))
    assert victim.read_text() == "keep" and "metrics.jsonl: is a symbolic link" in line
    (run / "metrics.jsonl").unlink()
    elsewhere = tmp_path / "elsewhere"
    os.replace(run / "checkpoints", elsewhere)
    (run / "checkpoints").symlink_to(elsewhere)
    line = _one_line(capsys, main(["train", "--resume", str(run), "--epochs", "2"]))
    assert "checkpoints: is a symbolic link" in line and len(list(elsewhere.iterdir())) == 1


# ---- 7. labels and shapes validated per file and against the data set --------------------------------------------

def _archive(path, batches: dict):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_cifar_batch_with_fewer_labels_than_images_named(tmp_path):
    from salunet.data import load_cifar

    good = {f"data_batch_{i}": cifar_batch_bytes(12, i) for i in range(1, 6)}
    short = pickle.loads(good["data_batch_2"])
    short[b"labels"] = short[b"labels"][:-1]  # the total still matched before: data_batch_3 got one extra
    extra = pickle.loads(good["data_batch_3"])
    extra[b"labels"] = extra[b"labels"] + [0]
    good.update(data_batch_2=pickle.dumps(short, protocol=2), data_batch_3=pickle.dumps(extra, protocol=2),
                test_batch=cifar_batch_bytes(12, 9))
    with pytest.raises(ValueError, match=r"data_batch_2: 12 images but labels of shape \(11,\)"):
        load_cifar("cifar10", _archive(tmp_path / "c.tar.gz", good))


@pytest.mark.parametrize("case,replace,expect", [
    ("stray label", dict(y_train=np.r_[np.arange(63) % 10, 100000]), "labels span 0..100000 (100001 classes) but only 11"),
    ("label 1e9", dict(y_test=np.r_[np.arange(31) % 10, 10**9]), "labels span 0..1000000000"),
    ("timedelta labels", dict(y_train=(np.arange(64) % 10).astype("timedelta64[s]")), "y_train has dtype timedelta64"),
    ("8x16 images", dict(x_train=np.zeros((64, 8, 16, 3), np.uint8), x_test=np.zeros((32, 8, 16, 3), np.uint8)),
     "holds 8 x 16 images; the models take square images"),
    ("declared count exceeded", dict(num_classes=np.array(5)), "expected 0..4"),
])
def test_npz_labels_and_shapes(tmp_path, capsys, case, replace, expect):
    npz = make_npz(tmp_path / "bad.npz", **replace)
    line = _one_line(capsys, main(["train", "--data", "npz", "--data-path", str(npz), "--out", str(tmp_path / "o"),
                                   "--progress", "false"]))
    assert expect in line and not (tmp_path / "o").exists()


def test_npz_declared_class_count_is_used(tmp_path):
    from salunet.data import read_npz

    assert read_npz(make_npz(tmp_path / "d.npz", num_classes=np.array(12))).num_classes == 12


def test_cifar10_refuses_images_of_another_shape(tmp_path, capsys):
    npz = make_npz(tmp_path / "c.npz", shape=(16, 16, 1))
    line = _one_line(capsys, main(["train", "--data", "cifar10", "--data-path", str(npz), "--progress", "false",
                                   "--out", str(tmp_path / "o")]))
    assert "images of shape (16, 16, 1) (H, W, C), but cifar10 images are 32 x 32 x 3" in line


# ---- 8. resume refuses data that changed under the run --------------------------------------------------------------

def test_resume_refuses_a_replaced_npz_unless_told(run1, capsys):
    run, npz = run1
    with np.load(npz) as f:
        arrs = {k: f[k] for k in f.files}
    arrs["y_train"] = (arrs["y_train"] + 1) % 10  # the same images, labels re-mapped
    np.savez(npz, **arrs)
    before = _files(run)
    line = _one_line(capsys, main(["train", "--resume", str(run), "--epochs", "2"]))
    assert "the data changed since this run trained on it" in line and "--accept-data-change" in line
    assert _files(run) == before
    assert main(["train", "--resume", str(run), "--epochs", "2", "--accept-data-change"]) == 0
    assert [RunDir.epoch_of(p) for p in list_checkpoints(run)] == [1, 2]


def test_resume_refuses_renamed_class_folders(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imgs", classes=("ant", "bee"), per_class=8, size=(12, 12))
    out = tmp_path / "runs"
    assert main(["train", "--data", "imagefolder", "--data-path", str(root), "--model", "cnn4", "--width", "2",
                 "--batch-size", "8", "--epochs", "1", "--workers", "0", "--progress", "false", "--out", str(out),
                 "--name", "f"]) == 0
    for split in ("train", "val"):  # swapped names: the same folders, every label flipped
        os.replace(root / split / "ant", root / split / "tmp")
        os.replace(root / split / "bee", root / split / "ant")
        os.replace(root / split / "tmp", root / split / "bee")
    capsys.readouterr()
    line = _one_line(capsys, main(["train", "--resume", str(out / "f"), "--epochs", "2"]))
    assert "the data changed since this run trained on it" in line


# ---- 9. nothing hangs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [1e-300, 1e-30, 0.2, 1.0, 3.0, 1e6, 1e300])
def test_mixup_cutmix_any_alpha_draws_in_bounded_time(alpha):
    from salunet.data.augment import _beta, mix_batch

    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    draws = [_beta(alpha, g) for _ in range(2000)]
    assert time.perf_counter() - t < 10 and all(0.0 <= d <= 1.0 for d in draws)
    var = float(np.var(draws))  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert abs(np.mean(draws) - 0.5) < 0.04 and abs(var - 1 / (4 * (2 * alpha + 1))) < 0.02
    x = torch.randn(8, 3, 4, 4)
    for mixup, cutmix in ((alpha, 0.0), (0.0, alpha)):
        _, _, _, lam = mix_batch(x, torch.arange(8), mixup, cutmix, g)
        assert 0.0 <= lam <= 1.0


def test_fifo_in_an_image_folder_is_refused_not_waited_on(tmp_path):
    from salunet.data.imagefolder import open_image, scan_folder

    root = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=2)
    fifo = root / "train" / "a" / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="x.png: not a regular file"):
        scan_folder(root / "train")
    with pytest.raises(ValueError, match="x.png: not a regular file"):  # replaced after the scan: still no hang
        with open_image(fifo):
            pass


# ---- 10-11. one line, and limits checked before allocating ----------------------------------------------------------

def test_deep_json_config_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "deep.json"
    cfg.write_text("[" * 100_000 + "]" * 100_000)
    line = _one_line(capsys, main(["train", "--config", str(cfg)]))
    assert "deep.json: JSON nested too deeply" in line


@pytest.mark.parametrize("argv,expect", [
    (["--width", "1000000"], "does not fit in memory"),
    (["--crop-padding", "100000"], "crop_padding 100000 is larger than the 8 px images"),
    (["--model", "salunet_t", "--model-overrides", '{"img_size": 7}'], "img_size 7 is not divisible by patch"),
])
def test_oversized_options_are_one_line(tmp_path, capsys, argv, expect):
    line = _one_line(capsys, main(["train", "--out", str(tmp_path / "o"), "--progress", "false", *argv]))
    assert expect in line and not (tmp_path / "o").exists()


def test_eval_on_data_of_another_image_size_is_one_line(run1, capsys, tmp_path):
    run, _ = run1
    other = make_npz(tmp_path / "big.npz", shape=(16, 16, 3))
    line = _one_line(capsys, main(["eval", str(list_checkpoints(run)[-1]), "--data-path", str(other)]))
    assert "trained on 8 px images, data npz has 16 px" in line


def test_huge_sparse_file_as_checkpoint_refused_before_reading(tmp_path, capsys):
    p = tmp_path / "huge.safetensors"
    with open(p, "wb") as f:
        f.truncate(64 * 2**30)  # 64 GiB of holes: no disk used
    t = time.perf_counter()
    line = _one_line(capsys, main(["eval", str(p)]))
    assert "huge.safetensors" in line and time.perf_counter() - t < 5


def test_cifar_pickle_cannot_allocate_more_than_it_holds():
    """The unpickler's one constructor (numpy's _reconstruct) allocates its shape before any data arrives:
    283 bytes asked for 61 MB each before; now a shape larger than the pickle is refused."""
    import tracemalloc

    from salunet.data.cifar import _read_batch

    evil = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01J\x00\xe1\xf5\x05\x85q\x02"
            b"C\x01bq\x03\x87q\x04Rq\x05.")  # _reconstruct(ndarray, (100_000_000,), b"b")
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"not a CIFAR python batch \(an array of shape \(100000000,\)"):
        _read_batch(evil, "data_batch_1", b"labels", 10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20


def test_tar_member_larger_than_any_batch_refused_before_reading(tmp_path, monkeypatch):
    from salunet.data import cifar
    from helpers import make_cifar10_archive

    monkeypatch.setattr(cifar, "MAX_BATCH_BYTES", 1000)  # the archive's members are ~37 KB
    with pytest.raises(ValueError, match="member cifar-10-batches-py/data_batch_1 claims .* bytes, more than any"):
        cifar.load_cifar("cifar10", make_cifar10_archive(tmp_path / "c.tar.gz"))


def test_decompression_bomb_png_is_one_line(tmp_path, capsys):
    from PIL import Image

    root = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=2)
    Image.new("L", (9500, 9500)).save(root / "train" / "a" / "bomb.png")  # ~90 MB of pixels in a ~90 KB file
    line = _one_line(capsys, main(["train", "--data", "imagefolder", "--data-path", str(root), "--workers", "0",
                                   "--progress", "false", "--out", str(tmp_path / "o")]))
    assert "bomb.png: cannot decode image (DecompressionBombWarning)" in line or "bomb.png: 9500 x 9500" in line


# ---- 12. stops that say the right thing, downloads with limits ----------------------------------------------------

def test_disk_full_while_drawing_curves_is_not_reported_as_an_epoch(tmp_path, capsys, monkeypatch):
    import errno

    from salunet.analysis import plots

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "curves.png")

    monkeypatch.setattr(plots, "draw_run_curves", full)
    code = main(["train", "--model", "cnn4", "--width", "2", "--epochs", "1", "--train-subset", "64",
                 "--progress", "false", "--out", str(tmp_path), "--name", "c"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("salunet: stopped: training finished (1 epochs")
    assert "during epoch" not in err and "salunet experiment curves --runs" in err
    assert list_checkpoints(tmp_path / "c")


def test_download_larger_than_any_archive_is_abandoned_early(tmp_path, local_server):
    from salunet.data.cifar import download_cifar

    srv, base = local_server
    (srv / "cifar-10-python.tar.gz").write_bytes(b"\0" * (3 << 20))
    dest = tmp_path / "dl"
    with pytest.raises(ValueError, match="more than the 1,048,576 of any cifar10 archive|passed 1,048,576 bytes"):
        download_cifar("cifar10", dest, url=f"{base}/cifar-10-python.tar.gz", md5="0" * 32, progress=False,
                       max_bytes=1 << 20)
    assert list(dest.iterdir()) == []
    with pytest.raises(ValueError, match="the download took more than 0 s; nothing was kept"):
        download_cifar("cifar10", dest, url=f"{base}/cifar-10-python.tar.gz", md5="0" * 32, progress=False,
                       deadline=0.0)
    assert list(dest.iterdir()) == []


def test_bench_train_on_data_it_cannot_use_is_one_line(tmp_path, capsys):
    npz = make_npz(tmp_path / "small.npz")
    line = _one_line(capsys, main(["bench", "train", "--data-path", str(npz), "--repeats", "1", "--threads", "1",
                                   "--out", str(tmp_path / "b")]))
    assert line.startswith("salunet: error: bench train: ") and "but cifar10 images are 32 x 32 x 3" in line


def _spawn_train(argv, **env):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "SALUNET_KERNELS": "eager", **env}
    e.pop("SALUNET_FAULT", None) if "SALUNET_FAULT" not in env else None
    return subprocess.Popen([sys.executable, "-m", "salunet", "train", *argv], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.01, 0.5])
def test_sigterm_to_the_process_group_with_loader_workers_prints_no_traceback(tmp_path, delay):
    """How schedulers stop a job: SIGTERM to every process of its group, DataLoader workers included. The
    workers used to run the trainer's inherited handler and print ~20 lines of traceback each; a SIGTERM right
    at an epoch's start (delay 0: the next epoch's workers are being forked) could hang the run for good."""
    root = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=16, size=(16, 16))
    p = _spawn_train(["--data", "imagefolder", "--data-path", str(root), "--crop", "resized", "--workers", "2",
                      "--model", "cnn4", "--width", "2", "--batch-size", "4", "--epochs", "500", "--progress",
                      "false", "--out", str(tmp_path / "o"), "--name", "t"])
    for line in p.stdout:  # the end of epoch 1: the next epoch's workers start now
        if line.startswith("epoch 1/"):
            break
    time.sleep(delay)
    os.killpg(p.pid, signal.SIGTERM)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("salunet: stopped: terminated (SIGTERM) during epoch")


def test_a_sigterm_whose_terminated_python_swallows_still_stops_the_run(tmp_path, monkeypatch, capsys):
    """Python runs the SIGTERM handler wherever the main thread is. In an at-fork hook (loader workers being forked)
    or a ``__del__`` (a loader iterator's worker shutdown) its Terminated was printed as "Exception ignored" and
    dropped: the run trained on, deaf to later SIGTERMs (a group SIGTERM in CI; the workers forked after it never
    got it). Now the stop stays pending and the next batch raises it. Here the handler runs in a ``__del__``."""
    from salunet.train import loop

    class SigtermInDel:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # handled before kill returns, i.e. inside __del__

    end_epoch = loop._end_epoch

    def end_epoch_then_sigterm(run, epoch, *rest):
        end_epoch(run, epoch, *rest)
        if epoch == 0:
            SigtermInDel()  # dropped at once

    monkeypatch.setattr(loop, "_end_epoch", end_epoch_then_sigterm)
    npz = make_npz(tmp_path / "d.npz", n_train=64, n_test=16)
    code = main(["train", "--data", "npz", "--data-path", str(npz), "--model", "cnn4", "--width", "2", "--batch-size",
                 "16", "--epochs", "2", "--progress", "false", "--out", str(tmp_path / "o"), "--name", "t"])
    err = capsys.readouterr().err
    run = tmp_path / "o" / "t"
    assert code == 1 and "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1] == (f"salunet: stopped: terminated (SIGTERM) during epoch 2; the last good "
                                            f"checkpoint is {run}/checkpoints/epoch_0001.safetensors; continue with "
                                            f"--resume {run}")


def test_loader_workers_do_not_report_a_handover_the_main_process_dropped(capsys):
    """A worker's resource_sharer thread reports through sys.excepthook; a main process that stopped mid-handover
    (its own SIGTERM) made it print a ConnectionResetError traceback. Other errors are still printed."""
    from salunet.data.imagefolder import _quiet_excepthook

    for exc in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(32, "Broken pipe"), EOFError()):
        _quiet_excepthook(type(exc), exc, None)
    assert capsys.readouterr().err == ""
    _quiet_excepthook(ValueError, ValueError("something else"), None)
    assert "ValueError: something else" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stopped_torchrun_rank_ends_the_run_after_dist_timeout(tmp_path):
    """A SIGSTOPped rank (frozen, alive) used to hold its peers and the run directory for gloo's 30-minute
    default; now the peers stop after --dist-timeout seconds with a message that says so. (torchrun itself then
    waits 30 s before it kills the frozen rank: the test ends the job once rank 0 has spoken.)"""
    npz = make_npz(tmp_path / "d.npz", n_train=64, n_test=16)
    e = {**os.environ, "OMP_NUM_THREADS": "1", "SALUNET_KERNELS": "eager", "SALUNET_FAULT": "step:3:stop@1"}
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "salunet", "train", "--data", "npz", "--data-path", str(npz), "--model", "cnn4",
                          "--width", "2", "--batch-size", "16", "--epochs", "3", "--progress", "false",
                          "--dist-timeout", "4", "--out", str(tmp_path / "o"), "--name", "t"], env=e,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stopped = next((line for line in p.stderr if line.startswith("salunet: stopped:")), "")
        # rank 0 leaves right after its message (and its lock with it) while the frozen rank 1 and torchrun are
        # still alive: checked before the test ends the job, so the group kill below cannot be what ended rank 0
        deadline, states = time.monotonic() + 20, []
        while time.monotonic() < deadline:
            states = sorted(state for _, state in _children(p.pid))
            if states == ["T"]:
                break
            time.sleep(0.2)
        assert p.poll() is None, "torchrun should still be waiting on the frozen rank"
    finally:  # the ranks run in sessions of their own: the frozen one would outlive a kill of torchrun's group
        for pid, _ in _children(p.pid):
            os.kill(pid, signal.SIGKILL)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    assert stopped.startswith("salunet: stopped: rank 0 waited longer than dist_timeout for the other ranks during "
                              "epoch 1 (one is stopped or hung; --dist-timeout sets the wait)"), stopped
    assert states == ["T"], f"torchrun's ranks 20 s after rank 0 stopped: states {states} (want only the frozen one)"
    assert time.perf_counter() - t < 120


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of ``pid``'s children, read from /proc (state R, S, T for stopped, Z, ...)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append((int(stat.parent.name), fields[0]))
    return out


def test_experiment_list_option_that_is_not_numbers_is_one_line_with_the_fix(capsys, tmp_path):
    npz = make_npz(tmp_path / "d.npz", shape=(32, 32, 3))
    line = _one_line(capsys, main(["experiment", "batch-sweep", "--batch-sizes", "1,abc", "--data-path", str(npz),
                                   "--out", str(tmp_path / "o")]))
    assert "batch_sizes '1,abc': not a comma-separated list of whole numbers; write e.g. 1,8,128" in line
