"""The CUDA path (issue 13): every kernel against its float64 reference in float32 / float16 / bfloat16, the CPU
tests' edge cases, float64 gradcheck, autocast, channels_last, torch.compile of a whole SaluNet, a training step
of every registered model, checkpoints between GPU and CPU, bitwise resume, and convert of a model on the GPU.

Every test is parametrised over the device: the ``cuda`` case is skipped with a reason where CUDA is absent, and
its ``cpu`` twin runs the same test code here, so that the code itself is exercised in CI. On CUDA the kernels
take their default path there, ``compiled`` (torch.compile / Triton), set explicitly so that a failed build
raises instead of falling back to eager; on CPU the C++ kernels (conftest's default). The edge-case and autocast
checks are tests/test_kernels.py's own (``check_*``), run with a device. scripts/gpu_check.sh runs this file on
a lent GPU machine (docs/GPU.md).

The kernel tests (``kdev``) also run the hand-written Triton kernels (kernel mode ``triton``): ``cuda-triton`` on a
GPU, and ``cpu-triton`` on CPU tensors under Triton's interpreter, which needs ``TRITON_INTERPRET=1`` before triton
is imported: tests/test_triton.py runs those cases in a subprocess with it set.
"""
import importlib.util
import math
import os

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import salunet
from salunet.models import MODEL_CONFIGS, ViTConfig, create_model, list_models
from salunet.nn import SALU, SWALU, SALUAct, SALUAddAct, kernels
from salunet.nn import functional as F
from test_functional import _params as _positive_params
from test_kernels import DTYPES, PARAMS, check_autocast, check_gate_edge_cases, check_inf_and_nan, \
    check_one_compiled_call, check_salu_edge_cases

CUDA = torch.cuda.is_available()
NO_CUDA = "CUDA is not available (no GPU or a CPU-only torch build); the cpu twin of this test runs instead"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason=NO_CUDA))]
DEFAULT_PATH = {"cpu": "cpp", "cuda": kernels.AUTO_CUDA}  # each device's default kernel path (nn/kernels.py)
TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
KERNEL_PATHS = [
    pytest.param(("cpu", "cpp"), id="cpu"),
    pytest.param(("cuda", "compiled"), id="cuda", marks=pytest.mark.skipif(not CUDA, reason=NO_CUDA)),
    pytest.param(("cuda", "triton"), id="cuda-triton", marks=pytest.mark.skipif(
        not CUDA or not TRITON or INTERPRET, reason="needs CUDA and triton, without TRITON_INTERPRET")),
    pytest.param(("cpu", "triton"), id="cpu-triton", marks=pytest.mark.skipif(
        not (TRITON and INTERPRET), reason="Triton's interpreter: tests/test_triton.py runs these cases in a "
        "subprocess with TRITON_INTERPRET=1" if TRITON else "triton is not installed (pip install "
        "'salunet[triton]')")),
]


@pytest.fixture(params=DEVICES)
def dev(request):
    """The device of the test, with that device's default kernel path selected."""
    kernels.set_kernel_mode(DEFAULT_PATH[request.param])
    return torch.device(request.param)


@pytest.fixture(params=KERNEL_PATHS)
def kdev(request):
    """The device of a kernel test, with a kernel path selected: each device's default, and the Triton kernels."""
    device, mode = request.param
    kernels.set_kernel_mode(mode)
    return torch.device(device)


# ---- every op against the float64 reference ----------------------------------------------------------------

def _ref(op, x, res, *p):
    """The plain formula of ``op`` (functional.py's *_reference), for float64 inputs of moderate size."""
    gate = F.galu_reference if op.endswith("galu") else F.swalu_reference
    if op == "salu":
        return F.salu_reference(x, *p)
    if op in ("swalu", "galu"):
        return gate(x, *p)
    z = F.salu_reference(x, p[0], p[1])
    return gate(z if res is None else z + res, p[2], p[3])


