"""torchrun + DDP (gloo, 2 CPU processes) gives the same model as one process with the same global batch.

Tolerance: the two runs see identical samples, crops and mixes (the global batch and its augmentation are
drawn from the same generator on every rank), so the only difference is floating-point summation order:
DDP averages two half-batch gradients with an all-reduce instead of reducing one full batch. That is a
relative error of ~1e-7 per step in float32; over the run's 16 SGD steps we allow 1e-4 relative (and 1e-5
absolute) on every weight (measured: max abs difference 2.4e-7)."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from salunet.train.checkpoint import list_checkpoints

ARGS = ["--model", "salunet_c18", "--width", "4", "--data", "digits", "--train-subset", "256", "--test-subset",
        "64", "--batch-size", "32", "--epochs", "2", "--lr", "0.05", "--crop-padding", "1", "--mixup", "0.2",
        "--ema-decay", "0.9", "--progress", "false", "--device", "cpu"]


def _env():
    return {**os.environ, "SALUNET_KERNELS": "eager", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_ranks_match_one(tmp_path):
    one = subprocess.run([sys.executable, "-m", "salunet", "train", *ARGS, "--out", str(tmp_path), "--name", "one"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "salunet", "train", *ARGS, "--out", str(tmp_path), "--name", "two"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "ranks 2" in two.stdout
    a = load_file(str(list_checkpoints(tmp_path / "one")[-1]))
    b = load_file(str(list_checkpoints(tmp_path / "two")[-1]))
    keys = [k for k in a if k.startswith("s/model/")]
    assert keys
    for k in keys:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # and the runs really trained: epoch-2 weights differ from epoch-1 weights
    first = load_file(str(list_checkpoints(tmp_path / "one")[0]))
    assert any(not torch.equal(first[k], a[k]) for k in keys)
    # only rank 0 wrote: one metrics line per epoch
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2
