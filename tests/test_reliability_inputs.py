"""Bad input refused (issue 6): every case of the matrix below, run through ``salunet train`` / ``salunet eval``,
exits with code 2 and exactly one line on stderr that names the problem and the fix, shows no traceback, and
writes nothing (the whole test directory, the inputs included, is byte- and mtime-identical afterwards).

Each case is ``id: (argv builder, problem fragment, fix fragment)``; the builder makes its bad input under the
test's own directory. Cases run in-process through ``salunet.cli.main`` (fast); two subprocess checks at the
end prove the same of the real ``python -m salunet`` entry point, and that ``--debug`` shows the traceback.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import save_file

import builtins

import salunet
from salunet.cli import main
from salunet.data import load_arrays
from salunet.train import train
from salunet.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

from helpers import make_cifar10_archive, make_image_folder, make_npz


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Shared good inputs: a small digits .npz and two finished 1-epoch runs of different models."""
    root = tmp_path_factory.mktemp("good")
    d = load_arrays("digits")
    npz = root / "digits.npz"
    np.savez(npz, x_train=d.x_train[:64], y_train=d.y_train[:64], x_test=d.x_test[:32], y_test=d.y_test[:32])
    common = dict(width=4, data="npz", data_path=str(npz), batch_size=32, epochs=2, progress=False,
                  out=str(root / "runs"))
    train(common, model="cnn4", name="cnn4")
    train(common, model="salunet_c18", name="c18")
    return {"npz": npz, "cnn4": root / "runs" / "cnn4", "c18": root / "runs" / "c18"}


def T(tmp, *argv):
    """A `salunet train` command line on the tiny data, writing under tmp/runs."""
    return ["train", "--model", "cnn4", "--width", "4", "--batch-size", "16", "--train-subset", "32",
            "--test-subset", "16", "--epochs", "1", "--progress", "false", "--out", str(tmp / "runs"),
            "--name", "r", *argv]


def npz_with(tmp, **arrays):
    return make_npz(tmp / "bad.npz", shape=(8, 8, 1), **arrays)


def cfg_file(tmp, obj, raw=None):
    p = tmp / "cfg.json"
    p.write_text(raw if raw is not None else json.dumps(obj))
    return str(p)


def copy_run(tmp, fx, which="cnn4"):
    return shutil.copytree(fx[which], tmp / which)


def foreign_checkpoint(tmp, fx):
    """cnn4's run directory with a checkpoint of the salunet_c18 run dropped in as the newest epoch."""
    run = copy_run(tmp, fx)
    shutil.copy(list_checkpoints(fx["c18"])[-1], run / "checkpoints" / "epoch_0003.safetensors")
    return run


def mislabelled_checkpoint(tmp, fx):
    """A checkpoint whose config says salunet_c18 but whose weights are cnn4's (altered, or another version)."""
    state, meta = load_checkpoint(list_checkpoints(fx["cnn4"])[-1])
    meta["config"]["model"] = "salunet_c18"
    p = tmp / "ckpt" / "checkpoints" / "epoch_0002.safetensors"
    save_checkpoint(p, state, meta)
    return p


def foreign_safetensors(tmp):
    p = tmp / "model.safetensors"
    import torch

    save_file({"weight": torch.zeros(2, 2)}, str(p))
    return str(p)


def image_folder(tmp, broken=None, empty=False, stray=None):
    root = make_image_folder(tmp / "imgs", classes=("ant", "bee"), per_class=2, size=(12, 12))
    if broken:
        (root / "train" / "ant" / "0.png").write_bytes(b"not a png at all")
    if empty:
        for p in (root / "train").rglob("*.png"):
            p.unlink()
    if stray:
        (root / "train" / "bee" / stray).write_text("notes")
    return str(root)


def F(tmp, *argv):  # an image-folder training command
    return ["train", "--model", "cnn4", "--width", "4", "--data", "imagefolder", "--image-size", "8",
            "--eval-size", "8", "--batch-size", "2", "--epochs", "1", "--progress", "false", "--out",
            str(tmp / "runs"), "--name", "r", *argv]


NAN = np.full((64, 8, 8, 1), 0.5, np.float32)
NAN[3, 2, 2, 0] = np.nan
INF = np.zeros((64, 8, 8, 1), np.float64)
INF[0, 0, 0, 0] = np.inf

