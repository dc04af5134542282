"""Benchmark helpers (measurements themselves live in benchmarks, never in tests)."""
import pytest
import torch
from torch import nn

from salunet.bench import fold_batchnorm, saved_bytes
from salunet.models import create_model


def test_fold_batchnorm_is_exact_and_removes_bn():
    m = create_model("resnet18_bn", num_classes=10, width=8)
    m.train()
    m(torch.randn(8, 3, 32, 32))  # non-trivial running statistics
    m.eval()
    f = fold_batchnorm(m)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(f(x), m(x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(z, nn.BatchNorm2d) for z in f.modules())


def test_saved_bytes_counts_batchnorm_relu():
    bn, relu = nn.BatchNorm2d(4), nn.ReLU()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    n = saved_bytes(lambda t: relu(bn(t)), x, list(bn.parameters()))
    assert n >= 2 * x.numel() * 4  # BN keeps its input, ReLU its output


def test_train_once_reports_speed_memory_and_data_share(cifar_npz, tmp_path):
    from salunet.bench import _train_once, train_config

    r = _train_once(train_config("salunet_c18", 4, str(cifar_npz), 256, 1, str(tmp_path), "b"), threads=1)
    assert r["images_per_s"] > 0 and 0 <= r["data_share"] < 1 and r["peak_rss_mib"] > 50


def test_bench_train_needs_data(capsys):
    from salunet.cli import main

    assert main(["bench", "train"]) == 2
    assert "needs --data-path" in capsys.readouterr().err


def test_every_variant_is_labelled_with_the_path_it_takes():
    from salunet.bench import _path

    assert _path("batchnorm2d+relu") == _path("layernorm+gelu") == _path("salu reference") == "torch"
    for v in ("swalu alone", "salu+galu (fused SALUAct)", "salu+add+swalu (fused SALUAddAct)"):
        assert _path(v).startswith("salunet "), v
    assert _path("salu fused, C++") == "salunet cpp" and _path("salu fused, eager") == "salunet eager"


def test_model_pairs_selectable_and_v2_folded_for_inference():
    from salunet.bench import bench_models, fold_for_inference
    from salunet.models import NFConv2d, create_model

    res = bench_models(repeats=1, warmup=0, pairs="resnet18 v2 cpu-width", progress=lambda s: None)
    assert [(r.model, r.baseline) for r in res] == [("salunet_c18_v2", "resnet18_bn")]
    assert res[0].train_img_s > 0 and res[0].infer_img_s > 0
    m = create_model("salunet_c18_v2", num_classes=10, width=8)
    x = torch.randn(2, 3, 32, 32)
    folded = fold_for_inference(m)
    assert any(isinstance(c, NFConv2d) for c in m.modules())  # the training model keeps its centred convs
    assert not any(isinstance(c, NFConv2d) for c in folded.modules()) and not folded.training
    torch.testing.assert_close(folded(x), m.eval()(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown model pair"):
        bench_models(repeats=1, pairs="nope")


def test_ops_on_a_device_and_dtype_report_structure():
    """--device / --dtype: rows carry the device, dtype, shape and GB/s under the byte model (5 element-sizes per
    element, 8 for the residual tail); CPU rows have no peak memory. Structure only, never timing."""
    from salunet.bench import bench_ops

    res = bench_ops(repeats=1, warmup=1, threads=1, batch=2, cases="nchw,tail", dtype="bf16", progress=lambda s: None)
    assert {r.case for r in res} == {"nchw_2x64x32x32", "tail_2x64x32x32"}
    for r in res:
        assert (r.device, r.dtype, r.shape, r.peak_mib) == ("cpu", "bf16", "2x64x32x32", None)
        n_bytes = 2 * 64 * 32 * 32 * 2 * (8 if r.case.startswith("tail") else 5)
        assert r.gbps == pytest.approx(n_bytes / (r.median_ms / 1e3) / 1e9, rel=1e-6)
    with pytest.raises(ValueError, match="unknown case"):
        bench_ops(cases="nope")
    with pytest.raises(ValueError, match="unknown dtype"):
        bench_ops(dtype="fp8")


def test_models_in_bf16_channels_last_report_structure():
    from salunet.bench import bench_models, format_model_table

    res = bench_models(repeats=1, warmup=1, pairs="vit cpu-width", dtype="bf16", batch=2, channels_last=True,
                       progress=lambda s: None)
    assert [(r.device, r.dtype, r.batch, r.train_peak_mib) for r in res] == [("cpu", "bf16", 2, None)]
    assert "peak" not in format_model_table(res)  # the CPU table keeps its columns


def test_bench_device_options_refused_in_one_line(capsys):
    from salunet.cli import main

    if not torch.cuda.is_available():
        assert main(["bench", "ops", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["bench", "ops", "--device", "tpu"]) == 2
    assert "cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(["bench", "folder", "--dtype", "bf16"]) == 2
    assert "apply to bench ops / models only" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_token_baseline_layernorm_takes_the_input_dtype(dtype):
    """CUDA's layer_norm refuses float32 weights with a bf16 input (CPU's accepts them): `bench ops --dtype bf16`
    failed so on an H200 (issue 13). The LayerNorm baseline is cast to the bench dtype."""
    from salunet.bench import DTYPES, _token_case

    _, _, shape, variants, _ = _token_case(2, torch.device("cpu"), dtype)
    ln_params = variants["layernorm+gelu"][1]
    assert ln_params and all(p.dtype == DTYPES[dtype] for p in ln_params)
    x = torch.randn(shape).to(DTYPES[dtype]).requires_grad_()
    assert variants["layernorm+gelu"][0](x).dtype == DTYPES[dtype]


def test_gpu_environment_does_not_build_the_cpu_kernels(monkeypatch):
    """Asking for the CPU kernel path builds the C++ extension (~25 s); `bench ops --device cuda` did so at its
    end and ran past its step's time limit on an H200 (issue 13). On a GPU only the GPU's path is reported."""
    from salunet import bench
    from salunet.nn import kernels

    asked = []
    monkeypatch.setattr(kernels, "kernel_path", lambda d="cpu": asked.append(str(d)) or f"path on {d}")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "a GPU")
    env = bench.environment(torch.device("cuda", 0))
    assert asked == ["cuda:0"] and env["kernel_path_cuda"] == "path on cuda:0" and "kernel_path" not in env
    assert bench.environment("cpu")["kernel_path"] == "path on cpu"



def test_bench_ws_cost_script_times_both_and_skips_only_the_standardisation(monkeypatch, capsys):
    """scripts/bench_ws_cost.py at toy size: one JSON line with both medians and their ratio; its timing-only
    variant really removes the centring and the real ws_kernel is put back; a model without weight
    standardisation is refused."""
    import importlib.util
    import json
    from pathlib import Path

    import salunet.models.nf as nf

    spec = importlib.util.spec_from_file_location("bench_ws_cost", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "bench_ws_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    real = nf.ws_kernel
    args = ["bench_ws_cost.py", "--width", "4", "--batch", "2", "--side", "32", "--classes", "10", "--repeats", "1",
            "--threads", "1"]
    seen = []
    monkeypatch.setattr(nf.NFConv2d, "forward",
                        lambda self, x: seen.append(self.effective_weight().flatten(1).mean(1).abs().max().item())
                        or nn.functional.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding))
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr("sys.argv", args + ["--model", "salunet_c18_v2"])
        mod.main()
        row = json.loads(capsys.readouterr().out)
        monkeypatch.setattr("sys.argv", args + ["--model", "salunet_c18"])
        with pytest.raises(SystemExit, match="standardises no conv kernel"):
            mod.main()
    finally:
        torch.set_num_threads(threads)  # main() sets the process's threads
    assert nf.ws_kernel is real
    assert min(seen) < 1e-6 and max(seen) > 1e-3  # centred in one variant, raw kernels in the other
    assert row["model"] == "salunet_c18_v2" and row["as_is_ms"] > 0 and row["skipped_ms"] > 0
    assert row["skipped_over_as_is"] == pytest.approx(row["skipped_ms"] / row["as_is_ms"], abs=2e-3)
