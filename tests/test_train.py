"""Training: outputs, exact resume, divergence, refusal to overwrite, evaluation, optimizer groups."""
import json
import math
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from salunet.cli import main
from salunet.train import TrainingDiverged, lr_at, train
from salunet.train.checkpoint import list_checkpoints, load_checkpoint
from salunet.train.evaluate import evaluate_checkpoint
from salunet.models import create_model

_THREADS = torch.get_num_threads()
TINY = dict(model="salunet_c18", width=4, data="digits", train_subset=256, test_subset=100, batch_size=32,
            eval_batch_size=100, lr=0.05, crop_padding=1, flip=False, ema_decay=0.9, progress=False,
            mixup=0.2, label_smoothing=0.1)


def run(tmp_path, name, **kw):
    from salunet.analysis.plots import draw_run_curves

    return train({**TINY, "out": str(tmp_path), "name": name, **kw}, on_finish=draw_run_curves)


def test_run_writes_everything(tmp_path):
    s = run(tmp_path, "a", epochs=2)
    d = tmp_path / "a"
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # one line per epoch
    for key in ("train_loss", "train_acc", "test_acc", "ema_test_acc", "lr", "images_per_s", "epoch_s",
                "test_top5", "startup_s", "eval_s", "elapsed_s"):
        assert key in rows[-1]
    # lr is the value of the epoch's last optimizer step (8 steps per epoch, 1 warm-up epoch, cosine to 0)
    assert rows[0]["lr"] == pytest.approx(lr_at(7, 16, 8, 0.05, 0.0)) == pytest.approx(0.05)
    assert rows[1]["lr"] == pytest.approx(lr_at(15, 16, 8, 0.05, 0.0))
    # the first step's one-time costs are reported apart from (and excluded from) the throughput
    assert rows[0]["startup_s"] > 0 and rows[1]["startup_s"] == 0
    assert rows[0]["images_per_s"] == pytest.approx(7 * 32 / (rows[0]["epoch_s"] - rows[0]["startup_s"]), rel=0.02)
    # host time blocked on the device at the per-step check: a part of the epoch (on CPU nothing runs ahead)
    # (both rounded to 1 ms in the file, so their ratio is checked to that precision)
    assert all(0 <= r["wait_s"] <= r["epoch_s"] and 0 <= r["wait_share"] <= 1
               and abs(r["wait_share"] * r["epoch_s"] - r["wait_s"]) <= 1e-3 for r in rows), rows
    assert json.loads((d / "config.json").read_text())["width"] == 4
    assert (d / "curves.png").stat().st_size > 1000 and (d / "summary.json").is_file()
    assert s["final"]["epoch"] == 2 and len(list_checkpoints(d)) == 2
    state, meta = load_checkpoint(list_checkpoints(d)[-1])
    assert meta["config"]["model"] == "salunet_c18" and meta["epoch"] == 2
    umask = os.umask(0)
    os.umask(umask)
    for f in (d / "config.json", d / "summary.json", list_checkpoints(d)[-1]):  # atomic writes: not 0600
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