CASES = {
    # ---- names ------------------------------------------------------------------------------------------
    "unknown model": (lambda t, f: T(t, "--model", "resnet9"), "unknown model 'resnet9'", "choose one of cnn4"),
    "unknown recipe": (lambda t, f: T(t, "--recipe", "fast"), "invalid choice: 'fast'", "choose from"),
    "unknown data set": (lambda t, f: T(t, "--data", "mnist"), "data: 'mnist' is not one of", "digits, cifar10"),
    "unknown optimizer": (lambda t, f: T(t, "--optimizer", "lion"), "'lion' is not one of", "sgd, adamw, adam"),
    "unknown norm layer": (lambda t, f: T(t, "--norm-layer", "foo"), "unknown norm_layer 'foo'", "choose one of"),
    "unknown model override": (lambda t, f: T(t, "--model-overrides", '{"depht": 1}'), "unknown override(s) depht",
                               "valid:"),
    "unknown option": (lambda t, f: T(t, "--lrr", "0.1"), "unrecognized arguments: --lrr", "did you mean --lr"),
    "unknown device": (lambda t, f: T(t, "--device", "tpu"), "unknown device 'tpu'", "use auto, cpu"),
    "eval: unknown data set": (lambda t, f: ["eval", str(list_checkpoints(copy_run(t, f))[-1]), "--data", "mnist"],
                               "data: 'mnist' is not one of", "digits, cifar10"),
    # ---- negative or zero sizes -------------------------------------------------------------------------
    "batch size 0": (lambda t, f: T(t, "--batch-size", "0"), "batch_size must be positive, got 0", "positive"),
    "batch size -8": (lambda t, f: T(t, "--batch-size", "-8"), "batch_size must be positive, got -8", "positive"),
    "epochs 0": (lambda t, f: T(t, "--epochs", "0"), "epochs must be positive, got 0", "positive"),
    "epochs -1": (lambda t, f: T(t, "--epochs", "-1"), "epochs must be positive, got -1", "positive"),
    "width 0": (lambda t, f: T(t, "--width", "0"), "width must be positive, got 0", "positive"),
    "lr 0": (lambda t, f: T(t, "--lr", "0"), "lr must be a finite positive number, got 0.0", "positive"),
    "lr nan": (lambda t, f: T(t, "--lr", "nan"), "lr must be a finite positive number, got nan", "finite"),
    "lr inf": (lambda t, f: T(t, "--lr", "inf"), "lr must be a finite positive number, got inf", "finite"),
    "eval batch size 0": (lambda t, f: T(t, "--eval-batch-size", "0"), "eval_batch_size must be positive", "positive"),
    "accum steps 0": (lambda t, f: T(t, "--accum-steps", "0"), "accum_steps must be positive", "positive"),
    "image size 0": (lambda t, f: T(t, "--image-size", "0"), "image_size must be positive", "positive"),
    "keep checkpoints 0": (lambda t, f: T(t, "--keep-checkpoints", "0"), "keep_checkpoints must be positive",
                           "positive"),
    "train subset -1": (lambda t, f: T(t, "--train-subset", "-1"), "train_subset must be a finite number >= 0",
                        ">= 0"),
    "weight decay -1": (lambda t, f: T(t, "--weight-decay", "-1"), "weight_decay must be a finite number >= 0",
                        ">= 0"),
    "ema decay 1": (lambda t, f: T(t, "--ema-decay", "1"), "ema_decay must be in [0, 1)", "0 = off"),
    "layers 0": (lambda t, f: T(t, "--model", "salunet_c18", "--model-overrides", '{"layers": [0, 0, 0, 0]}'),
                 "layers must be a non-empty tuple of positive integers", "e.g. (2, 2, 2, 2)"),
    "batch larger than the data": (lambda t, f: T(t, "--batch-size", "64"), "larger than the training set",
                                   "lower --batch-size"),
    "batch not divisible by accum": (lambda t, f: T(t, "--batch-size", "15", "--accum-steps", "2"),
                                     "must be divisible by ranks x accum_steps", "(1 x 2)"),
    "eval batch size 0 (eval)": (lambda t, f: ["eval", "x.safetensors", "--batch-size", "0"],
                                 "argument --batch-size: must be a positive integer, got 0", "positive"),
    # ---- missing, wrong-kind and unreadable paths ---------------------------------------------------------
    "npz missing": (lambda t, f: T(t, "--data", "npz", "--data-path", str(t / "none.npz")),
                    "none.npz: no such file", "pass an .npz with x_train"),
    "npz is a directory": (lambda t, f: T(t, "--data", "npz", "--data-path", str(t)), "is a directory",
                           "needs an .npz file"),
    "npz not given": (lambda t, f: T(t, "--data", "npz"), "data 'npz' needs --data-path", "--data-path"),
    "cifar path missing": (lambda t, f: T(t, "--data", "cifar10", "--data-path", str(t / "nope")),
                           "nope: no such file or directory", "or add --download"),
    "folder missing": (lambda t, f: F(t, "--data-path", str(t / "nope")), "nope/train: no such directory",
                       "<class>/<image>"),
    "config missing": (lambda t, f: T(t, "--config", str(t / "none.json")), "none.json: config file not found",
                       "needs a JSON file"),
    "config is a directory": (lambda t, f: T(t, "--config", str(t)), "is a directory", "needs a JSON file"),
    "resume dir missing": (lambda t, f: ["train", "--resume", str(t / "gone")], "gone: no such run directory",
                           "pass the directory of an earlier"),
    "resume dir not a run": (lambda t, f: ["train", "--resume", str(t)], "not a salunet run directory",
                             "pass the directory of an earlier"),
    "checkpoint missing": (lambda t, f: ["eval", str(t / "none.safetensors")], "checkpoint not found", "pass an existing file"),
    "checkpoint is a directory": (lambda t, f: ["eval", str(t)], "is a directory", "pass a checkpoint file"),
    "out is a file": (lambda t, f: T(t, "--out", str(f["npz"])), "is a file, so the run directory",
                      "choose another --out"),
    "data path for the embedded set": (lambda t, f: T(t, "--data", "digits", "--data-path", str(f["npz"])),
                                       "data 'digits' is embedded and reads no file", "pass --data npz"),
    "run name taken": (lambda t, f: T(t, "--out", str(t), "--name", copy_run(t, f).name),
                       "run directory already exists", "continue it with --resume"),
    # ---- wrong archive ----------------------------------------------------------------------------------
    "archive is not a tar": (lambda t, f: T(t, "--data", "cifar10", "--data-path", str(shutil.copy(
        f["npz"], t / "cifar-10-python.tar.gz"))), "not a readable cifar10 archive", "pass the official"),
    "archive of another data set": (lambda t, f: T(t, "--data", "cifar100", "--data-path", str(
        make_cifar10_archive(t / "c10.tar.gz"))), "archive has no cifar-100-python/train",
        "is it the official cifar100"),
    "npz is not a zip": (lambda t, f: T(t, "--data", "npz", "--data-path", str(
        (t / "x.npz").write_text("hello") and t / "x.npz")), "x.npz: not a readable .npz archive (not a zip file)",
        "saved by np.savez"),
    # ---- wrong array shapes, dtypes, labels, NaN/inf pixels ---------------------------------------------
    "images without channel axis": (lambda t, f: T(t, "--data", "npz", "--data-path", str(npz_with(
        t, x_train=np.zeros((64, 8, 8), np.uint8)))), "x_train has shape (64, 8, 8)", "expected (N, H, W, C)"),
    "images with 4 channels": (lambda t, f: T(t, "--data", "npz", "--data-path", str(npz_with(
        t, x_train=np.zeros((64, 8, 8, 4), np.uint8)))), "x_train has shape (64, 8, 8, 4)", "C = 1 or 3"),
    "train and test sizes differ": (lambda t, f: T(t, "--data", "npz", "--data-path", str(npz_with(
        t, x_test=np.zeros((32, 9, 9, 1), np.uint8)))), "train images (8, 8, 1) and test images (9, 9, 1) differ",
        "save both splits at one size"),
    "labels of the wrong length": (lambda t, f: T(t, "--data", "npz", "--data-path", str(npz_with(
        t, y_test=np.zeros(5, np.int64)))), "y_test has shape (5,)", "expected (32,) labels"),
    "float labels": (lambda t, f: T(t, "--data", "npz", "--data-path", str(npz_with(
        t, y_train=np.zeros(64, np.float32)))), "y_train has dtype float32", "expected integer labels"),
    "int images": (lambda t, f: T(t, "--data", "npz", "--data-path", str(npz_with(
        t, x_train=np.zeros((64, 8, 8, 1), np.int32)))), "x_train has dtype int32", "save them as uint8"),
    "no test images": (lambda t, f: T(t, "--data", "npz", "--data-path", str(npz_with(
        t, x_test=np.zeros((0, 8, 8, 1), np.uint8), y_test=np.zeros(0, np.int64)))), "x_test is empty",
        "at least one image"),
    "array missing": (lambda t, f: T(t, "--data", "npz", "--data-path", str(npz_with(t, y_test=None))),
                      "missing array(s) y_test", "needs x_train, y_train, x_test, y_test"),
    "labels out of range": (lambda t, f: T(t, "--data", "cifar10", "--data-path", str(npz_with(
        t, y_train=np.full(64, 12)))), "y_train has labels in [12, 12]", "expected 0..9"),
    "negative labels": (lambda t, f: T(t, "--data", "npz", "--data-path", str(npz_with(
        t, y_train=np.full(64, -1)))), "y_train has negative labels (min -1)", "labels must be class indices"),
    "labels of another data set": (lambda t, f: T(t, "--data", "cifar100", "--data-path", str(npz_with(t))),
                                   "labels span 0..9 (10 classes), but cifar100 has 100", "use --data cifar10"),
    "NaN pixels": (lambda t, f: T(t, "--data", "npz", "--data-path", str(npz_with(t, x_train=NAN))),
                   "x_train has 1 NaN/inf pixel value(s) (dtype float32)", "fix or drop those images"),
    "inf pixels": (lambda t, f: T(t, "--data", "npz", "--data-path", str(npz_with(t, x_test=INF[:32]))),
                   "x_test has 1 NaN/inf pixel value(s) (dtype float64)", "save them as uint8"),
    "float pixels": (lambda t, f: T(t, "--data", "npz", "--data-path", str(npz_with(
        t, x_train=np.full((64, 8, 8, 1), 0.5, np.float32)))), "x_train has dtype float32, expected uint8",
        "np.clip(x * 255, 0, 255).astype(np.uint8)"),
    # ---- image folders ----------------------------------------------------------------------------------
    "folder without images": (lambda t, f: F(t, "--data-path", image_folder(t, empty=True)),
                              "train: no images found under its class folders", "put image files"),
    "folder without classes": (lambda t, f: F(t, "--data-path", str((t / "flat" / "train").mkdir(parents=True)
                                                                    or t / "flat")),
                               "train: no class folders", "put the images in"),
    "non-image file in folder": (lambda t, f: F(t, "--data-path", image_folder(t, stray="notes.txt")),
                                 "notes.txt: not an image file (extension .txt)", "remove it or convert it"),
    "undecodable image (in process)": (lambda t, f: F(t, "--data-path", image_folder(t, broken=True),
                                                      "--workers", "0"),
                                       "0.png: cannot decode image", "replace or remove the file"),
    "undecodable image (in a DataLoader worker)": (lambda t, f: F(t, "--data-path", image_folder(t, broken=True),
                                                                  "--workers", "1"),
                                                   "0.png: cannot decode image", "replace or remove the file"),
    # ---- config files -----------------------------------------------------------------------------------
    "config: unknown key": (lambda t, f: T(t, "--config", cfg_file(t, {"lrr": 0.1})),
                            "cfg.json: unknown config key 'lrr'", "did you mean 'lr'?"),
    "config: string for int": (lambda t, f: T(t, "--config", cfg_file(t, {"epochs": "ten"})),
                               "cfg.json: epochs: 'ten' is not an integer", "write a whole number"),
    "config: float for int": (lambda t, f: T(t, "--config", cfg_file(t, {"epochs": 2.5})),
                              "cfg.json: epochs: 2.5 has type float", "expected int"),
    "config: list for bool": (lambda t, f: T(t, "--config", cfg_file(t, {"flip": [1]})),
                              "cfg.json: flip: [1] has type list", "expected bool"),
    "config: not JSON": (lambda t, f: T(t, "--config", cfg_file(t, None, raw="{epochs: 2")),
                         "cfg.json: not valid JSON", "fix the file"),
    "config: not an object": (lambda t, f: T(t, "--config", cfg_file(t, [1, 2])),
                              "must hold a JSON object of config keys", "not a list"),
    "config: model override of a trainer argument": (
        lambda t, f: T(t, "--model-overrides", '{"width": 8}'), "model_overrides may not set width", "use --width"),
    "config: a value beyond float32": (lambda t, f: T(t, "--lr", "1e308"), "lr 1e+308 does not fit in float32",
                                       "pass a realistic value"),
    # ---- checkpoints from elsewhere ------------------------------------------------------------------------
    "resume: checkpoint of another model": (lambda t, f: ["train", "--resume", str(foreign_checkpoint(t, f))],
                                            "epoch_0003.safetensors: written by another run (model 'salunet_c18'",
                                            "move it out of"),
    "resume: checkpoint whose weights are another model's": (
        lambda t, f: ["train", "--resume", str(mislabelled_checkpoint(t, f).parent.parent)],
        "its weights do not fit model salunet_c18", "move it out of"),
    "resume: fewer epochs than done": (lambda t, f: ["train", "--resume", str(copy_run(t, f)), "--epochs", "1"],
                                       "has already trained 2 epochs", "pass --epochs 2 or more"),
    "resume: changed config": (lambda t, f: ["train", "--resume", str(copy_run(t, f)), "--lr", "0.5"],
                               "only epochs, progress", "not lr"),
    "eval: weights of another model": (lambda t, f: ["eval", str(mislabelled_checkpoint(t, f))],
                                       "its weights do not fit model salunet_c18", "written for another model"),
    "eval: not a salunet checkpoint": (lambda t, f: ["eval", foreign_safetensors(t)],
                                       "not a salunet checkpoint (format None)", "written by salunet train"),
    "eval: data set with other classes": (lambda t, f: ["eval", str(list_checkpoints(copy_run(t, f))[-1]),
                                                        "--data", "npz", "--data-path",
                                                        str(npz_with(t, y_train=np.arange(64) + 36))],
                                          "the model has 10 classes / 1 channels, data npz has 100 / 1",
                                          "pick matching --data"),
    "eval: eval size on arrays": (lambda t, f: ["eval", str(list_checkpoints(copy_run(t, f))[-1]), "--eval-size",
                                                "32"], "--eval-size applies to image folders only", "drop --eval-size"),
}


