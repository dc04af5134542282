"""Exports that are right or refuse: every registered model (small) and a converted foreign model, recorded by
torch.jit.trace, torch.export and both ONNX exporters, against the eager model (C++ kernels, the default path,
which is what recorded wrongly before); the recorded math against float64; torch.jit.script refuses."""
import functools
import importlib.util
import math

import pytest
import torch
from torch import nn

import salunet
from salunet.export import export_onnx, relative_error
from salunet.nn import functional as F
from salunet.nn import kernels

RTOL = 1e-4  # the target: each path matches eager within 1e-4 (max abs difference / max abs output)
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_DYNAMO_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))

# every registered model at its smallest that keeps its block types (each stage once, one ViT block)
_SMALL = {"resnet": dict(width=8, layers=(1, 1, 1, 1)), "vit": dict(width=12, depth=1, img_size=32), "cnn4": {}}
CASES = salunet.list_models() + ["converted"]


def _foreign_model() -> nn.Module:
    """A small MobileNet-style network of plain torch layers (BN + ReLU6, depthwise conv, SiLU, LayerNorm + GELU)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 10))


@functools.lru_cache(maxsize=None)
def _case(name: str):
    """(model in eval mode, example input, a second input of other values)."""
    torch.manual_seed(0)
    x, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32) * 2
    if name == "converted":
        model = _foreign_model()
        report = salunet.convert(model, example_input=x)
        assert report.replaced and not report.not_replaced
    else:
        kind = "vit" if name in ("salunet_t", "vit_ln") else "cnn4" if name == "cnn4" else "resnet"
        model = salunet.create_model(name, num_classes=10, **_SMALL[kind])
    model.eval()
    with torch.no_grad():  # parameters off their init values, so that a mix-up of a and b could not pass
        for n, p in model.named_parameters():
            if n.endswith(("log_a", "log_b")):
                p.add_(0.3 * torch.randn_like(p))
    return model, x, x2


def test_cases_include_the_fused_kernels():
    """The cases exercise every fused op that models use, on the C++ path (the one that traced wrongly)."""
    assert kernels.get_kernel_mode() == "cpp"
    ops = {m.op for n in CASES for m in _case(n)[0].modules() if hasattr(m, "op")}
    assert {"salu", "swalu", "galu", "salu_swalu", "salu_add_swalu"} <= ops, ops


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks, constant in a trace
@pytest.mark.parametrize("name", CASES)
def test_jit_trace_matches_eager(name):
    model, x, x2 = _case(name)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        for inp in (x, x2):
            assert relative_error(traced(inp), model(inp)) <= RTOL
    nodes = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "aten::empty_like" not in nodes and "prim::PythonOp" not in nodes


@pytest.mark.parametrize("name", CASES)
def test_torch_export_matches_eager(name):
    model, x, x2 = _case(name)
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        for inp in (x, x2):
            assert relative_error(ep.module()(inp), model(inp)) <= RTOL


@pytest.mark.parametrize("exporter", [
    "torchscript",
    pytest.param("dynamo", marks=[pytest.mark.slow,  # 3-18 s per model on 2 busy cores: torch.export + translation
                                  pytest.mark.skipif(not HAS_DYNAMO_ONNX, reason="onnx/onnxscript not installed "
                                                     "(pip install 'salunet[onnx]')")])])
@pytest.mark.parametrize("name", CASES)
@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed (pip install 'salunet[onnx]')")
def test_onnx_export_matches_eager(name, exporter, tmp_path):
    import onnxruntime as ort

    model, x, x2 = _case(name)
    out = tmp_path / f"{name}.onnx"
    result = export_onnx(model, x, out, exporter=exporter)
    assert result.checked and result.max_rel_error <= RTOL and out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left
    # checked here independently of export_onnx's own check: other values, another batch size
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for inp in (x2, x2[:1], torch.cat([x, x2])):
        got = torch.from_numpy(session.run(None, {"input": inp.numpy()})[0])
        with torch.no_grad():
            assert relative_error(got, model(inp)) <= RTOL


# ---- the recorded math itself, against float64 -------------------------------------------------------------

_REFS = {"salu": F.salu_reference, "swalu": F.swalu_reference, "galu": F.galu_reference}


@pytest.mark.parametrize("op", kernels.OPS)
def test_recorded_math_matches_float64_reference(op):
    """What a recorded graph computes (float32) against the plain formulas in float64, on values where the
    plain formula is safe, and the non-finite values the kernels define (+-inf -> +-A or +-inf, NaN -> NaN)."""
    torch.manual_seed(1)
    x = torch.randn(4, 6, 5, 5) * 3
    res = torch.randn_like(x) if op in kernels.RESIDUAL_OPS else None
    n = 2 if op in ("salu", "swalu", "galu") else 4
    params = [torch.exp(torch.randn(6, 1, 1) * 0.7) for _ in range(n)]
    got = kernels.recorded(op, x, *params, residual=res)
    stages = [op] if n == 2 else ["salu", "swalu" if op.endswith("swalu") else "galu"]
    ref = x.double()
    for i, st in enumerate(stages):
        ref = _REFS[st](ref, params[2 * i].double(), params[2 * i + 1].double())
        if i == 0 and res is not None:
            ref = ref + res.double()
    assert relative_error(got, ref) <= 1e-5
    # fused C++ kernels == recorded on the same inputs
    fused = kernels.fused(op, x, *params, residual=res)
    assert relative_error(got, fused) <= 1e-5
    if res is None:  # non-finite inputs: the same values as the fused kernels
        edge = torch.tensor([math.inf, -math.inf, math.nan, 1e30, -1e30, 0.0]).view(1, 6, 1, 1)
        e_rec = kernels.recorded(op, edge, *params)
        e_fused = kernels.fused(op, edge, *params)
        assert torch.equal(e_rec.isnan(), e_fused.isnan())
        assert relative_error(e_rec, e_fused) <= 1e-5


def test_elementary_erfc_against_float64():
    z = torch.linspace(-8, 26, 100001, dtype=torch.float64)
    ref = torch.erfc(z)
    assert ((kernels._erfc_elementary(z) - ref) / ref).abs().max() < 1.2e-7
    z32 = torch.linspace(-8, 9, 100001)
    ref32 = torch.erfc(z32.double())
    assert ((kernels._erfc_elementary(z32).double() - ref32) / ref32).abs().max() < 1e-5


def test_trace_records_plain_ops_on_every_kernel_path():
    """Whatever the kernel mode, a trace holds the math (the C++ path used to record empty_like)."""
    m = salunet.SALUAct(salunet.SALU(4), salunet.GALU(4)).eval()
    x = torch.randn(2, 4, 3, 3)
    for mode in ("cpp", "eager"):
        kernels.set_kernel_mode(mode)
        traced = torch.jit.trace(m, x)
        assert relative_error(traced(x * 3), m(x * 3)) <= 1e-5


def test_jit_script_refuses_in_one_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), salunet.SALU(4))
    with pytest.raises(ValueError, match=r"torch.jit.script cannot compile salunet's SALU; record the model with "
                                         r"torch.jit.trace"):
        torch.jit.script(model)


def test_torch_compile_matches_eager():
    """torch.compile captures the math without graph breaks, for inference (no_grad, which broke fullgraph
    compilation before) and for training."""
    model, x, _ = _case("converted")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) <= RTOL
    y = compiled(x)
    assert relative_error(y, model(x)) <= RTOL
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


# ---- export_onnx: refusals and the unchecked case ---------------------------------------------------------

@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed (pip install 'salunet[onnx]')")
def test_export_onnx_refuses_a_graph_that_differs(tmp_path, monkeypatch):
    """A graph that does not compute the model (here: another model's) is caught and nothing is written."""
    import salunet.export as E

    model, x, _ = _case("cnn4")
    other = salunet.create_model("cnn4", num_classes=10)
    real = E._export
    monkeypatch.setattr(E, "_export", lambda m, *a: real(other, *a))
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="differs from the eager model: max relative error .* nothing written"):
        export_onnx(model, x, out, exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_without_onnxruntime_says_unchecked(tmp_path, monkeypatch):
    import salunet.export as E

    monkeypatch.setattr(E, "onnxruntime_available", lambda: False)
    model, x, _ = _case("cnn4")
    r = export_onnx(model, x, tmp_path / "m.onnx", exporter="torchscript")
    assert not r.checked and r.max_rel_error is None and "onnxruntime is not installed" in str(r)


def test_export_onnx_bad_arguments(tmp_path):
    model, x, _ = _case("cnn4")
    with pytest.raises(ValueError, match="unknown ONNX exporter 'tflite'; use one of dynamo, torchscript"):
        export_onnx(model, x, tmp_path / "m.onnx", exporter="tflite")
    with pytest.raises(ValueError, match=r"m.pt: name the ONNX file \*.onnx"):
        export_onnx(model, x, tmp_path / "m.pt", exporter="torchscript")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        export_onnx(model, x, tmp_path / "nope" / "m.onnx", exporter="torchscript")
    with pytest.raises(ValueError, match="example_input must be a floating-point tensor"):
        export_onnx(model, x.long(), tmp_path / "m.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_relative_error():
    ref = torch.tensor([1.0, -2.0, math.inf, math.nan])
    assert relative_error(ref.clone(), ref) == 0.0
    assert relative_error(torch.tensor([1.0, -2.002, math.inf, math.nan]), ref) == pytest.approx(1e-3, rel=1e-3)
    assert relative_error(torch.tensor([1.0, -2.0, 0.0, math.nan]), ref) == math.inf  # inf not reproduced
    assert relative_error(torch.tensor([1.0, math.nan, math.inf, math.nan]), ref) == math.inf
    assert relative_error(ref[:2], ref) == math.inf
