"""Training: outputs, exact resume, divergence, refusal to overwrite, evaluation, optimizer groups."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from salunet.train import TrainingDiverged, lr_at, param_groups, train
from salunet.train.checkpoint import list_checkpoints, load_checkpoint
from salunet.train.evaluate import evaluate_checkpoint
from salunet.models import create_model

TINY = dict(model="salunet_c18", width=4, data="digits", train_subset=256, test_subset=100, batch_size=32,
            eval_batch_size=100, lr=0.05, crop_padding=1, flip=False, ema_decay=0.9, progress=False,
            mixup=0.2, label_smoothing=0.1)


def run(tmp_path, name, **kw):
    return train({**TINY, "out": str(tmp_path), "name": name, **kw})


def test_run_writes_everything(tmp_path):
    s = run(tmp_path, "a", epochs=2)
    d = tmp_path / "a"
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "test_acc", "ema_test_acc", "lr", "images_per_s", "epoch_s", "test_top5"):
        assert key in rows[-1]
    assert json.loads((d / "config.json").read_text())["width"] == 4
    assert (d / "curves.png").stat().st_size > 1000 and (d / "summary.json").is_file()
    assert s["final"]["epoch"] == 2 and len(list_checkpoints(d)) == 2
    state, meta = load_checkpoint(list_checkpoints(d)[-1])
    assert meta["config"]["model"] == "salunet_c18" and meta["epoch"] == 2


def test_learns_digits(tmp_path):
    s = run(tmp_path, "learn", epochs=4, width=8, train_subset=0, test_subset=0, batch_size=64, mixup=0.0)
    assert s["final"]["test_acc"] > 0.5  # chance is 0.1


def test_resume_is_bitwise_exact(tmp_path):
    run(tmp_path, "run", epochs=3)
    ckpts = list_checkpoints(tmp_path / "run")
    a = load_file(str(ckpts[-1]))
    # simulate a crash right after epoch 2's checkpoint: epoch 3's checkpoint never happened
    ckpts[-1].unlink()
    train(resume=str(tmp_path / "run"))
    b = load_file(str(list_checkpoints(tmp_path / "run")[-1]))
    keys = [k for k in a if k.startswith(("s/model/", "s/ema/", "s/optim/"))]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]


def test_resume_rejects_changed_config(tmp_path):
    run(tmp_path, "r", epochs=1)
    with pytest.raises(ValueError, match="only epochs"):
        train(resume=str(tmp_path / "r"), lr=0.5)
    with pytest.raises(FileNotFoundError):
        train(resume=str(tmp_path / "nothing"))


def test_refuses_existing_run_dir(tmp_path):
    run(tmp_path, "x", epochs=1)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "x").rglob("*")}
    with pytest.raises(ValueError, match="already exists; continue it with --resume"):
        run(tmp_path, "x", epochs=1)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "x").rglob("*")}


def test_divergence_stops_and_keeps_last_good(tmp_path):
    run(tmp_path, "d", epochs=1)
    good = list_checkpoints(tmp_path / "d")
    # resume with an absurd number of epochs is fine; make the loss explode by poisoning the weights
    state_path = good[-1]
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        train({**TINY, "out": str(tmp_path), "name": "nan", "lr": 1e30, "epochs": 2, "mixup": 0.0,
               "warmup_epochs": 0})
    assert list_checkpoints(tmp_path / "d") == good and state_path.is_file()
    assert list_checkpoints(tmp_path / "nan") == []


def test_bad_input_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        train({**TINY, "model": "resnet9", "out": str(tmp_path), "name": "bad"})
    with pytest.raises(ValueError, match="larger than the training set"):
        train({**TINY, "batch_size": 512, "out": str(tmp_path), "name": "bad"})
    with pytest.raises(ValueError, match="needs --data-path"):
        train({**TINY, "data": "cifar10", "out": str(tmp_path), "name": "bad"})
    assert not (tmp_path / "bad").exists()


def test_eval_checkpoint(tmp_path):
    s = run(tmp_path, "e", epochs=1, test_subset=0)
    r = evaluate_checkpoint(s["checkpoint"])
    assert r["raw"]["n"] == 360 and 0 <= r["raw"]["top1"] <= r["raw"]["top5"] <= 1
    assert "ema" in r and (tmp_path / "e" / "eval").is_dir()


def test_vit_and_bn_models_train(tmp_path):
    run(tmp_path, "vit", model="salunet_t", width=12, model_overrides={"depth": 1}, epochs=1, optimizer="adamw",
        lr=1e-3)
    run(tmp_path, "bn", model="resnet18_bn", epochs=1, amp="bf16", channels_last=True, accum_steps=2, grad_clip=1.0)


def test_param_groups_exclude_salu_and_biases():
    m = create_model("salunet_t", num_classes=10, width=24, depth=1)
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(n.endswith("weight") for n in (names[id(p)] for p in decay["params"]))
    nd = {names[id(p)] for p in no_decay["params"]}
    assert any("log_a" in n for n in nd) and any("pos_embed" in n for n in nd) and any(n.endswith("bias") for n in nd)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert all(lr_at(s, 100, 10, 1.0, 0.0) >= lr_at(s + 1, 100, 10, 1.0, 0.0) for s in range(10, 99))
    assert not math.isnan(lr_at(5, 10, 0, 1.0, 0.0))