# the output and dL/dx come back in the input dtype, rounded once from float32: a few units of its rounding
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", kernels.OPS)
def test_every_op_matches_float64_reference(kdev, op, dtype):
    """Values and gradients (x, residual, every parameter) of each fused op on ``kdev`` against the plain formula
    in float64 on the same (rounded) inputs. Parameter gradients are float32 sums computed in float32 from exact
    inputs, so they meet float32 precision in every input dtype."""
    g = torch.Generator().manual_seed(0)
    shape, n = (4, 6, 5, 5), 2 if op in ("salu", "swalu", "galu") else 4
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    res = torch.randn(shape, generator=g).to(dtype) if op in kernels.RESIDUAL_OPS else None
    params = [torch.rand(6, 1, 1, generator=g) * 1.7 + 0.3 for _ in range(n)]
    up = torch.randn(shape, generator=g).to(dtype)

    leaves = [t.to(kdev).requires_grad_() for t in [x, *([] if res is None else [res]), *params]]
    y = getattr(F, op)(*leaves)
    grads = torch.autograd.grad(y, leaves, up.to(kdev))
    ref_leaves = [t.detach().double().requires_grad_() for t in [x, *([] if res is None else [res]), *params]]
    ref_res = ref_leaves[1] if res is not None else None
    y_ref = _ref(op, ref_leaves[0], ref_res, *ref_leaves[1 + (res is not None):])
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, up.double())

    assert y.dtype == dtype and y.device.type == kdev.type
    tol = TOL[dtype]
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=tol, atol=tol)
    n_act = 1 + (res is not None)  # gradients in the input dtype: x (and the residual)
    for i, (gr, gr_ref) in enumerate(zip(grads, ref_grads)):
        assert gr.dtype == (dtype if i < n_act else torch.float32)
        t = tol if i < n_act else 1e-4
        torch.testing.assert_close(gr.cpu().double(), gr_ref, rtol=t, atol=t, msg=f"gradient {i} of {op}")


# ---- the CPU tests' edge cases (+-inf, NaN, huge x, x = 0) ---------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_cases(kdev, dtype):
    for ab in PARAMS:
        check_salu_edge_cases(dtype, ab, kdev)
        for op in ("swalu", "galu"):
            check_gate_edge_cases(op, dtype, ab, kdev)
    for op in ("salu", "swalu", "galu"):
        check_inf_and_nan(op, dtype, kdev)


# ---- float64 gradcheck --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["default", "eager"])
@pytest.mark.parametrize("op", kernels.OPS)
def test_gradcheck_float64(kdev, op, mode):
    """Analytical gradients of every op (x, residual, per-channel parameters) against float64 finite
    differences, on the device's default path and on the eager path."""
    if mode == "eager":
        if kernels.get_kernel_mode() == "triton":
            pytest.skip("the eager path is the cpu and cuda cases' own")
        kernels.set_kernel_mode("eager")
    n = 2 if op in ("salu", "swalu", "galu") else 4
    x = (torch.randn(2, 3, 4, 4, dtype=torch.float64) * 2).to(kdev).requires_grad_()
    res = [torch.randn(2, 3, 4, 4, dtype=torch.float64, device=kdev, requires_grad=True)] \
        if op in kernels.RESIDUAL_OPS else []
    ps = [_positive_params((3, 1, 1)).detach().to(kdev).requires_grad_() for _ in range(n)]
    # Triton's interpreter (cpu-triton, CI) runs each of the full check's ~400 launches in Python (~8 s an op):
    # there, fast mode (u^T J v for random u, v: a wrong entry of J changes it almost surely); the same kernels get
    # the full check as cuda-triton, and test_triton_path_runs_no_op_by_op_math compares their gradients to eager's
    fast = kdev.type == "cpu" and kernels.get_kernel_mode() == "triton"
    assert gradcheck(getattr(F, op), (x, *res, *ps), fast_mode=fast)


def test_compiled_path_issues_one_call_per_direction(dev):
    """No eager op around the compiled kernels (host time: BENCHMARKS.md "On a GPU")."""
    if dev.type == "cpu":
        pytest.skip("tests/test_kernels.py runs this check on CPU")
    check_one_compiled_call(dev)


# ---- the Triton path's own checks ---------------------------------------------------------------------------

@pytest.fixture(params=[p for p in KERNEL_PATHS if p.values[0][1] == "triton"])
def tdev(request):
    """The device of a test of the Triton kernels (``cuda-triton``, ``cpu-triton``)."""
    device, mode = request.param
    kernels.set_kernel_mode(mode)
    return torch.device(device)


