"""``salunet doctor``: versions, the kernel path, the CPU ISA, the kernel cache and whether the build is current;
it builds nothing unless asked."""
import importlib.util
import json

import torch

from salunet.cli import main
from salunet.nn import cpu_ext
from salunet.train.evaluate import cpu_has_native


def _lines(text: str) -> dict:
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def test_doctor_reports_versions_isa_cache_and_a_current_build(capsys):
    assert cpu_ext.load() is not None, cpu_ext.load_error()
    assert main(["doctor"]) == 0
    r = _lines(capsys.readouterr().out)
    assert r["torch"] == torch.__version__ and r["CPU ISA"] == cpu_ext.capability()
    half = {amp: cpu_has_native(amp) for amp in ("bf16", "fp16")}
    word = {True: "native", False: "slow", None: "unknown"}
    assert r["CPU bf16 / fp16"].startswith(f"{word[half['bf16']]} / {word[half['fp16']]}")
    assert ("use --amp none here" in r["CPU bf16 / fp16"]) == (False in half.values())
    assert r["kernel cache"] == str(cpu_ext.cache_root()) and r["kernel build"] == str(cpu_ext.build_folder())
    assert r["build current"] == "yes" and r["kernel path (CPU)"].startswith("C++ (salunet CPU extension")
    assert r["stale build lock"] == "no" and r["build error"] == "-"
    assert "tensorboard" in r["optional"] and "timm" in r["optional"] and "triton" in r["optional"]
    if importlib.util.find_spec("triton") is None:
        assert r["Triton kernels"].startswith("triton not installed (pip install")
    elif not torch.cuda.is_available():
        assert r["Triton kernels"].startswith("no CUDA device: they run CUDA tensors")
    else:
        assert r["Triton kernels"].startswith("ready on CUDA")


def test_doctor_json_and_a_cache_without_a_build(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    assert main(["doctor", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kernel_cache"] == str(tmp_path / "cache")
    assert r["kernel_build"] == str(tmp_path / "cache" / cpu_ext.build_name())
    assert r["kernel_build_current"] is False and "not built yet" in r["kernel_path_cpu"]
    assert not (tmp_path / "cache").exists()  # nothing built, nothing written
    assert r["torch"] == torch.__version__ and set(r["optional"]) == {"tensorboard", "onnx", "onnxruntime", "timm",
                                                                           "triton"}
