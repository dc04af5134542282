"""train/checkpoint.py, the one owner of on-disk formats: checkpoint round trip (nested state, dtypes, no
pickle), the checksum, JSON lines with their one tolerance rule, and RunDir, which names every file of a run."""
import json

import pytest
import torch

from salunet.train.checkpoint import (CheckpointError, append_jsonl, load_checkpoint, read_jsonl, save_checkpoint,
                                      write_jsonl_atomic)
from salunet.train.rundir import RunDir, timestamped


def _state():
    return {"model": {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)},
            "optim": {"state": {0: {"momentum_buffer": torch.randn(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "ema": None, "rng": {"torch": torch.get_rng_state()}, "half": torch.randn(4).to(torch.bfloat16)}


def test_round_trip_keeps_structure_values_and_dtypes(tmp_path):
    path = tmp_path / "c.safetensors"
    state = _state()
    save_checkpoint(path, state, {"epoch": 3, "config": {"model": "x"}})
    got, meta = load_checkpoint(path)
    assert meta["epoch"] == 3 and meta["config"] == {"model": "x"}
    assert torch.equal(got["model"]["w"], state["model"]["w"]) and got["model"]["b"].dtype == torch.int64
    assert torch.equal(got["optim"]["state"][0]["momentum_buffer"], state["optim"]["state"][0]["momentum_buffer"])
    assert got["optim"]["param_groups"] == [{"lr": 0.1, "params": [0]}] and got["ema"] is None
    assert got["half"].dtype == torch.bfloat16 and torch.equal(got["half"], state["half"])
    assert torch.equal(got["rng"]["torch"], state["rng"]["torch"])
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file of the atomic write is gone


def test_checksum_catches_a_flipped_tensor_bit(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, _state(), {"epoch": 1})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the tensor payload: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}: .*checksum mismatch"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, _state(), {"epoch": 1})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_jsonl_torn_last_line_dropped_damage_elsewhere_refused(tmp_path):
    f = tmp_path / "m.jsonl"
    append_jsonl(f, {"epoch": 1})
    append_jsonl(f, {"epoch": 2})
    with open(f, "a") as h:
        h.write('{"epoch": 3, "lo')  # a crash in the middle of an append
    assert read_jsonl(f) == [{"epoch": 1}, {"epoch": 2}]
    f.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match=f"{f}: line 2 is not JSON"):
        read_jsonl(f)
    write_jsonl_atomic(f, [{"a": 1}, {"b": 2}])
    assert read_jsonl(f) == [{"a": 1}, {"b": 2}]


def test_run_dir_names_every_file(tmp_path):
    run = RunDir(tmp_path / "r")
    assert [p.name for p in (run.config, run.metrics, run.summary, run.curves, run.run_id_file)] == \
        ["config.json", "metrics.jsonl", "summary.json", "curves.png", ".torchrun_run_id"]
    assert run.checkpoint(7) == tmp_path / "r" / "checkpoints" / "epoch_0007.safetensors"
    assert RunDir.of_checkpoint(run.checkpoint(7)).path == run.path
    assert RunDir.of_checkpoint(tmp_path / "loose.safetensors") is None
    assert run.eval_file("x.json") == tmp_path / "r" / "eval" / "x.json"
    run.path.mkdir()
    assert run.read_config() is None and run.read_metrics() == [] and not run.is_started()
    run.write_config({"model": "m"})
    assert run.read_config() == {"model": "m"} and run.is_started()
    for e in (1, 2, 3):
        run.append_metrics({"epoch": e})
    run.trim_metrics(2)
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
    run.write_run_id("job-7", ["host:12:99", "host:12:99", "other:5:1"])
    assert run.read_run_id() == {"run_id": "job-7", "agents": ["host:12:99", "other:5:1"]}
    run.config.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        run.read_config()
    run.discard_new_files()
    assert not run.config.exists() and not run.metrics.exists() and run.read_run_id() is None
    assert json.loads(json.dumps(str(run)))  # printable
    assert timestamped("abc").startswith("abc-20")
