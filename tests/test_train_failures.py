"""Training failures: non-finite loss / gradients / weights stop the run before anything bad is saved;
BatchNorm at batch size 1 gets an actionable message; a new run that fails early leaves nothing behind;
corrupt checkpoints are named."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from salunet.cli import main
from salunet.train import TrainingDiverged, train
from salunet.train import loop
from salunet.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint

TINY = dict(model="salunet_c18", width=4, data="digits", train_subset=128, test_subset=64, batch_size=32,
            eval_batch_size=64, lr=0.05, ema_decay=0.9, progress=False)  # 4 steps per epoch


def _finite(path) -> bool:
    return all(torch.isfinite(t).all() for k, t in load_file(str(path)).items() if t.is_floating_point())


def test_nonfinite_loss_stops_and_keeps_last_good(tmp_path, monkeypatch):
    real, calls = loop.mixed_cross_entropy, [0]

    def poisoned(*a):
        calls[0] += 1
        loss = real(*a)
        return loss * math.inf if calls[0] == 6 else loss  # epoch 2, step 2

    monkeypatch.setattr(loop, "mixed_cross_entropy", poisoned)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(inf\) at epoch 2, step 2; stopped before the "
                                               r"optimizer step\. Last good checkpoint: .*epoch_0001"):
        train(TINY, epochs=3, out=str(tmp_path), name="r")
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["epoch_0001.safetensors"]
    monkeypatch.setattr(loop, "mixed_cross_entropy", real)
    s = train(resume=str(tmp_path / "r"))  # the kept run continues
    assert s["epochs"] == 3


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_inf_gradients_with_finite_loss_never_reach_the_weights(tmp_path, monkeypatch, grad_clip):
    """A finite loss whose gradients overflow used to step into NaN weights and save them."""
    real_build, calls = loop.build_model, [0]

    def build(*a, **k):
        model = real_build(*a, **k)

        def hook(g):
            calls[0] += 1
            return g * math.inf if calls[0] == 6 else g  # epoch 2, step 2

        next(model.parameters()).register_hook(hook)
        return model

    monkeypatch.setattr(loop, "build_model", build)
    with pytest.raises(TrainingDiverged, match="non-finite gradients .* with a finite loss at epoch 2, step 2"):
        train(TINY, epochs=3, grad_clip=grad_clip, out=str(tmp_path), name="g")
    ckpts = list_checkpoints(tmp_path / "g")
    assert [p.name for p in ckpts] == ["epoch_0001.safetensors"] and _finite(ckpts[0])


def test_nonfinite_weights_are_never_saved(tmp_path, monkeypatch):
    """An optimizer update that overflows (finite gradients, non-finite result) is caught before saving."""
    real_make, steps = loop.make_optimizer, [0]

    def make(model, **kw):
        opt = real_make(model, **kw)
        real_step = opt.step

        def step(*a, **k):
            out = real_step(*a, **k)
            steps[0] += 1
            if steps[0] == 8:  # the last step of epoch 2 (a later step would see a NaN loss first)
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = math.nan
            return out

        opt.step = step
        return opt

    monkeypatch.setattr(loop, "make_optimizer", make)
    with pytest.raises(TrainingDiverged, match="parameters became non-finite during epoch 2; nothing saved"):
        train(TINY, epochs=3, out=str(tmp_path), name="w")
    ckpts = list_checkpoints(tmp_path / "w")
    assert [p.name for p in ckpts] == ["epoch_0001.safetensors"] and _finite(ckpts[0])
    rows = (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1]


BN_MSG = (r"model resnet18_bn: BatchNorm needs more than 1 value per channel in training, but with 1 image\(s\) "
          r"per micro-batch \(and rank\) a layer's feature map is 1x1; use a larger --batch-size or a norm-free "
          r"model such as salunet_c18")


@pytest.mark.parametrize("batch,accum", [(1, 1), (4, 4)])
def test_batchnorm_at_batch_size_one_is_explained_and_leaves_nothing(tmp_path, batch, accum):
    out = tmp_path / "runs"  # does not exist yet: the failed run must not leave it behind either
    with pytest.raises(ValueError, match=BN_MSG):
        train(TINY, model="resnet18_bn", batch_size=batch, accum_steps=accum, out=str(out), name="bn")
    assert not out.exists()


def test_batchnorm_at_batch_size_one_cli(tmp_path, capsys):
    code = main(["train", "--model", "resnet18_bn", "--width", "4", "--batch-size", "1", "--train-subset", "8",
                 "--progress", "false", "--out", str(tmp_path / "runs"), "--name", "bn"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("salunet: error: model resnet18_bn: BatchNorm needs")
    assert not (tmp_path / "runs").exists()
    # the advice holds: two images per batch train the same BN model on the same data
    s = train(TINY, model="resnet18_bn", batch_size=2, train_subset=8, test_subset=8, epochs=1,
              out=str(tmp_path), name="bn2")
    assert s["epochs"] == 1


def test_early_failure_keeps_a_preexisting_empty_run_dir(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()  # the user made it; a failed run empties what it wrote but keeps the folder
    monkeypatch.setattr(loop, "mixed_cross_entropy", lambda *a: torch.tensor(math.nan, requires_grad=True))
    with pytest.raises(TrainingDiverged, match="Last good checkpoint: none yet"):
        train(TINY, out=str(tmp_path), name="mine")
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header_length", "metadata"])
def test_corrupt_checkpoints_are_named(tmp_path, damage):
    train(TINY, epochs=1, out=str(tmp_path), name="c")
    p = list_checkpoints(tmp_path / "c")[-1]
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"\x07" * 64
    elif damage == "header_length":
        data = (len(data) * 2).to_bytes(8, "little") + data[8:]
    else:  # valid JSON header, broken metadata (the tensor checksum does not cover it)
        header = json.loads(data[8:8 + n])
        header["__metadata__"]["skeleton"] = "{not json"
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        data = len(h).to_bytes(8, "little") + h + data[8 + n:]
    p.write_bytes(data)
    with pytest.raises(CheckpointError, match=str(p.name)):
        load_checkpoint(p)