def test_triton_path_runs_no_op_by_op_math(tdev, monkeypatch):
    """Forward and backward of every op take the Triton kernels, never the eager math, on a contiguous, a
    channels_last, a token-shaped and a strided (made dense) input, with per-channel and scalar parameters, and
    inputs of several tiles each way (more channels than a tile's columns, more rows than its rows, several row
    blocks per program); the results are the eager path's."""
    from salunet.nn import triton_kernels
    monkeypatch.setattr(triton_kernels, "_PROGRAMS", 2)  # several row blocks per program at these small sizes
    expected = {}
    cases = [((2, 6, 5, 5), 1, None), ((2, 6, 5, 5), 1, torch.channels_last), ((3, 7, 6), 2, None),
             ((2, 6, 10, 5), 1, "strided"), ((2, 6, 5, 5), None, None), ((4, 300, 3, 3), 1, torch.channels_last),
             ((2, 3, 40, 40), 1, None)]
    saved = dict(kernels._MATH)
    try:
        for op in kernels.OPS:
            for k, (shape, axis, fmt) in enumerate(cases):
                x = torch.randn(shape, device=tdev) * 3
                if fmt not in (None, "strided"):
                    x = x.to(memory_format=fmt)
                view = (lambda t: t[:, :, ::2]) if fmt == "strided" else (lambda t: t)  # of the leaf, not dense
                c = 1 if axis is None else x.shape[axis]
                ps = [(torch.rand(c, device=tdev) + 0.3).log() if axis is not None else
                      (torch.rand((), device=tdev) + 0.3).log() for _ in range(kernels._NPARAMS[op])]
                res = torch.randn(view(x).shape, device=tdev) if op in kernels.RESIDUAL_OPS else None
                for mode in ("eager", "triton"):
                    kernels.set_kernel_mode(mode)
                    leaves = [x.clone().requires_grad_(), *[p.clone().requires_grad_() for p in ps]]
                    r = None if res is None else res.clone().requires_grad_()
                    y = kernels.fused(op, view(leaves[0]), *leaves[1:], log_params=True, axis=axis, residual=r)
                    grads = torch.autograd.grad(y, leaves + ([r] if r is not None else []), torch.ones_like(y))
                    if mode == "eager":
                        expected[op, k] = (y, grads)
                        kernels._MATH.update(fwd=None, bwd=None)  # the op-by-op math: not called on this path
                    else:
                        kernels._MATH.update(saved)
                        want_y, want_g = expected[op, k]
                        torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
                        for got, want in zip(grads, want_g):
                            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        kernels._MATH.update(saved)
    assert len(expected) == len(kernels.OPS) * len(cases)


def test_triton_path_refuses_parameters_on_several_axes(tdev):
    """Parameters that vary along two axes (the functional API allows it) have no Triton layout: a clear error that
    names the paths that take them, not a silent change of path."""
    x = torch.randn(2, 3, 4, device=tdev)
    with pytest.raises(ValueError, match="more than one axis.*SALUNET_KERNELS=compiled or eager"):
        F.salu(x, torch.rand(3, 4, device=tdev) + 0.5, torch.rand(3, 1, device=tdev) + 0.5)


def test_triton_path_takes_mixed_strided_and_half_parameters(tdev):
    """A scalar beside per-channel parameters, parameters that are strided views, and float16 parameters: the
    eager path's values and gradients (gradients in each parameter's own shape and dtype)."""
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randn(3, 5, 4, 4, generator=g) * 2).to(tdev)
    w = (torch.rand(5, 2, generator=g) + 0.3).to(tdev)
    cases = [(torch.tensor(0.7, device=tdev), torch.rand(5, 1, 1, generator=g).to(tdev) + 0.2),  # 0-d beside (C,1,1)
             (w[:, 0].view(5, 1, 1), w[:, 1].view(5, 1, 1)),  # strided views (stride 2)
             ((torch.rand(5, 1, 1, generator=g) + 0.3).half().to(tdev), (torch.rand(5, 1, 1, generator=g) + 0.3).to(tdev))]
    for a, b in cases:
        got = []
        for mode in ("eager", "triton"):
            kernels.set_kernel_mode(mode)
            leaves = [x0.clone().requires_grad_(), a.detach().clone().requires_grad_(),
                      b.detach().clone().requires_grad_()] if mode == "eager" else \
                [x0.clone().requires_grad_(), a.detach().requires_grad_(), b.detach().requires_grad_()]
            y = F.salu_swalu(leaves[0], leaves[1], leaves[2], leaves[1], leaves[2])
            got.append((y, torch.autograd.grad(y, leaves, torch.ones_like(y))))
        (y_e, g_e), (y_t, g_t) = got
        torch.testing.assert_close(y_t, y_e, rtol=1e-5, atol=1e-5)
        for gt, ge, p in zip(g_t, g_e, (x0, a, b)):
            assert gt.shape == p.shape and gt.dtype == p.dtype
            torch.testing.assert_close(gt.float(), ge.float(), rtol=2e-3 if p.dtype == torch.half else 1e-4,
                                       atol=2e-3 if p.dtype == torch.half else 1e-4)