@pytest.mark.slow
def test_bare_salunet_train_learns_digits(tmp_path, capsys):
    """The README's main command: no arguments but where to write; the defaults must reach > 90% on the
    embedded digits (measured 95-96% over seeds 0-3) and print the accuracy and the run directory."""
    assert main(["train", "--out", str(tmp_path), "--name", "bare", "--progress", "false"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "bare" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_acc"] > 0.9 and rows[-1]["ema_test_acc"] > 0.9
    last = out.strip().splitlines()[-1]
    assert last.startswith("final test accuracy") and f"{100 * rows[-1]['test_acc']:.2f}%" in last
    assert str(tmp_path / "bare") in last
    cfg = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert cfg["data"] == "digits" and cfg["width"] == 16 and cfg["epochs"] == 6


def test_batch_size_one_runs_and_learns(tmp_path):
    """Batch size 1 is a normal case for a norm-free net (the paper trains SaluNet at batch size 1)."""
    torch.set_num_threads(1)  # 400 tiny steps per epoch: threads only add overhead
    try:
        s = train(model="salunet_c18", width=8, model_overrides={"layers": [1, 1, 1, 1]}, train_subset=400,
                  test_subset=200, batch_size=1, epochs=2, lr=0.02, momentum=0.0, weight_decay=0.0,
                  warmup_epochs=0.05, crop_padding=0, ema_decay=0.0, progress=False, out=str(tmp_path), name="b1")
    finally:
        torch.set_num_threads(_THREADS)
    rows = [json.loads(line) for line in (tmp_path / "b1" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 400 and rows[1]["train_loss"] < rows[0]["train_loss"] < 2.3
    assert s["final"]["test_acc"] > 0.5  # chance is 0.1 (measured: 0.865)


@pytest.mark.slow
def test_compile_true_trains(tmp_path, monkeypatch):
    """``--compile true``: the training model goes through torch.compile (a one-layer ViT keeps the
    compilation short); the run trains, evaluates and saves like an eager one. The backend is ``aot_eager``
    (dynamo and AOT autograd, what the loop's plumbing meets; no code generation): inductor's code for a model with
    SALU layers inline is checked against eager by test_kernels.py::test_torch_compile_model_fullgraph, and
    on CUDA by test_gpu.py::test_compile_whole_salunet_fullgraph (half a minute of C++ compilation saved here)."""
    compile_calls, torch_compile = [], torch.compile

    def compile_aot_eager(model, **kw):
        compile_calls.append(type(model).__name__)
        return torch_compile(model, **{**kw, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    assert main(["train", "--compile", "true", "--model", "salunet_t", "--width", "12", "--model-overrides",
                 '{"depth": 1, "heads": 2}', "--optimizer", "adamw", "--lr", "1e-3", "--train-subset", "64",
                 "--test-subset", "64", "--batch-size", "32", "--epochs", "2", "--progress", "false",
                 "--out", str(tmp_path), "--name", "c"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "c" / "config.json").read_text())["compile"] is True
    assert compile_calls == ["ViT"]  # the flag reached torch.compile, with the training model
    assert len(rows) == 2 and all(math.isfinite(r["train_loss"]) for r in rows)
    assert rows[0]["startup_s"] > 0.5 * rows[0]["epoch_s"]  # compilation sits in the first step, not in img/s
    state, _ = load_checkpoint(list_checkpoints(tmp_path / "c")[-1])
    assert not any(k.startswith("_orig_mod") for k in state["model"])  # the plain module's weights are saved


@pytest.mark.parametrize("overrides", [{}, {"drop_rate": 0.3, "drop_path_rate": 0.3}], ids=["plain", "dropped"])
def test_resume_is_bitwise_exact(tmp_path, overrides):
    run(tmp_path, "run", epochs=3, model_overrides=overrides)  # stochastic depth's masks come from the saved RNG
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


def test_divergence_in_the_first_epoch_leaves_nothing(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"non-finite .* at epoch 1, step \d+;.*Last good checkpoint: none yet"):
        run(tmp_path, "nan", lr=1e30, epochs=2, mixup=0.0, warmup_epochs=0)
    assert not (tmp_path / "nan").exists()  # only config.json had been written: removed, the name is free again
    assert run(tmp_path, "nan", epochs=1)["epochs"] == 1


def test_bad_input_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        train({**TINY, "model": "resnet9", "out": str(tmp_path), "name": "bad"})
    with pytest.raises(ValueError, match="larger than the training set"):
        train({**TINY, "batch_size": 512, "out": str(tmp_path), "name": "bad"})
    with pytest.raises(ValueError, match="needs --data-path"):
        train({**TINY, "data": "cifar10", "out": str(tmp_path), "name": "bad"})
    with pytest.raises(ValueError, match=r"batch_size 30 must be divisible by ranks x accum_steps \(1 x 4\)"):
        train({**TINY, "batch_size": 30, "accum_steps": 4, "out": str(tmp_path), "name": "bad"})
    assert not (tmp_path / "bad").exists()


def test_eval_checkpoint(tmp_path):
    s = run(tmp_path, "e", epochs=1, test_subset=0)
    r = evaluate_checkpoint(s["checkpoint"])
    assert r["raw"]["n"] == 360 and 0 <= r["raw"]["top1"] <= r["raw"]["top5"] <= 1
    assert "ema" in r and (tmp_path / "e" / "eval").is_dir()
    # a checkpoint outside any run directory: the result goes beside it, never to <its dir>/../eval
    loose = tmp_path / "loose" / "model.safetensors"
    loose.parent.mkdir()
    shutil.copy(s["checkpoint"], loose)
    r2 = evaluate_checkpoint(loose)
    assert r2["written"] == str(tmp_path / "loose" / "model-eval-digits.json") and not (tmp_path / "eval").exists()


def test_model_from_checkpoint_loads_ema_or_refuses(tmp_path):
    """ema=True gives the EMA weights when the run kept them, and an error naming the file when it did not
    (never the raw weights under the EMA's name)."""
    from salunet.train.checkpoint import CheckpointError
    from salunet.train.evaluate import model_from_checkpoint

    run(tmp_path, "with", epochs=1)
    ck = list_checkpoints(tmp_path / "with")[-1]
    raw, _, state = model_from_checkpoint(ck)
    ema, _, _ = model_from_checkpoint(ck, ema=True)
    assert all(torch.equal(v, state["model"][k]) for k, v in raw.state_dict().items())
    assert all(torch.equal(v, state["ema"]["module"][k]) for k, v in ema.state_dict().items())
    assert not all(torch.equal(v, raw.state_dict()[k]) for k, v in ema.state_dict().items())
    run(tmp_path, "without", epochs=1, ema_decay=0.0)
    ck = list_checkpoints(tmp_path / "without")[-1]
    with pytest.raises(CheckpointError, match=f"{ck.name}: has no EMA weights"):
        model_from_checkpoint(ck, ema=True)


def _last_metrics(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_vit_and_bn_models_train(tmp_path, monkeypatch, capsys):
    E = sys.modules["salunet.train.evaluate"]  # (the package's name `evaluate` is the function)

    run(tmp_path, "vit", model="salunet_t", width=12, model_overrides={"depth": 1}, epochs=1, optimizer="adamw",
        lr=1e-3)
    vit = _last_metrics(tmp_path / "vit")
    assert math.isfinite(vit["train_loss"]) and vit["step"] == 8
    opts = dict(model="resnet18_bn", epochs=1, channels_last=True, accum_steps=2, grad_clip=1.0)
    monkeypatch.setattr(E, "cpu_has_native", lambda amp: False)  # as on this project's AVX2 machines
    capsys.readouterr()
    run(tmp_path, "bn", amp="bf16", **opts)
    assert "amp: bf16 on this CPU" in capsys.readouterr().err  # the slow path is said, not taken silently
    cfg = json.loads((tmp_path / "bn" / "config.json").read_text())
    assert (cfg["amp"], cfg["channels_last"], cfg["accum_steps"], cfg["grad_clip"]) == ("bf16", True, 2, 1.0)
    bn = _last_metrics(tmp_path / "bn")
    assert math.isfinite(bn["train_loss"]) and bn["step"] == 8  # 8 optimizer steps of 2 micro-batches each
    # bf16 autocast is really on: the same run in float32 ends with a different loss
    run(tmp_path, "bn32", amp="none", **opts)
    assert _last_metrics(tmp_path / "bn32")["train_loss"] != bn["train_loss"]
    assert "amp:" not in capsys.readouterr().err


def test_cpu_amp_cost_script_times_both_dtypes_and_reports_ratios(capsys):
    """scripts/cpu_amp_cost.py (docs/BENCHMARKS.md): every case timed in float32 and in the half dtype, the ratio
    their quotient, the CPU's native answer recorded, one JSON line printed (tiny sizes, one repeat)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("cpu_amp_cost", Path(__file__).parents[1] / "scripts" /
                                                  "cpu_amp_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--width", "4", "--batch", "2", "--repeats", "1"])
    E = sys.modules["salunet.train.evaluate"]
    assert out["native"] == E.cpu_has_native("bf16") and out["amp"] == "bf16"
    for case in ("train step", "conv 3x3", "matmul 4096x384x384"):
        r = out[case]
        assert r["float32_s"] > 0 and r["bf16_s"] > 0 and r["ratio"] == pytest.approx(r["bf16_s"] / r["float32_s"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out


def test_amp_note_names_the_slow_path_only_where_it_is_taken(monkeypatch):
    """--amp on a CPU without native half precision (oneDNN's check) gets a line that says so and what to use; a
    GPU, --amp none, a CPU with native support and a torch that cannot tell get none."""
    E = sys.modules["salunet.train.evaluate"]  # (the package's name `evaluate` is the function)

    assert E.cpu_has_native("bf16") in (True, False, None) and E.cpu_has_native("fp16") in (True, False, None)
    asked = []
    monkeypatch.setattr(E, "cpu_has_native", lambda amp: asked.append(amp) or False)
    cpu = torch.device("cpu")
    for amp in ("bf16", "fp16"):
        note = E.amp_note(amp, cpu)
        assert note.startswith(f"amp: {amp} on this CPU") and "--amp none" in note
    assert asked == ["bf16", "fp16"]
    assert E.amp_note("none", cpu) is None and E.amp_note("bf16", torch.device("cuda", 0)) is None
    for answer in (True, None):
        monkeypatch.setattr(E, "cpu_has_native", lambda amp, answer=answer: answer)
        assert E.amp_note("bf16", cpu) is None


def test_ranks_split_each_global_batch_and_the_test_set():
    """What makes 2 ranks equal 1 process: rank r trains on its half of the very batch (same crops, same mix)
    that one process would draw, and evaluates images r, r + 2, ...: disjoint shards that cover everything."""
    from salunet.train import distributed as D
    from salunet.train.config import resolve_config
    from salunet.train.sources import load_source

    cfg = resolve_config(None, {**TINY, "out": "unused", "name": "unused"})
    one = load_source(cfg, D.DistInfo())
    ranks = [load_source(cfg, D.DistInfo(rank=r, world=2)) for r in (0, 1)]
    for full, *halves in zip(one.train_batches(0), *(s.train_batches(0) for s in ranks)):
        x, ya, yb, lam = full
        assert [len(h[0]) for h in halves] == [len(x) // 2] * 2
        assert not torch.equal(halves[0][0], halves[1][0])
        assert torch.equal(torch.cat([h[0] for h in halves]), x)
        assert torch.equal(torch.cat([h[1] for h in halves]), ya) and torch.equal(torch.cat([h[2] for h in halves]), yb)
        assert all(h[3] == lam for h in halves)
    seen = [torch.cat([b[1] for b in s.eval_batches()]) for s in ranks]
    full_y = torch.cat([b[1] for b in one.eval_batches()])
    assert sum(len(y) for y in seen) == len(full_y) == TINY["test_subset"]
    assert torch.equal(seen[0], full_y[0::2]) and torch.equal(seen[1], full_y[1::2])


def test_grad_norm_needs_no_torch_2_6_helper(monkeypatch):
    """torch >= 2.4 is supported: the unclipped global norm must not rely on get_total_norm (new in 2.6)."""
    from salunet.train.loop import _grad_norm

    m = create_model("cnn4", num_classes=10, width=4)
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    expect = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in m.parameters()]))
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    torch.testing.assert_close(_grad_norm(m, 0.0), expect)
    m.zero_grad(set_to_none=True)  # and no gradient at all: norm 0, as get_total_norm gives
    assert _grad_norm(m, 0.0).item() == 0.0
