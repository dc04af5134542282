"""Weights that load anywhere: load_model from a run directory / checkpoint / exported weights file, and
export-weights files that plain create_model(...).load_state_dict(...) accepts; the CLI commands."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import salunet
from salunet.cli import main
from salunet.train import train
from salunet.train.checkpoint import CheckpointError, list_checkpoints
from salunet.train.evaluate import model_from_checkpoint

TINY = dict(data="digits", train_subset=64, test_subset=32, batch_size=32, eval_batch_size=32, lr=0.05,
            crop_padding=1, flip=False, ema_decay=0.5, progress=False, epochs=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished one-epoch runs with an EMA: a ResNet and a ViT (whose create_model needs img_size)."""
    root = tmp_path_factory.mktemp("runs")
    train({**TINY, "model": "salunet_c18_v2", "width": 4, "out": str(root), "name": "resnet"})
    train({**TINY, "model": "salunet_t", "width": 12, "model_overrides": {"depth": 1}, "optimizer": "adamw",
           "lr": 1e-3, "out": str(root), "name": "vit"})
    return root


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_export_weights_load_with_plain_create_model(runs, name, tmp_path):
    ck = list_checkpoints(runs / name)[-1]
    ema, meta, _ = model_from_checkpoint(ck, ema=True)
    raw, _, _ = model_from_checkpoint(ck)
    assert not _same(ema, raw)
    out, side = salunet.export_weights(runs / name, tmp_path / "w.safetensors", ema=True)
    assert side == tmp_path / "w.json"
    cfg = json.loads(side.read_text())
    assert cfg["weights"] == "ema" and cfg["input"]["image_size"] == meta["image_size"]
    # no salunet checkpoint code: create_model and the plain safetensors reader
    plain = salunet.create_model(**cfg["create_model"])
    plain.load_state_dict(load_file(out))
    assert _same(plain, ema)
    x = torch.randn(3, meta["in_chans"], meta["image_size"], meta["image_size"])
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), ema.eval()(x))
    loaded = salunet.load_model(out)  # the config travels inside the file too
    assert _same(loaded, ema) and not loaded.training


def test_load_model_sources_and_ema(runs, tmp_path):
    ck = list_checkpoints(runs / "resnet")[-1]
    raw, _, state = model_from_checkpoint(ck)
    ema, _, _ = model_from_checkpoint(ck, ema=True)
    assert _same(salunet.load_model(runs / "resnet"), raw)  # a run directory: its newest checkpoint
    assert _same(salunet.load_model(ck), raw) and _same(salunet.load_model(ck, ema=False), raw)
    assert _same(salunet.load_model(str(ck), ema=True), ema)
    out, _ = salunet.export_weights(ck, tmp_path / "raw.safetensors")
    assert _same(salunet.load_model(out), raw) and _same(salunet.load_model(out, ema=False), raw)
    with pytest.raises(ValueError, match="raw.safetensors: holds the raw weights only, not the ema ones"):
        salunet.load_model(out, ema=True)


def test_load_model_refusals(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: not found; pass a run directory"):
        salunet.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no checkpoint that loads"):
        salunet.load_model(tmp_path / "empty")
    out, _ = salunet.export_weights(runs / "resnet", tmp_path / "w.safetensors")
    data = bytearray(out.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in a weight
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="bad.safetensors: checksum mismatch"):
        salunet.load_model(bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.safetensors: not a salunet checkpoint"):
        salunet.load_model(foreign)
    with pytest.raises(ValueError, match=r"w.pt: name the weights file \*.safetensors"):
        salunet.export_weights(runs / "resnet", tmp_path / "w.pt")
    with pytest.raises(ValueError, match="is already an exported weights file"):
        salunet.export_weights(out, tmp_path / "again.safetensors")


def test_cli_export_weights_and_export(runs, tmp_path, capsys):
    w = tmp_path / "m.safetensors"
    assert main(["export-weights", str(runs / "resnet"), "--out", str(w), "--ema"]) == 0
    assert "load_state_dict" in capsys.readouterr().out and w.is_file() and w.with_suffix(".json").is_file()
    onnx_out = tmp_path / "m.onnx"
    assert main(["export", str(w), "--out", str(onnx_out), "--exporter", "torchscript"]) == 0
    printed = capsys.readouterr().out
    assert onnx_out.is_file() and "ema weights" in printed
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is not None:
        assert "onnxruntime == eager within" in printed
    else:
        assert "NOT checked: onnxruntime is not installed" in printed


def test_cli_export_errors_are_one_line(runs, tmp_path, capsys):
    assert main(["export-weights", str(tmp_path / "nope"), "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("salunet: error: ") and "nope: not found" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own check, in one line
        main(["export", str(runs / "resnet"), "--out", str(tmp_path / "m.onnx"), "--exporter", "tflite"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in err and "\n" not in err
    ck = list_checkpoints(runs / "resnet")[-1]
    assert main(["export", str(ck), "--out", str(tmp_path / "m.pt"), "--exporter", "torchscript"]) == 2
    assert "name the ONNX file *.onnx" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