def test_triton_direct_launch_matches_tritons_launcher(tdev, monkeypatch):
    """The direct launch (cached CompiledKernels, the runtime arguments only) gives bitwise the values and
    gradients of Triton's own ``kernel[grid]`` on 16-byte aligned and misaligned tensors and parameters; each
    alignment gets its own compiled kernel, and a repeated call does not go through ``kernel[grid]``."""
    from salunet.nn import triton_kernels as tk

    if tdev.type != "cuda":
        pytest.skip("Triton's interpreter has no launcher: the direct launch runs on CUDA only")
    monkeypatch.setattr(tk, "_LAUNCHES", {})
    calls = []
    for kernel in (tk._forward_kernel, tk._backward_kernel):
        run = kernel.run
        monkeypatch.setattr(kernel, "run", lambda *a, _run=run, **k: calls.append(1) or _run(*a, **k))
    shape = (3, 8, 5, 5)
    n = math.prod(shape)
    for offset in (0, 1):  # 1: four bytes past an aligned float32 allocation
        x = (torch.randn(n + offset, device=tdev) * 3)[offset:].view(shape)  # sliced last: arithmetic allocates
        ps = [(torch.rand(8 + offset, device=tdev) + 0.3).log()[offset:] for _ in range(4)]
        assert all((t.data_ptr() % 16 == 0) == (offset == 0) for t in (x, *ps))
        results = []
        for direct in (False, True, True):  # Triton's launcher; the direct launch compiling; then launching
            monkeypatch.setattr(tk, "DIRECT_LAUNCH", direct)
            before = len(calls)
            leaves = [t.detach().requires_grad_() for t in (x, *ps)]  # detach keeps the storage's offset
            y = kernels.fused("salu_swalu", leaves[0], *leaves[1:], log_params=True, axis=1)
            results.append((y, torch.autograd.grad(y, leaves, torch.ones_like(y))))
            if direct and len(results) == 3:
                assert len(calls) == before, "a cached specialisation went through kernel[grid]"
        for y, grads in results[1:]:
            assert torch.equal(y, results[0][0])
            assert all(torch.equal(g, g0) for g, g0 in zip(grads, results[0][1]))
    assert sorted(key[0] for key in tk._LAUNCHES) == ["bwd", "bwd", "fwd", "fwd"]  # each alignment its own


