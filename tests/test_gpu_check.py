"""scripts/gpu_check.sh --dry-run (the GPU check's steps on CPU at toy sizes) and scripts/pack_cifar.py's
lossless round trip."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import pack_cifar  # noqa: E402

STEPS = ["install", "env", "pack", "unpack", "pytest_gpu", "bench_ops_bf16", "bench_ops_fp32", "bench_models_bf16",
         "bench_models_fp32", "train_probe", "train_resnet18_bn", "train_salunet_c18", "train_salunet_c18_v2",
         "pytest_kernels"]


def _clean_env() -> dict:
    """os.environ without the scripts' own settings, so that one set in the shell cannot change a test."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "GPU_RECHECK_"))}


def _fake_cifar(path, n_train=60, n_test=30):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    x[:, :16] //= 4  # some structure, as photos have
    np.savez(path, x_train=x, y_train=np.arange(n_train) % 10,
             x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), y_test=(np.arange(n_test) * 7) % 10)
    return path


def test_pack_round_trip_is_bitwise_and_class_balanced(tmp_path):
    src = _fake_cifar(tmp_path / "c.npz")
    info = pack_cifar.pack(src, tmp_path / "pack.npz", 30, 20)
    assert info["format"] in ("webp", "png") and info["bytes"] < info["raw_bytes"] + 20_000
    out = pack_cifar.unpack(tmp_path / "pack.npz", tmp_path / "out.npz")
    d, s = np.load(out), np.load(src)
    for split, n in (("train", 30), ("test", 20)):
        idx = pack_cifar.balanced_indices(s[f"y_{split}"], n)
        assert np.array_equal(d[f"x_{split}"], s[f"x_{split}"][idx])  # bitwise, in file order
        assert np.array_equal(d[f"y_{split}"], s[f"y_{split}"][idx])
        assert np.bincount(d[f"y_{split}"], minlength=10).tolist() == [n // 10] * 10


def test_parallel_decode_keeps_the_order(tmp_path):
    src = _fake_cifar(tmp_path / "c.npz", n_train=1200)
    pack_cifar.pack(src, tmp_path / "pack.npz", 1200, 10)
    p = np.load(tmp_path / "pack.npz")
    data, off = p["train_data"].tobytes(), p["train_offsets"]
    one, two = pack_cifar.decode_all(data, off, workers=1), pack_cifar.decode_all(data, off, workers=2)
    idx = pack_cifar.balanced_indices(np.load(src)["y_train"], 1200)
    assert np.array_equal(two, np.load(src)["x_train"][idx]) and np.array_equal(one, two)


def test_unpack_refuses_changed_pixels(tmp_path):
    src = _fake_cifar(tmp_path / "c.npz")
    pack_cifar.pack(src, tmp_path / "pack.npz", 10, 10)
    p = dict(np.load(tmp_path / "pack.npz"))
    p["train_sha256"] = np.array("0" * 64)
    np.savez(tmp_path / "bad.npz", **p)
    with pytest.raises(SystemExit, match="pixels differ"):
        pack_cifar.unpack(tmp_path / "bad.npz", tmp_path / "out.npz")
    with pytest.raises(ValueError, match="multiple of 10"):
        pack_cifar.balanced_indices(np.arange(100) % 10, 15)


def test_real_cifar_subset_round_trip(cifar_npz, tmp_path):
    pack_cifar.pack(cifar_npz, tmp_path / "pack.npz", 50, 20)
    d, s = np.load(pack_cifar.unpack(tmp_path / "pack.npz", tmp_path / "out.npz")), np.load(cifar_npz)
    assert np.array_equal(d["x_train"], s["x_train"][pack_cifar.balanced_indices(s["y_train"], 50)])


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_promised_file(tmp_path):
    """The whole script on CPU (toy sizes): every step runs and succeeds (install is skipped), $OUT gets what the
    device tool brings back (<= 8 files), and the tarball holds every log, benchmark and training record."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**_clean_env(), "OUT": str(out), "GPU_CHECK_WORK": str(work), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_results.tar.gz", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert summary["failed"] == [], summary["steps"]
    skipped = [s["step"] for s in summary["steps"] if s["rc"] == "skipped"]
    assert skipped == ["install", "bench_ops_fp32", "bench_models_fp32"]  # fp32: the bf16 step's code, on CPU
    assert set(summary["training"]) == {"probe", "resnet18_bn", "salunet_c18", "salunet_c18_v2"}
    assert all(summary["training"][m]["epochs"] == 1 for m in ("resnet18_bn", "salunet_c18", "salunet_c18_v2"))
    assert any("salu+swalu (fused SALUAct) vs batchnorm2d+relu" in k for k in summary["targets"])
    assert "salunet_c18 images/s vs resnet18_bn" in summary["targets"]
    with tarfile.open(out / "gpu_check_results.tar.gz") as tf:
        names = set(tf.getnames())
    logs = [f"./logs/{s}.log" for s in STEPS if s not in skipped]
    for f in logs + ["./env.json", "./steps.jsonl", "./summary.md", "./bench/bench_ops_cpu_bf16.jsonl",
                     "./bench/bench_models_cpu_bf16.jsonl", "./train/salunet_c18_v2/metrics.jsonl",
                     "./logs/pytest_gpu.xml"]:
        assert f in names, f
    assert not any(n.endswith(".safetensors") or n.startswith("./data/") for n in names)


@pytest.mark.slow
def test_gpu_check_runs_only_the_parts_asked_for(tmp_path):
    """GPU_CHECK_STEPS=kernels: install, env and the kernel tests only; no data, GPU tests, benchmarks or training
    (a session spends one call on training, another on the rest: docs/GPU.md)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**_clean_env(), "OUT": str(out), "GPU_CHECK_WORK": str(work), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "GPU_CHECK_STEPS": "kernels", "GPU_CHECK_EPOCHS": "2"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["install", "env", "pytest_kernels"]
    assert summary["failed"] == [] and not summary.get("training")
    assert not (work / "data" / "cifar10.npz").exists() and not (work / "train_plan.json").exists()


@pytest.mark.slow
def test_gpu_check_parallel_runs_every_seed_with_the_tests_beside(tmp_path):
    """GPU_CHECK_PARALLEL=1 with GPU_CHECK_RUNS / GPU_CHECK_SEEDS (the 2026-11-30 call's mode): every run of every
    seed starts at once beside the GPU tests (those GPU_CHECK_PYTEST_FIRST picks first, own JUnit XML; an empty
    second selection is not a failure), each run trains with its own seed and name, and all are summarised."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**_clean_env(), "OUT": str(out), "GPU_CHECK_WORK": str(work), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "GPU_CHECK_STEPS": "tests,train", "GPU_CHECK_PARALLEL": "1",
           "GPU_CHECK_EPOCHS": "1", "GPU_CHECK_RUNS": "v2_pinned", "GPU_CHECK_SEEDS": "0 1",
           "GPU_CHECK_PYTEST_K": "cpu and compiled_path", "GPU_CHECK_PYTEST_FIRST": "compiled_path"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [], summary["steps"]
    assert sorted(s["step"] for s in summary["steps"]) == ["env", "install", "pack", "pytest_gpu", "train_v2_pinned",
                                                           "train_v2_pinned-s1", "unpack"]
    steps = {s["step"]: s for s in summary["steps"]}
    runs = [steps[n] for n in ("pytest_gpu", "train_v2_pinned", "train_v2_pinned-s1")]
    assert max(r["start"] for r in runs) < min(r["start"] + r["seconds"] for r in runs)  # all three at once
    assert set(summary["training"]) == {"v2_pinned", "v2_pinned-s1"}
    for name, seed in (("v2_pinned", 0), ("v2_pinned-s1", 1)):
        cfg = json.loads((work / "train" / name / "config.json").read_text())
        assert (cfg["seed"], cfg["model"], cfg["salu_recalibrate_measure"]) == (seed, "salunet_c18_v2", "reference")
    first = (work / "logs" / "pytest_gpu_first.xml").read_text()
    assert "test_compiled_path_issues_one_call_per_direction" in first
    assert "test_compiled_path_issues_one_call_per_direction" not in (work / "logs" / "pytest_gpu.xml").read_text()


@pytest.mark.slow
def test_gpu_check_trains_the_c50_pair_on_the_cifar_stem(tmp_path):
    """GPU_CHECK_RUNS may name the C-50 pair: each trains on the 3x3 CIFAR stem (RESULTS.md "C-50: the same cause,
    the same fix"), the BN ResNet with the paper's EMA decay, and the SaluNet's images/s is read against it; and the
    pinned C-50 cell (c50_v2_pinned), with the model and pin settings of the CPU cell that led the tuned twin and,
    like every GPU run, the recipe's weight decay (the CPU cell's was 8e-3)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**_clean_env(), "OUT": str(out), "GPU_CHECK_WORK": str(work), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "GPU_CHECK_STEPS": "train", "GPU_CHECK_EPOCHS": "1",
           "GPU_CHECK_RUNS": "resnet50_bn salunet_c50_v2 c50_v2_pinned"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [], summary["steps"]
    assert set(summary["training"]) == {"resnet50_bn", "salunet_c50_v2", "c50_v2_pinned"}
    for name, ema in (("resnet50_bn", 0.997), ("salunet_c50_v2", None)):
        cfg = json.loads((work / "train" / name / "config.json").read_text())
        assert (cfg["model"], cfg["model_overrides"]) == (name, {"stem": "cifar"})
        assert ema is None or cfg["ema_decay"] == ema
    cfg = json.loads((work / "train" / "c50_v2_pinned" / "config.json").read_text())
    assert (cfg["model"], cfg["model_overrides"]) == ("salunet_c50_v2", {"stem": "cifar", "conv_ws": "scaled",
                                                                         "salu_b0": 0.012})
    assert (cfg["salu_recalibrate"], cfg["salu_recalibrate_every"], cfg["salu_recalibrate_measure"],
            cfg["salu_project_grad"]) == (0.15, 1, "reference", True)
    twin = json.loads((work / "train" / "resnet50_bn" / "config.json").read_text())
    assert cfg["weight_decay"] == twin["weight_decay"] == 5e-4  # the recipe's, for both
    assert {f"{m} images/s vs resnet50_bn" for m in ("salunet_c50_v2", "c50_v2_pinned")} <= set(summary["targets"])
    assert not any("vs resnet18_bn" in k for k in summary["targets"])


@pytest.mark.parametrize("var, value, message", [("GPU_CHECK_STEPS", "train,bogus", "unknown part 'bogus'"),
                                                 ("GPU_CHECK_EPOCHS", "0", "whole number of epochs"),
                                                 ("GPU_CHECK_RUNS", "resnet18_bn bogus", "unknown run 'bogus'"),
                                                 ("GPU_CHECK_SEEDS", "1 x", "'x' is not a seed"),
                                                 ("GPU_CHECK_PARALLEL", "1", "needs GPU_CHECK_EPOCHS"),
                                                 ("GPU_CHECK_PARALLEL", "true", "give 1"),
                                                 ("GPU_CHECK_RUNS", "salunet_c18 salunet_c18", "named twice"),
                                                 ("GPU_CHECK_SEEDS", "0 0", "named twice"),
                                                 ("GPU_CHECK_RUNS", "   ", "empty")])
def test_gpu_check_refuses_a_bad_setting_before_doing_anything(tmp_path, var, value, message):
    env = {**_clean_env(), "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"), var: value}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "work").exists()


def test_gpu_recheck_refuses_an_unknown_step(tmp_path):
    env = {**_clean_env(), "OUT": str(tmp_path), "GPU_RECHECK_STEPS": "profile,bogus"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_recheck.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown step 'bogus'" in proc.stderr and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_gpu_recheck_dry_run_runs_every_step(tmp_path):
    """scripts/gpu_recheck.sh (the second GPU call's script) on CPU at toy sizes: every step runs and succeeds."""
    env = {**_clean_env(), "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_recheck.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = ["profile", "models", "ops_bf16", "pin_cost", "ops_fp32"]
    # rest, triton, pin_test and edge are the suite's own cpu twins (tests/test_triton.py for triton): skipped, and
    # said so
    assert [line.split(":")[0].split("] ")[1] for line in proc.stdout.splitlines() if ": rc=" in line] == steps
    assert proc.stdout.count(": rc=0") == len(steps), proc.stdout
    assert all(f"{s}: skipped" in proc.stdout for s in ("rest", "triton", "edge", "pin_test"))
    assert all((tmp_path / f"{s}.log").stat().st_size > 0 for s in steps)
    assert (tmp_path / "bench_models.jsonl").stat().st_size > 0
