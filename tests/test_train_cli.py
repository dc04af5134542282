"""`salunet train` / `salunet eval` command lines: boolean flags, type checks, unknown keys (exit code 2,
one line, no traceback), `--download` against a 127.0.0.1 server, image folders end to end with
`salunet eval --eval-size`."""
import dataclasses
import hashlib
import json
import shutil

import pytest

import salunet.train
from salunet.cli import main
from salunet.data import CIFAR
from salunet.train.checkpoint import list_checkpoints

from helpers import make_cifar10_archive, make_image_folder

BOOLS = ("download", "compile", "channels_last", "flip", "progress")


@pytest.fixture
def parsed(monkeypatch):
    """Parse a `salunet train` command line into the TrainConfig it would train (nothing is trained)."""
    seen = {}

    def fake_train(cfg=None, **kw):
        seen["cfg"], seen["kw"] = cfg, kw
        return {}

    monkeypatch.setattr(salunet.train, "train", fake_train)

    def parse(*argv):
        assert main(["train", *argv]) == 0
        return seen["cfg"]
    return parse


def _one_line_error(capsys, code, expected_code=2) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code and len(lines) == 1, err
    assert "Traceback" not in err and "usage:" not in err
    return lines[0]


def _exit_code(argv) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def test_bare_boolean_flags(parsed):
    cfg = parsed("--download", "--compile", "--channels-last", "--flip", "--progress")
    assert all(getattr(cfg, k) is True for k in BOOLS)
    cfg = parsed()
    assert (cfg.download, cfg.compile, cfg.channels_last, cfg.flip) == (False, False, False, False)
    # a bare flag followed by another option, and explicit values in both spellings
    cfg = parsed("--flip", "--epochs", "2", "--progress", "false", "--download=true", "--compile", "no",
                 "--channels-last", "0")
    assert (cfg.flip, cfg.epochs, cfg.progress, cfg.download, cfg.compile, cfg.channels_last) == \
        (True, 2, False, True, False, False)


def test_recipe_and_overrides(parsed):
    cfg = parsed("--recipe", "cifar-resnet", "--flip", "false", "--width", "8")
    assert cfg.recipe == "cifar-resnet" and cfg.flip is False and cfg.width == 8 and cfg.epochs == 300


@pytest.mark.parametrize("argv,message", [
    (["--flip", "maybe"], "salunet: error: flip: 'maybe' is not a boolean (use true/false)"),
    (["--download", "2"], "salunet: error: download: '2' is not a boolean"),
    (["--epochs", "ten"], "salunet: error: epochs: 'ten' is not an integer"),
    (["--width", "1.5"], "salunet: error: width: '1.5' is not an integer"),
    (["--lr", "fast"], "salunet: error: lr: 'fast' is not a number"),
    (["--lr", "-1"], "salunet: error: lr must be a finite positive number, got -1.0"),
    (["--model-overrides", "{bad"], "salunet: error: model_overrides: '{bad' is not a JSON object"),
    (["--optimizer", "lion"], "salunet: error: optimizer: 'lion' is not one of sgd, adamw, adam"),
    (["--resume", "somewhere", "--recipe", "cpu-quick"], "salunet: error: --resume continues a run with its saved"),
])
def test_train_bad_values(capsys, argv, message):
    assert _one_line_error(capsys, main(["train", *argv])).startswith(message)


@pytest.mark.parametrize("argv,message", [
    (["--lrr", "0.1"], "salunet train: error: unrecognized arguments: --lrr 0.1 (did you mean --lr instead of --lrr?)"),
    (["--batchsize", "8"], "salunet train: error: unrecognized arguments: --batchsize 8 (did you mean --batch-size"),
    (["stray"], "salunet train: error: unrecognized arguments: stray (see salunet train --help)"),
    (["--recipe", "fast"], "salunet train: error: argument --recipe: invalid choice: 'fast'"),
])
def test_train_unknown_keys(capsys, argv, message):
    assert _one_line_error(capsys, _exit_code(["train", *argv])).startswith(message)


@pytest.mark.parametrize("argv,message", [
    ([], "salunet eval: error: the following arguments are required: checkpoint"),
    (["x.safetensors", "--batch-size", "0"], "salunet eval: error: argument --batch-size: must be a positive"),
    (["x.safetensors", "--eval-size", "big"], "salunet eval: error: argument --eval-size: 'big' is not an integer"),
    (["x.safetensors", "--evalsize", "288"], "salunet eval: error: unrecognized arguments: --evalsize 288 (did "
                                             "you mean --eval-size instead of --evalsize?)"),
])
def test_eval_parse_errors(capsys, argv, message):
    assert _one_line_error(capsys, _exit_code(["eval", *argv])).startswith(message)