def test_triton_path_double_backward_is_the_eager_paths(tdev):
    """create_graph=True on the Triton path: the first-order gradients carry a graph (from the eager math), so that
    gradient penalties and higher-order gradients match the eager path's, for a module and for a residual tail with
    parameters given in the functional API's (C, 1, 1) shapes; and gradgradcheck in float64."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 3, 3, device=tdev) * 2
    r0 = torch.randn(2, 4, 3, 3, device=tdev)
    ps0 = [(torch.rand(4, 1, 1, device=tdev) + 0.3).log() for _ in range(4)]
    m = SALUAct(SALU(4), SWALU(4)).to(tdev)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    got = {}
    for mode in ("eager", "triton"):
        kernels.set_kernel_mode(mode)
        x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        ps = [p.clone().requires_grad_() for p in ps0]
        (gx,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
        second = torch.autograd.grad(gx.square().sum(), [x, *m.parameters()])
        y = kernels.fused("salu_add_galu", x, *ps, log_params=True, residual=r)
        first = torch.autograd.grad(y.sum(), [x, r, *ps], create_graph=True)
        third = torch.autograd.grad(sum(f.square().sum() for f in first), [x, r, *ps])
        got[mode] = (gx, *second, *first, *third)
    for a, b in zip(got["triton"], got["eager"]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    kernels.set_kernel_mode("triton")
    xd = torch.randn(2, 3, 4, device=tdev, dtype=torch.float64, requires_grad=True)
    pd = [(torch.rand(3, 1, device=tdev, dtype=torch.float64) + 0.3).requires_grad_() for _ in range(2)]
    assert torch.autograd.gradgradcheck(lambda t, a, b: F.salu(t, a, b), (xd, *pd), atol=1e-5)


def test_triton_inference_launches_the_forward_without_an_autograd_node(tdev, monkeypatch):
    """Under no_grad the Triton path runs its forward kernel alone (no TritonFn): the same values as with grad."""
    m = SALUAct(SALU(5), SWALU(5)).to(tdev)
    x = torch.randn(3, 5, 4, 4, device=tdev)
    want = m(x)
    calls = []
    apply = kernels.TritonFn.apply
    monkeypatch.setattr(kernels.TritonFn, "apply", lambda *a: calls.append(1) or apply(*a))
    with torch.no_grad():
        got = m(x)
    assert got.grad_fn is None and not calls and want.grad_fn is not None
    assert torch.equal(got, want.detach())


# ---- autocast and channels_last ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast(kdev, dtype):
    check_autocast(dtype, kdev)


@pytest.mark.parametrize("tail", [False, True], ids=["SALUAct", "SALUAddAct"])
def test_channels_last_matches_contiguous_eager(kdev, tail):
    """A channels_last input keeps its layout through the fused pair / residual tail, with the values and
    gradients (x, residual, parameters) of the unfused modules on a contiguous copy, op by op."""
    m = (SALUAddAct if tail else SALUAct)(SALU(8, a_init=0.7, b_init=0.3), SWALU(8)).to(kdev)
    x = (torch.randn(2, 8, 6, 6, device=kdev) * 2).to(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(2, 8, 6, 6, device=kdev, requires_grad=True)  # contiguous while x is channels_last
    y = m(x, r) if tail else m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    leaves = [x, r] if tail else [x]
    got = torch.autograd.grad(y.square().sum(), [*leaves, *m.parameters()])
    kernels.set_kernel_mode("eager")
    x2, r2 = x.detach().contiguous().requires_grad_(), r.detach().clone().requires_grad_()
    y2 = m.act(m.norm(x2) + r2) if tail else m.act(m.norm(x2))
    want = torch.autograd.grad(y2.square().sum(), [x2, *([r2] if tail else []), *m.parameters()])
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---- torch.compile of a whole SaluNet -----------------------------------------------------------------------

@pytest.mark.slow
def test_compile_whole_salunet_fullgraph(dev):
    """SaluNet-C-18 v2 in the training configuration (channels_last, bf16 autocast) compiles with
    ``fullgraph=True`` (any graph break raises), forward and backward, and agrees with eager. On CUDA: inductor
    and the model's full depth; the cpu twin uses ``aot_eager`` (dynamo + AOT autograd, no code generation) and
    one block per stage, to stay a few seconds on a CI machine.

    The model carries the hooks of ``--salu-recalibrate-measure step`` (train/recalibrate.py) as the trainer
    attaches them, before compiling: they trace into the graph, gather every SALU site's input RMS as an eager
    forward measures it (bf16 rounding apart), and pin every site to the target from it; and those of
    ``--salu-project-grad`` (an autograd.Function on every SALU input), attached before the eager reference too."""
    from torch._dynamo.utils import counters

    from salunet.train.recalibrate import GradientProjection, StepStatistics, salu_input_rms, salu_sites

    torch._dynamo.reset()
    counters.clear()
    cuda = dev.type == "cuda"
    model = create_model("salunet_c18_v2", num_classes=10, width=16 if cuda else 4,
                         **({} if cuda else {"layers": (1, 1, 1, 1)})).to(dev, memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32, device=dev).to(memory_format=torch.channels_last)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    GradientProjection(model)
    with amp:
        y_eager = model(x)
    g_eager = torch.autograd.grad(y_eager.float().square().mean(), list(model.parameters()))
    with amp:
        rms_eager = salu_input_rms(model, [x])  # eval mode, no grad: what the hooks below must not gather
    stats = StepStatistics(model)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if cuda else "aot_eager")
    with amp:
        y = compiled(x)
    grads = torch.autograd.grad(y.float().square().mean(), list(model.parameters()))
    assert y.dtype == y_eager.dtype and torch.isfinite(y.float()).all()
    assert not counters["graph_break"], dict(counters["graph_break"])
    # bf16 rounding differs where inductor keeps fused intermediates in float32: compare whole tensors
    rel = ((y.float() - y_eager.float()).norm() / y_eager.float().norm()).item()
    assert rel < 5e-2, rel
    flat, flat_eager = torch.cat([g.flatten().float() for g in grads]), torch.cat([g.flatten().float() for g in g_eager])
    assert torch.isfinite(flat).all()
    assert torch.nn.functional.cosine_similarity(flat, flat_eager, dim=0).item() > 0.99
    assert set(stats.pin(0.5)) == set(rms_eager)  # from the compiled forward's statistics alone
    stats.remove()
    for name, (_, salu) in salu_sites(model).items():  # sqrt(ab) * rms = 0.5 after the pin: the rms it used
        rms_used = 0.5 / torch.exp(0.5 * (salu.log_a + salu.log_b)).detach().double()
        torch.testing.assert_close(rms_used.reshape(rms_eager[name].shape), rms_eager[name], rtol=2e-2, atol=0,
                                   msg=name)


@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason=NO_CUDA.split(";")[0] + "; its CPU logic runs in tests/test_recalibrate.py "
                    "(test_pin_in_forward_compiles_into_one_graph, aot_eager on a small model: a cpu twin here took 36 s)")
@pytest.mark.parametrize("collective", ["none", "nccl"])
def test_pin_in_forward_compiles_in_one_graph_cuda(collective):
    """The trainer's per-step pin with --compile (``pin_in_forward`` through the compiled model), inductor on CUDA:
    with bf16 autocast and channels_last, the pinning forward is one graph beside the training step's (fullgraph,
    no graph break), compiled once and reused; the parameters it sets are those of the hooks' pin on an eager copy
    (bf16 rounding apart). ``nccl``: each site's sums all-reduced inside the graph, as under DDP (a one-rank NCCL
    group: its sum is the identity, the collective is traced and run all the same; two ranks: gloo on CPU,
    tests/test_distributed.py)."""
    import torch.distributed as dist

    reduce = None
    if collective == "nccl":
        if not dist.is_nccl_available():
            pytest.skip("this torch build has no NCCL")
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", torch.cuda.current_device()))

        def _sum(t):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t
        reduce = _sum
    try:
        _pin_in_forward_cuda(reduce)
    finally:
        if collective == "nccl":
            dist.destroy_process_group()


def _fresh_cuda_c18(counters):
    """Dynamo reset and its counters cleared, CUDA's default kernel path, and a seeded salunet_c18_v2 (width 16) on
    the GPU in channels_last: the compiled-pin tests' start."""
    torch._dynamo.reset()
    counters.clear()
    dev = torch.device("cuda")
    kernels.set_kernel_mode(DEFAULT_PATH["cuda"])
    torch.manual_seed(0)
    return dev, create_model("salunet_c18_v2", num_classes=10, width=16).to(dev, memory_format=torch.channels_last)