def snapshot(*roots):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for r in roots for p in sorted(r.rglob("*"))}


def run_cli(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors (unknown options, invalid choices)
        return exc.code


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, fx, capsys):
    build, problem, fix = CASES[case]
    assert problem and fix, "every case names the problem and the fix"
    argv = build(tmp_path, fx)
    before = snapshot(tmp_path, fx["cnn4"].parent.parent)
    code = run_cli(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err + out
    assert problem in lines[0] and fix in lines[0], lines[0]
    assert snapshot(tmp_path, fx["cnn4"].parent.parent) == before  # nothing written, nothing changed
    assert not (tmp_path / "runs").exists()


def test_unreadable_file(tmp_path, fx, capsys, monkeypatch):
    """A file the user may not read. Root reads everything, so there the refusal is simulated at open()."""
    p = tmp_path / "locked.npz"
    shutil.copy(fx["npz"], p)
    p.chmod(0)
    if os.geteuid() == 0:
        real_open = builtins.open

        def guarded(file, *a, **k):
            if os.fspath(file) == str(p):
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(file, *a, **k)

        monkeypatch.setattr(builtins, "open", guarded)
    before = snapshot(tmp_path)
    code = main(T(tmp_path, "--data", "npz", "--data-path", str(p)))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"salunet: error: {p}: "), lines
    assert "permission denied" in lines[0] and "make it readable" in lines[0]
    assert snapshot(tmp_path) == before


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "SALUNET_KERNELS": "eager"}


def test_real_entry_point_one_line_and_debug_traceback(tmp_path):
    argv = [sys.executable, "-m", "salunet", "train", "--model", "resnet9", "--out", str(tmp_path / "runs")]
    r = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("salunet: error: unknown model 'resnet9'; choose one of")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
    r = subprocess.run([*argv[:3], "--debug", *argv[3:]], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("ValueError: unknown model 'resnet9'; choose one of "
                                                 + ", ".join(salunet.list_models()))
    # --debug is also taken after the subcommand
    r2 = subprocess.run([*argv, "--debug"], env=_env(), capture_output=True, text=True, timeout=120)
    assert r2.returncode == 1 and r2.stderr.strip().splitlines()[-1] == r.stderr.strip().splitlines()[-1]