def test_eval_input_errors(capsys, tmp_path):
    code = main(["eval", str(tmp_path / "none.safetensors")])
    assert _one_line_error(capsys, code) == (f"salunet: error: {tmp_path / 'none.safetensors'}: checkpoint not "
                                             "found; pass an existing file (RUN_DIR/checkpoints/epoch_NNNN.safetensors)")
    main(["train", "--width", "4", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
          "--epochs", "1", "--progress", "false", "--out", str(tmp_path), "--name", "d"])
    capsys.readouterr()
    ckpt = list_checkpoints(tmp_path / "d")[-1]
    code = main(["eval", str(ckpt), "--eval-size", "288"])
    assert _one_line_error(capsys, code) == ("salunet: error: --eval-size applies to image folders only; digits "
                                             "images are evaluated at their stored size; drop --eval-size")
    assert not (tmp_path / "d" / "eval").exists()


def test_bare_download_flag_trains_from_local_server(tmp_path, local_server, monkeypatch, capsys):  # noqa: F811
    srv_root, base = local_server
    spec = CIFAR["cifar10"]
    arch = make_cifar10_archive(srv_root / spec.archive)
    monkeypatch.setitem(CIFAR, "cifar10", dataclasses.replace(spec, url=f"{base}/{spec.archive}",
                                                              md5=hashlib.md5(arch.read_bytes()).hexdigest()))
    data = tmp_path / "data"
    assert main(["train", "--data", "cifar10", "--data-path", str(data), "--download", "--width", "4",
                 "--batch-size", "12", "--epochs", "1", "--progress", "false", "--out", str(tmp_path),
                 "--name", "dl"]) == 0
    assert (data / "cifar-10-batches-py" / "data_batch_5").is_file() and (data / spec.archive).is_file()
    assert json.loads((tmp_path / "dl" / "config.json").read_text())["download"] is True
    assert "final test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("workers", [0, 1])
def test_image_folder_train_and_eval(tmp_path, capsys, workers):
    """ImageNet-style folders end to end (Pillow decoding in `workers` DataLoader processes), then
    `salunet eval` at the training size and at another size."""
    root = make_image_folder(tmp_path / "imgs", classes=("ant", "bee", "cat"), per_class=3, size=(20, 26))
    assert main(["train", "--data", "imagefolder", "--data-path", str(root), "--image-size", "16", "--eval-size",
                 "16", "--width", "4", "--batch-size", "4", "--epochs", "2", "--workers", str(workers),
                 "--flip", "--ema-decay", "0.9", "--progress", "false", "--out", str(tmp_path), "--name", "f"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # 9 images // batch 4 = 2 steps per epoch
    ckpt = list_checkpoints(tmp_path / "f")[-1]
    capsys.readouterr()
    assert main(["eval", str(ckpt)]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["eval_size"] == 16 and same["raw"]["n"] == 9 and same["ema"]["n"] == 9
    assert same["raw"]["loss"] == pytest.approx(rows[-1]["test_loss"], rel=1e-5)  # what training measured
    assert same["ema"]["top1"] == pytest.approx(rows[-1]["ema_test_acc"])
    assert main(["eval", str(ckpt), "--eval-size", "24"]) == 0
    big = json.loads(capsys.readouterr().out)
    assert big["eval_size"] == 24 and big["raw"]["n"] == 9 and big["raw"]["loss"] != same["raw"]["loss"]
    assert big["written"].endswith("epoch_0002-imagefolder-24.json") and same["written"].endswith("-16.json")
    assert json.loads(open(big["written"]).read())["eval_size"] == 24


def test_image_folder_subsets_and_eval_from_a_val_only_copy(tmp_path, capsys):
    """--train-subset / --test-subset take the same number of images from every class of a folder; the
    checkpoint records the label order, so `salunet eval` needs only a val/ folder."""
    root = make_image_folder(tmp_path / "imgs", classes=("ant", "bee", "cat"), per_class=4, size=(20, 26))
    assert main(["train", "--data", "imagefolder", "--data-path", str(root), "--image-size", "16", "--eval-size",
                 "16", "--width", "4", "--batch-size", "2", "--epochs", "1", "--train-subset", "6",
                 "--test-subset", "3", "--progress", "false", "--out", str(tmp_path), "--name", "s"]) == 0
    row = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 3  # 6 of the 12 training images, batch 2
    ckpt = list_checkpoints(tmp_path / "s")[-1]
    capsys.readouterr()
    assert main(["eval", str(ckpt)]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["raw"]["n"] == 12  # eval uses the whole val/ unless told otherwise
    copy = tmp_path / "elsewhere"
    shutil.copytree(root / "val", copy / "val")  # no train/ folder on the evaluating machine
    assert main(["eval", str(ckpt), "--data-path", str(copy)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["raw"]["n"] == 12 and again["raw"]["loss"] == pytest.approx(full["raw"]["loss"], rel=1e-6)


def test_class_spread_subset_takes_every_class_alike():
    from salunet.train.sources import class_spread_subset as _class_spread_subset

    class Folder:  # what the function reads of an ImageFolder: samples listed class by class
        samples = [(f"{c}/{i}.png", c) for c in range(3) for i in range(4)]

        def __len__(self):
            return len(self.samples)

    sub = _class_spread_subset(Folder(), 7)
    labels = [sub.dataset.samples[i][1] for i in sub.indices]
    assert sorted(labels) == [0, 0, 0, 1, 1, 2, 2] and list(sub.indices) == sorted(sub.indices)