def _pin_in_forward_cuda(reduce):
    from torch._dynamo.utils import counters

    from salunet.train.recalibrate import pin_in_forward, recalibrate_salu, salu_sites

    dev, model = _fresh_cuda_c18(counters)
    eager = create_model("salunet_c18_v2", num_classes=10, width=16).to(dev, memory_format=torch.channels_last)
    eager.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 32, 32, device=dev).to(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    with amp:
        compiled(x)  # the training graph (its backward traced with it)
        for _ in range(2):
            factors = pin_in_forward(model, x, 0.4, forward=compiled, reduce=reduce)
            recalibrate_salu(eager, [x], 0.4, training_shape=True, reduce=reduce)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters["graph_break"])
    assert len(factors) == len(salu_sites(model)) and all(f.device.type == "cuda" for f in factors.values())
    for (name, (_, s)), (_, (_, e)) in zip(salu_sites(model).items(), salu_sites(eager).items()):
        torch.testing.assert_close(s.log_a, e.log_a, rtol=0, atol=2e-2, msg=name)
        torch.testing.assert_close(s.log_b, e.log_b, rtol=0, atol=2e-2, msg=name)
    assert model.training


@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason=NO_CUDA.split(";")[0] + "; on CPU tests/test_pin.py compiles it with aot_eager")
def test_salupin_in_a_compiled_bf16_loop_cuda():
    """salunet.SaluPin in a loop of one's own on CUDA, as its docstring says to use it: built on the bare model, the
    pin's forward and the training step each the inductor compile of it (fullgraph), bf16 autocast, channels_last:
    two graphs, no graph break; after a pin every site's sqrt(ab) * rms on the reference is the target (bf16
    rounding); three steps stay finite."""
    from torch._dynamo.utils import counters

    from salunet.train.recalibrate import salu_input_rms, salu_sites

    dev, model = _fresh_cuda_c18(counters)
    x = torch.randn(16, 3, 32, 32, device=dev).to(memory_format=torch.channels_last)
    y = torch.arange(16, device=dev) % 10
    pin = salunet.SaluPin(model, x[:8], 0.15)
    pin.forward = step = torch.compile(model, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            pin.step()
            loss = nn.functional.cross_entropy(step(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            assert torch.isfinite(loss)
        pin.step()
        rms = salu_input_rms(model, [x[:8]])
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters["graph_break"])
    for name, (_, s) in salu_sites(model).items():
        arg = torch.exp(0.5 * (s.log_a.double() + s.log_b.double())).detach().reshape(rms[name].shape) * rms[name]
        torch.testing.assert_close(arg, torch.full_like(arg, 0.15), rtol=3e-2, atol=0, msg=name)


@pytest.mark.slow
def test_running_projection_compiles_in_one_graph_and_matches_eager(dev):
    """--salu-project-grad-rate under torch.compile: the backward changes no Python state (the batch's sums leave as
    the probe's gradient, folded by its accumulation hook), so a model with the hooks compiles in one graph
    (fullgraph: inductor on CUDA; the cpu twin uses aot_eager, which traces forward and backward as inductor does
    without compiling C++) once, with no recompilation as the sums are replaced every step, and, over three steps,
    gives eager's gradients and running sums; the probe's gradient is cleared after every fold, and reset() zeroes
    the sums."""
    from torch._dynamo.utils import counters

    from salunet.train.recalibrate import GradientProjection

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SALU(4, a_init=1.5, b_init=2.0), SWALU(4), nn.Flatten(),
                             nn.Linear(4 * 6 * 6, 5)).to(dev)

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = make(), make()
    projections = GradientProjection(eager, rate=0.5), GradientProjection(compiled, rate=0.5)
    run = torch.compile(compiled, fullgraph=True, backend="inductor" if dev.type == "cuda" else "aot_eager")
    g = torch.Generator(device=dev).manual_seed(1)
    sums = []
    for _ in range(3):
        x = torch.randn(8, 3, 6, 6, generator=g, device=dev)
        for m, fwd in ((eager, eager), (compiled, run)):
            m.zero_grad(set_to_none=True)
            with torch._dynamo.config.patch(error_on_recompile=True):  # new sums each step: same graph
                fwd(x).square().sum().backward()
        torch.testing.assert_close(compiled[0].weight.grad, eager[0].weight.grad, rtol=1e-4, atol=1e-5)
        a, b = (p._running["1"] for p in projections)
        torch.testing.assert_close(b.num, a.num, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.den, a.den, rtol=1e-5, atol=1e-6)
        assert a.probe.grad is None and b.probe.grad is None
        sums.append(a.num.clone())
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not torch.equal(sums[1], sums[2]) and (sums[0] != 0).all()
    projections[0].reset()
    assert not projections[0]._running["1"].num.any()


# ---- a training step of every registered model --------------------------------------------------------------

AMPS = ["fp32", "bf16"]


@pytest.mark.parametrize("amp", AMPS)
@pytest.mark.parametrize("name", list_models())
def test_training_step_every_model(dev, name, amp):
    """One SGD step of every registered model (small width) on the device, in float32 and under bf16 autocast:
    a finite loss, a finite gradient for every parameter, every parameter on the device, the weights moved.
    The kernels run op by op here (SALUNET_KERNELS=eager): each model meets its own set of shapes, and compiling
    a Triton kernel per shape for eight models would cost minutes; the compiled kernels are checked above, and
    inside whole compiled models by test_compile_whole_salunet_fullgraph and scripts/gpu_check.sh's training."""
    if dev.type == "cpu" and amp == "bf16":
        pytest.skip("bf16 autocast on CPU is checked by test_autocast; the model steps in bf16 are the GPU's case")
    kernels.set_kernel_mode("eager")
    small = {"width": 24, "depth": 2} if isinstance(MODEL_CONFIGS[name], ViTConfig) else {"width": 8}
    model = create_model(name, num_classes=7, **small).to(dev)
    side = 64 if "50" in name else 32
    x, y = torch.randn(4, 3, side, side, device=dev), torch.randint(0, 7, (4,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert math.isfinite(loss.item())
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
           or p.device.type != dev.type]
    assert not bad, bad
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# ---- checkpoints between GPU and CPU, bitwise resume ---------------------------------------------------------

TINY = dict(model="salunet_c18", width=4, data="digits", train_subset=256, test_subset=100, batch_size=32,
            eval_batch_size=100, lr=0.05, crop_padding=1, flip=True, ema_decay=0.9, progress=False,
            mixup=0.2, label_smoothing=0.1)


def _state(path):
    from safetensors.torch import load_file

    d = load_file(str(path))
    return {k: v for k, v in d.items() if k.startswith(("s/model/", "s/ema/", "s/optim/"))}


def test_checkpoint_from_gpu_loads_on_cpu_and_back(dev, tmp_path):
    """A run trained on the device resumes on the CPU (its checkpoint loaded there) and then on the device again
    (the CPU's checkpoint loaded there); load_model gives the same weights on either device."""
    from salunet.train import train
    from salunet.train.checkpoint import list_checkpoints

    # what moves between devices here is the saved state, not the kernels: the eager path spares the ~20
    # compilations (one per op, shape and direction) that the compiled path costs a fresh GPU machine; the
    # default path's own resume is test_resume_is_bitwise_exact (on the first H200 the two together outran a
    # 240 s limit, issue 13)
    kernels.set_kernel_mode("eager")
    run = tmp_path / "run"
    train({**TINY, "device": str(dev), "epochs": 1, "out": str(tmp_path), "name": "run"})
    on_cpu = salunet.load_model(run, device="cpu")
    on_dev = salunet.load_model(run, device=dev)
    assert next(on_dev.parameters()).device.type == dev.type
    for (k, a), b in zip(on_cpu.state_dict().items(), on_dev.state_dict().values()):
        assert torch.equal(a, b.cpu()), k
    train(resume=str(run), epochs=2, device="cpu")
    train(resume=str(run), epochs=3, device=str(dev))
    assert [p.name for p in list_checkpoints(run)][-1] == "epoch_0003.safetensors"
    assert all(torch.isfinite(v).all() for v in _state(list_checkpoints(run)[-1]).values())


def test_resume_is_bitwise_exact(dev, tmp_path, monkeypatch):
    """2 epochs in one go == 1 epoch, a crash, and a resume, bit for bit (model, EMA, optimizer), on the device's
    default kernel path. cuDNN is held to its deterministic algorithms, as a user who wants bitwise runs would."""
    from salunet.train import train
    from salunet.train.checkpoint import list_checkpoints

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    run = tmp_path / "run"
    train({**TINY, "device": str(dev), "epochs": 2, "out": str(tmp_path), "name": "run"})
    ckpts = list_checkpoints(run)
    full = _state(ckpts[-1])
    ckpts[-1].unlink()  # as if the process died right after epoch 1's checkpoint
    train(resume=str(run))
    resumed = _state(list_checkpoints(run)[-1])
    assert full.keys() == resumed.keys() and full
    different = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not different, different[:5]


# ---- convert of a model on the GPU ---------------------------------------------------------------------------

def test_convert_model_on_device(dev):
    """convert() of a model that lives on the device: every new module there, the norms and activations
    replaced, and the converted model trains (finite output and gradients)."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).to(dev)
    x = torch.randn(4, 3, 16, 16, device=dev)
    report = salunet.convert(model, example_input=x)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.GELU)) for m in model.modules()), report
    assert any(isinstance(m, SALU) for m in model.modules())
    assert all(t.device.type == dev.type for t in [*model.parameters(), *model.buffers()])
    y = model(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
