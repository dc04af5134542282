"""Numerics of the fused kernels in float32, float16 and bfloat16, compiled == eager, autocast,
channels_last, bytes saved for backward, and torch.compile of a model without graph breaks."""
import math

import pytest
import torch

from salunet import GALU, SALU, SALUAct, SWALU
from salunet.bench import saved_bytes
from salunet.nn import functional as F
from salunet.nn import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PARAMS = [(1.0, 1.0), (2.0, 0.5), (1.0, 1e-2), (10.0, 1e-3)]


def _edge_values(dtype):
    big = torch.finfo(dtype).max
    vals = [0.0, 1e-3, 0.5, 1.0, 3.0, 300.0, 6e4, big / 4, big]
    if dtype != torch.float16:
        vals += [1e20]
    vals = sorted(set(v for v in vals if v <= big))
    return torch.tensor([-v for v in vals] + vals, dtype=dtype)


def _far(dtype, a, b):
    return 2 / math.sqrt(torch.finfo(dtype).eps) / math.sqrt(a * b)


def _grads(op, x, a, b):
    x = x.clone().requires_grad_()
    a = torch.tensor(a, device=x.device, requires_grad=True)
    b = torch.tensor(b, device=x.device, requires_grad=True)
    y = getattr(F, op)(x, a, b)
    y.float().sum().backward()
    return y, x.grad, a.grad, b.grad


@pytest.mark.parametrize("ab", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_salu_edge_cases(dtype, ab, path):
    check_salu_edge_cases(dtype, ab)


def check_salu_edge_cases(dtype, ab, device="cpu"):
    """The edge-case checks of SALU on ``device`` (tests/test_gpu.py runs them on CUDA)."""
    a, b = ab
    amp = math.sqrt(a / b)
    x = _edge_values(dtype).to(device)
    y, gx, ga, gb = _grads("salu", x, a, b)
    assert y.dtype == dtype
    yf, xf = y.float(), x.float()
    tol = amp * (1 + 2 * torch.finfo(dtype).eps)
    assert (yf.abs() <= tol).all(), yf
    nz = xf != 0
    assert (torch.sign(yf[nz]) == torch.sign(xf[nz])).all()
    assert (yf[~nz] == 0).all()
    # far out (|x| / w large enough that t / sqrt(1 + t^2) rounds to 1), y sits at +-A: no collapse to 0
    far = xf.abs() >= _far(dtype, a, b)
    assert far.any()
    torch.testing.assert_close(yf[far].abs(), torch.full_like(yf[far], amp), rtol=4 * torch.finfo(dtype).eps, atol=0)
    for g in (gx, ga, gb):
        assert torch.isfinite(g.float()).all()


@pytest.mark.parametrize("op", ["swalu", "galu"])
@pytest.mark.parametrize("ab", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gate_edge_cases(op, dtype, ab, path):
    check_gate_edge_cases(op, dtype, ab)


def check_gate_edge_cases(op, dtype, ab, device="cpu"):
    """The edge-case checks of a gate on ``device`` (tests/test_gpu.py runs them on CUDA)."""
    a, b = ab
    amp = math.sqrt(a / b)
    cdf = torch.sigmoid if op == "swalu" else (lambda s: 0.5 * torch.erfc(-s / math.sqrt(2)))
    lo, hi = cdf(torch.tensor(-amp)).item(), cdf(torch.tensor(amp)).item()
    x = _edge_values(dtype).to(device)
    y, gx, ga, gb = _grads(op, x, a, b)
    assert y.dtype == dtype
    xf, yf = x.float(), y.float()
    nz = xf != 0
    gate = (yf[nz] / xf[nz])
    eps = 4 * torch.finfo(dtype).eps
    # the gate is computed to absolute (not relative) precision eps in its far-left tail, like torch's GELU
    assert (gate >= lo - eps).all() and (gate <= hi + eps).all(), gate
    # never the opposite sign (0 where the gate rounds to 0 in the far-left tail); positive x stays positive
    assert (torch.sign(yf[nz]) * torch.sign(xf[nz]) >= 0).all()
    assert (yf[xf > 0] > 0).all()
    far = xf.abs() >= _far(dtype, a, b)
    assert far.any()
    expect = torch.where(xf[nz][far[nz]] > 0, hi, lo)
    torch.testing.assert_close(gate[far[nz]], expect, rtol=eps, atol=eps)
    for g in (gx, ga, gb):
        assert torch.isfinite(g.float()).all()


@pytest.mark.parametrize("op", ["salu", "swalu", "galu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inf_and_nan(op, dtype, path):
    check_inf_and_nan(op, dtype)


def check_inf_and_nan(op, dtype, device="cpu"):
    a, b = torch.tensor(2.0, device=device), torch.tensor(0.5, device=device)
    x = torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=dtype, device=device)
    y = getattr(F, op)(x, a, b).float()
    assert torch.isnan(y[2])
    if op == "salu":
        assert y[0].item() == 2.0 and y[1].item() == -2.0  # exactly +-A = sqrt(a/b), in every dtype
    else:  # x * gate(+-A): +-inf times a positive gate
        assert y[0].item() == float("inf") and y[1].item() == -float("inf")


def test_saturation_is_exact_under_an_approximate_rsqrt(monkeypatch):
    """Triton's float32 rsqrt is an approximation (issue 13: SALU(inf) missed A = sqrt(a/b) on an H200). With an
    rsqrt that over-estimates by 3 ulp, the shared math (eager here; Triton traces the same function) still gives
    exactly +-A at saturation and never exceeds A."""
    exact = torch.rsqrt
    monkeypatch.setattr(torch, "rsqrt", lambda v: exact(v) * (1 + 3 * 2.0**-23))
    kernels.set_kernel_mode("eager")
    x = torch.tensor([float("inf"), -float("inf"), 1e20, -1e6, 1e4, 30.0, 3.0, 0.0, float("nan")])
    a, b = torch.tensor(2.0), torch.tensor(0.5)
    y = F.salu(x, a, b)
    assert y[:3].tolist() == [2.0, -2.0, 2.0] and y[3].item() == -2.0
    assert (y[:-1].abs() <= 2.0).all() and y[7].item() == 0.0 and torch.isnan(y[-1])


def test_reference_collapses_where_fused_does_not():
    """The reason the fused path exists: the plain formula returns 0 at x = 1e20 (float32)."""
    x = torch.tensor([1e20])
    one = torch.tensor(1.0)
    assert F.salu(x, one, one, impl="reference").item() == 0.0
    assert F.salu(x, one, one).item() == pytest.approx(1.0)
    assert F.salu(torch.tensor([300.0], dtype=torch.float16), one.half(), one.half(), impl="reference").item() == 0


LAYOUTS = {  # name: (module factory, input factory)
    "NCHW": (lambda cls: cls(8), lambda: torch.randn(4, 8, 5, 5) * 3),
    "channels_last": (lambda cls: cls(8), lambda: (torch.randn(4, 8, 5, 5) * 3).to(memory_format=torch.channels_last)),
    "tokens": (lambda cls: cls(24, dim=-1), lambda: torch.randn(3, 7, 24) * 3),
    "NC": (lambda cls: cls(8), lambda: torch.randn(5, 8) * 3),
    "scalar": (lambda cls: cls(), lambda: torch.randn(4, 8, 5, 5) * 3),
    "non-contiguous": (lambda cls: cls(8), lambda: (torch.randn(5, 5, 8, 4) * 3).permute(3, 2, 0, 1)),
}
MODULES = {"SALU": SALU, "SWALU": SWALU, "GALU": GALU,
           "SALU+SWALU": lambda *a, **k: SALUAct(SALU(*a, **k), SWALU(*a, **k)),
           "SALU+GALU": lambda *a, **k: SALUAct(SALU(*a, **k), GALU(*a, **k))}


def _randomise(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.uniform_(-1, 1) if name.endswith("log_a") else p.uniform_(-3, 0)
    return m


def _outputs(m, x, g, mode):
    """(y, dL/dx, dL/dparams...) of module ``m`` on ``x`` with upstream gradient ``g``, in kernel mode ``mode``."""
    kernels.set_kernel_mode(mode)
    xx = x.clone().requires_grad_()
    y = m(xx)
    return (y, *torch.autograd.grad(y, (xx, *m.parameters()), g))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("module", MODULES)
def test_cpp_matches_eager(module, layout):
    """The C++ kernels give the eager path's values and gradients (x and every parameter) on every layout."""
    make_module, make_x = LAYOUTS[layout]
    m = _randomise(make_module(MODULES[module]))
    x = make_x()
    g = torch.randn_like(x)
    cpp, eager = _outputs(m, x, g, "cpp"), _outputs(m, x, g, "eager")
    assert cpp[0].stride() == x.stride() or layout == "non-contiguous"
    for c, e in zip(cpp, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


# Each compiled specialisation costs seconds of inductor compilation (cold cache), so the compiled path is checked
# on every structure (single-stage SALU, single-stage gate here, pair, residual tail) and both gate kinds, not on
# every op: the logistic gate compiles in the pair (test_pair_matches_unfused_and_channels_last), the normal CDF here
# and in the residual tail (test_residual_tail_matches_unfused).
@pytest.mark.parametrize("module", ["SALU", "GALU"])
def test_compiled_matches_eager(module, compiled_kernels):
    m = _randomise(MODULES[module](8))
    x = torch.randn(4, 8, 5, 5) * 3
    g = torch.randn_like(x)
    for c, e in zip(_outputs(m, x, g, "compiled"), _outputs(m, x, g, "eager")):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


PAIR_SHAPE = (2, 8, 4, 4)  # the pair's input here and in check_one_compiled_call: one compiled specialisation


@pytest.mark.parametrize("mode", ["cpp", "compiled"])
def test_pair_matches_unfused_and_channels_last(mode):
    kernels.set_kernel_mode(mode)
    pair = SALUAct(SALU(8, a_init=0.7, b_init=0.3), SWALU(8))
    x = (torch.randn(*PAIR_SHAPE) * 2).to(memory_format=torch.channels_last).requires_grad_()
    y = pair(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.square().sum().backward()
    kernels.set_kernel_mode("eager")
    x2 = x.detach().contiguous().requires_grad_()
    y2 = pair.act(pair.norm(x2))
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_kernel_path_is_reported():
    kernels.set_kernel_mode("cpp")
    assert kernels.kernel_path("cpu").startswith("C++")
    kernels.set_kernel_mode("eager")
    assert "SALUNET_KERNELS=eager" in kernels.kernel_path("cpu")
    kernels.set_kernel_mode("compiled")
    assert kernels.kernel_path("cpu").startswith("compiled")
    with pytest.raises(ValueError, match="use one of"):
        kernels.set_kernel_mode("fast")
    kernels.set_kernel_mode("cpp")
    assert kernels._path_for(torch.device("meta")) == "eager"  # shape propagation only
    with pytest.raises(ValueError, match="CPU tensors only"):
        kernels._path_for(torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_lowp_input(dtype, path):
    """Under autocast a conv yields low-precision maps; SALU computes in float32 and returns the input dtype,
    with parameter gradients in float32."""
    check_autocast(dtype)


def check_autocast(dtype, device="cpu"):
    """test_autocast_lowp_input on ``device`` (tests/test_gpu.py runs it on CUDA)."""
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).to(device)
    act = SALUAct(SALU(8), SWALU(8)).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.autocast(torch.device(device).type, dtype=dtype):
        h = conv(x)
        y = act(h)
    assert h.dtype == dtype and y.dtype == dtype
    y.float().sum().backward()
    assert act.norm.log_a.grad.dtype == torch.float32 and torch.isfinite(act.norm.log_a.grad).all()
    ref = act.act(act.norm(h.detach().float()))
    # y is the float32 result rounded once to the input dtype: within one ulp of it
    torch.testing.assert_close(y.float(), ref, rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_saved_bytes_at_most_input(path):
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    nbytes = x.numel() * 4
    for m in (SALU(16), SWALU(16), GALU(16), SALUAct(SALU(16), GALU(16))):
        assert saved_bytes(m, x, list(m.parameters())) <= nbytes
    # the reference keeps several full-size intermediates: the measure can see the difference
    a, b = torch.ones(16, 1, 1, requires_grad=True), torch.ones(16, 1, 1, requires_grad=True)
    assert saved_bytes(lambda t: F.salu_reference(t, a, b), x, [a, b]) >= 3 * nbytes


def test_torch_compile_model_fullgraph():
    """A user's compiled model containing SALU layers compiles without graph breaks (fullgraph=True raises
    on any break) and matches eager."""
    from salunet.nn import SALUAddAct

    class Block(torch.nn.Module):  # a residual tail, as in the ResNets
        def __init__(self):
            super().__init__()
            self.conv, self.tail = torch.nn.Conv2d(4, 4, 3, padding=1), SALUAddAct(SALU(4), SWALU(4))

        def forward(self, x):
            return self.tail(self.conv(x), x)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), SALUAct(SALU(4), SWALU(4)), Block(),
                                torch.nn.Conv2d(4, 4, 3, padding=1), SALU(4), GALU(4))
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module", MODULES)
def test_cpp_edge_values_vectorised_along_channels(module, dtype):
    """Edge values through the C++ channel-vectorised loop (token layout), where each lane has its own
    parameters: same values, input gradients and per-lane parameter gradients as the eager path."""
    m = _randomise(MODULES[module](32, dim=-1))
    with torch.no_grad():  # include very large amplitudes (A = 1e3) in the first channels
        for name, p in m.named_parameters():
            p[:4] = math.log(10.0) if name.endswith("log_a") else math.log(1e-5)
    vals = _edge_values(dtype).float()
    x = vals[torch.randint(len(vals), (9, 32))].to(dtype)
    x[0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=dtype)
    g = torch.randn(x.shape, dtype=dtype)
    outs = {}
    for mode in ("cpp", "eager"):
        kernels.set_kernel_mode(mode)
        xx = x.clone().requires_grad_()
        y = m(xx)
        gx = torch.autograd.grad(y, xx, g)[0]
        # parameter gradients (the per-lane reductions) from the rows without inf/NaN inputs, |x| <= 1e20: at
        # x near the float max the true d/dlog_a of a gate (~ x pdf(A) A / 2) exceeds the float range itself
        xf = x[1:].float().clamp(-1e20, 1e20).to(dtype).requires_grad_()
        gps = torch.autograd.grad(m(xf), (xf, *m.parameters()), g[1:])[1:]
        outs[mode] = (y.float(), gx.float(), [t.float() for t in gps])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    y_c, y_e = outs["cpp"][0], outs["eager"][0]
    assert y_c[0, 2].isnan() and y_e[0, 2].isnan()
    fin = torch.isfinite(x.float()) & (x != 0)
    if module == "SALU":  # +-inf -> +-A exactly, everything else to float precision
        torch.testing.assert_close(y_c[0, :2], y_e[0, :2], rtol=tol, atol=tol)
        torch.testing.assert_close(y_c[fin], y_e[fin], rtol=tol, atol=tol)
    elif "+" in module:  # the gate acts on the bounded z = SALU(x): compare at z's scale, channel by channel
        scale = torch.where(fin, y_e.abs(), 0).amax(0)  # per channel (last dim)
        err, bound = (y_c - y_e).abs(), tol * (scale + y_e.abs())
        assert (err[fin] <= bound[fin]).all(), f"max err / bound {(err / bound)[fin].max().item():.3g}"
    else:  # gates agree to absolute precision (the C++ normal CDF is accurate to 3.5e-7, like ATen's GELU)
        xf = x.float()[fin]
        torch.testing.assert_close(y_c[fin] / xf, y_e[fin] / xf, rtol=0, atol=1e-6 if tol < 1e-3 else tol)
    gx_c, gx_e = outs["cpp"][1][1:], outs["eager"][1][1:]  # rows without inf/NaN inputs
    assert torch.isfinite(gx_c).all() and torch.isfinite(gx_e).all()
    torch.testing.assert_close(gx_c, gx_e, rtol=tol, atol=tol)
    for (name, _), gc, ge in zip(m.named_parameters(), outs["cpp"][2], outs["eager"][2]):
        assert torch.isfinite(gc).all() and torch.isfinite(ge).all(), name
        torch.testing.assert_close(gc, ge, rtol=tol, atol=tol, msg=name)


def test_backward_runs_the_forward_path_and_channels_last_3d():
    """The path is fixed at forward time: switching the mode before backward changes nothing (5-D
    channels_last_3d included, whose memory order the kernels must keep in backward)."""
    m = _randomise(SALUAct(SALU(6), GALU(6)))
    x = (torch.randn(2, 6, 3, 4, 5) * 2).to(memory_format=torch.channels_last_3d)
    g = torch.randn_like(x)

    def grads(fwd_mode, bwd_mode):
        kernels.set_kernel_mode(fwd_mode)
        xx = x.clone().requires_grad_()
        y = m(xx)
        kernels.set_kernel_mode(bwd_mode)
        return torch.autograd.grad(y, (xx, *m.parameters()), g)

    ref = {mode: grads(mode, mode) for mode in ("eager", "cpp")}
    # the two paths round differently (hardware rsqrt estimate, polynomial exp), so bitwise equality tells which
    # one ran the backward
    assert not all(torch.equal(a, b) for a, b in zip(ref["eager"], ref["cpp"]))
    for a, b in zip(ref["eager"], ref["cpp"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for fwd_mode, bwd_mode in (("eager", "cpp"), ("cpp", "eager")):
        assert all(torch.equal(a, b) for a, b in zip(grads(fwd_mode, bwd_mode), ref[fwd_mode])), (fwd_mode, bwd_mode)


def test_parameters_on_another_device_are_refused():
    m = SALU(4).to("meta")
    with pytest.raises(ValueError, match="move the module"):
        m(torch.randn(2, 4))


def test_cpp_double_backward_says_how():
    kernels.set_kernel_mode("cpp")
    x = torch.randn(3, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(SALU(4)(x).sum(), x, create_graph=False)  # first order works
    with pytest.raises(RuntimeError, match="SALUNET_KERNELS=eager"):
        torch.autograd.grad(SALU(4)(x).sum(), x, create_graph=True)
    kernels.set_kernel_mode("eager")  # the eager path differentiates its own backward
    (g1,) = torch.autograd.grad(SALU(4)(x).sum(), x, create_graph=True)
    g1.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("shape", [(3, 5000), (2, 3, 700), (64, 1, 1)])
def test_cpp_scalar_parameters_large_tensors(shape):
    """Scalar parameters split the tensor into blocks that threads share; sums over blocks stay exact."""
    m = _randomise(SWALU())
    x = torch.randn(shape) * 3
    outs = {}
    for mode in ("cpp", "eager"):
        kernels.set_kernel_mode(mode)
        xx = x.clone().requires_grad_()
        y = m(xx)
        outs[mode] = (y, *torch.autograd.grad(y.square().sum(), (xx, *m.parameters())))
    for c, e in zip(outs["cpp"], outs["eager"]):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["eager", "cpp"])
def test_galu_left_tail_keeps_its_sign(path):
    """At GALU's default init (A = 10) Phi(-A) ~ 7.6e-24 is tiny but not 0: x * Phi(SALU(x)) for x = -inf is
    -inf and for x = -1e20 a small negative number, on every path (not NaN, not 0)."""
    kernels.set_kernel_mode(path)
    y = GALU()(torch.tensor([-float("inf"), -1e20]))
    assert y[0].item() == -float("inf") and y[1].item() < 0


@pytest.mark.parametrize("make", [
    lambda: torch.empty(2, 3, 4, 5), lambda: torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last),
    lambda: torch.empty(2, 3, 1, 1).to(memory_format=torch.channels_last), lambda: torch.empty(1, 3, 4, 1),
    lambda: torch.empty(2, 3, 2, 4, 5).to(memory_format=torch.channels_last_3d), lambda: torch.empty(4, 6)[:, ::2],
    lambda: torch.empty(5, 4).t(), lambda: torch.empty(3, 7, 24)])
def test_layout_matches_memory_order(make):
    """The cached (outer, C, inner) layout agrees with torch's contiguity and never claims a non-dense tensor."""
    x = make()
    for axis in (None, 1, x.dim() - 1):
        lay = kernels._layout(tuple(x.shape), x.stride(), axis)
        cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        dense = x.is_contiguous() or (cl is not None and x.is_contiguous(memory_format=cl))
        if not dense:
            assert lay is None
            continue
        if lay is None:  # channels_last with channels off dim 1: the caller copies to contiguous
            assert not x.is_contiguous() and axis not in (None, 1)
            continue
        outer, C, inner = lay
        assert outer * C * inner == x.numel()
        if axis is not None:
            assert C == x.shape[axis]


# the compiled path's math is the eager path's: one layout and one gate pay its compilations (the logistic gate
# compiles in test_pair_matches_unfused_and_channels_last; see test_compiled_matches_eager)
_TAIL_CASES = [(act, layout, mode) for act in (SWALU, GALU) for layout in ("NCHW", "channels_last", "tokens")
               for mode in ("cpp", "eager")] + [(GALU, "channels_last", "compiled")]


@pytest.mark.parametrize("act, layout, mode", _TAIL_CASES, ids=[f"{l}-{m}-{a.__name__}" for a, l, m in _TAIL_CASES])
def test_residual_tail_matches_unfused(act, mode, layout):
    """SALUAddAct(x, r) == act(norm(x) + r) in value and in the gradients of x, r and every parameter, on every
    path and layout (the residual may arrive in another layout than x); the compiled path (CUDA's default, the same
    math as eager, run whole by inductor) on the layout where a residual may arrive in another layout than x."""
    from salunet.nn import SALUAddAct

    dim = -1 if layout == "tokens" else 1
    m = _randomise(SALUAddAct(SALU(8, dim=dim), act(8, dim=dim)))
    x = torch.randn(3, 7, 8) * 3 if layout == "tokens" else torch.randn(2, 8, 5, 5) * 3
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    r = torch.randn(x.shape)  # contiguous even when x is channels_last
    g = torch.randn(x.shape)
    outs = {}
    for which in ("fused", "unfused"):
        kernels.set_kernel_mode(mode if which == "fused" else "eager")
        xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = m(xx, rr) if which == "fused" else m.act(m.norm(xx) + rr)
        outs[which] = (y, *torch.autograd.grad(y, (xx, rr, *m.parameters()), g))
    for a, b in zip(outs["fused"], outs["unfused"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_float64_galu_keeps_its_left_tail(path):
    """float64 GALU far left: x Phi(s) with Phi(s) ~ 1e-23, never 0 (0.5 + 0.5 erf(s / sqrt 2) cancels there,
    0.5 erfc(-s / sqrt 2) does not); -inf gives -inf; and dL/dx = Phi(s) + x Phi'(s) dSALU/dx keeps its sign."""
    a, b = 1.0, 0.01  # A = 10
    xs = [-float("inf"), -1e300, -300.0, -30.0, -3.0]
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    y = F.galu(x, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    (gx,) = torch.autograd.grad(y.sum(), x)
    sab, amp = math.sqrt(a * b), math.sqrt(a / b)
    for i, xv in enumerate(xs):
        t = xv * sab
        q = math.copysign(1 / math.sqrt(1 + 1 / (t * t)), t)  # t / sqrt(1 + t^2) without overflow
        s = amp * q
        cdf = 0.5 * math.erfc(-s / math.sqrt(2))
        assert y[i].item() == (pytest.approx(xv * cdf, rel=1e-12) if math.isfinite(xv) else xv), (xv, y[i])
        if math.isfinite(xv):
            pdf = math.exp(-s * s / 2) / math.sqrt(2 * math.pi)
            expect = cdf + xv * pdf * a * (1 - q * q) ** 1.5  # dSALU/dx = a r^3, r^2 = 1 - q^2
            assert gx[i].item() == pytest.approx(expect, rel=1e-9, abs=1e-300), (xv, gx[i])


def test_compiled_path_runs_each_direction_in_one_compiled_call():
    """In channels_last, the specialisations test_pair_matches_unfused_and_channels_last compiles (no compilation of
    its own in the suite): no layout copy around the compiled calls either."""
    check_one_compiled_call(memory_format=torch.channels_last)


def check_one_compiled_call(device="cpu", memory_format=torch.contiguous_format):
    """The compiled path compiles the whole forward and backward, parameter preparation and the reduction of
    parameter gradients included: around the compiled calls only views and autograd's gradient accumulation
    remain, no eager compute op. Before, ~70 small eager ops per forward + backward surrounded the compiled core;
    on an H200 issuing the op took the host 5x the kernels' own time (issue 13). tests/test_gpu.py runs it on
    CUDA."""
    import collections

    kernels.set_kernel_mode("compiled")
    pair = SALUAct(SALU(8), SWALU(8)).to(device)
    x = torch.randn(PAIR_SHAPE, device=device).to(memory_format=memory_format).requires_grad_()
    g = torch.randn(PAIR_SHAPE, device=device).to(memory_format=memory_format)
    for _ in range(2):  # compiles both directions
        x.grad = None
        pair(x).backward(g)
    x.grad = None
    with torch.profiler.profile() as prof:
        pair(x).backward(g)
    ops = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    assert set(ops) <= {"aten::view", "aten::reshape", "aten::detach", "aten::add_", "aten::zeros_like"}, ops
    assert x.grad is not None and all(p.grad is not None for p in pair.parameters())


def test_compiled_regions_return_the_derived_quantities_for_inductor_to_store():
    """The compiled regions return the parameters' prepared and derived quantities as one extra output (so inductor
    stores them once in per-channel buffers; left inside, it recomputed them for every element, which made the
    fused forward compute-bound on an H200), equal to what the eager math derives: exp of the clamped logs, then
    sqrt(ab), sqrt(a/b), a, 1/sqrt(ab), sqrt(a/b)/2b (float64 references)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    c = 8
    la = torch.randn(4, c, 1, 1, dtype=torch.float64) * 3
    la[0, 0] = 99.0  # clamped to LOG_LIMIT
    x = torch.randn(2, c, 4, 4, dtype=torch.float64)
    fn = torch.compile(kernels._forward_region, backend=record, fullgraph=True, dynamic=False)
    y, stored = fn("salu_swalu", True, x, None, *la)
    assert len(graphs) == 1 and len(graphs[0].graph.find_nodes(op="output")[0].args[0]) == 2
    torch.testing.assert_close(y, kernels._forward_math("salu_swalu", True, x, None, *la), rtol=0, atol=0)
    lc = la.clamp(-kernels.LOG_LIMIT, kernels.LOG_LIMIT)
    want = [lc[i].exp() for i in range(4)]  # a1, b1, a2, b2, then each stage's five derived quantities
    for i in (0, 2):
        a, b = want[i], want[i + 1]
        want += [torch.sqrt(a * b), torch.sqrt(a / b), a, 1 / torch.sqrt(a * b), torch.sqrt(a / b) / (2 * b)]
    torch.testing.assert_close(stored, torch.cat([t.reshape(-1) for t in want]), rtol=1e-14, atol=0)
    gx, gres, *gp, stored_b = kernels._backward_region("salu_swalu", True, torch.ones_like(x), x, None, *la)
    assert gres is None and len(gp) == 4 and torch.equal(stored_b, stored)
    # float32 at the clamp's ends: finite, within float32 rounding of the float64 values
    ends = torch.tensor([-30.0, 30.0, 30.0, -30.0, 0.5, -2.0]).reshape(-1, 1, 1)
    for lo, hi in ((0, 1), (2, 3), (4, 5)):
        _, d32 = kernels._prepare(True, torch.float32, [ends[lo], ends[hi]])
        want = kernels._derive(ends[lo].double().exp(), ends[hi].double().exp())
        for got, ref in zip(d32, want):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.double(), ref, rtol=5e-7, atol=0)


def test_compiled_path_stores_no_derived_quantities_of_full_size_parameters():
    """Parameters as large as x (the functional API allows any broadcastable shape) are not stored beside the
    result: that would write 7x x's size only to drop it."""
    kernels.set_kernel_mode("compiled")
    try:
        x = torch.randn(2, 3, 4, 5)
        a, b = torch.rand(2, 3, 4, 5) + 0.5, torch.rand(2, 3, 4, 5) + 0.5
        y = F.salu(x, a, b)
    finally:
        kernels.set_kernel_mode("auto")
    torch.testing.assert_close(y, a * x / torch.sqrt(1 + a * b * x * x))
    keys = [k for k in kernels._compiled if k[0] == "fwd" and k[1] == "salu" and k[4][2][1] == (2, 3, 4, 5)]
    assert keys and not any(k[3] for k in keys)


@pytest.mark.parametrize("realize", [True, False], ids=["stored", "inlined"])
def test_compiled_path_gives_the_same_results_whether_derived_quantities_are_stored(monkeypatch, realize):
    """kernels.REALIZE_DERIVED picks what the compiled path compiles (scripts/profile_op.py --forms compares both
    on a device); either way the caller gets the op's output and gradients alone, equal to the eager path's."""
    monkeypatch.setattr(kernels, "REALIZE_DERIVED", realize)
    torch.manual_seed(3)
    pair = SALUAct(SALU(8), SWALU(8))
    with torch.no_grad():
        for p in pair.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, g = torch.randn(PAIR_SHAPE), torch.randn(PAIR_SHAPE)
    out = {}
    try:
        for mode in ("eager", "compiled"):
            kernels.set_kernel_mode(mode)
            xi = x.clone().requires_grad_()
            pair.zero_grad()
            y = pair(xi)
            y.backward(g)
            out[mode] = [y.detach(), xi.grad, *[p.grad.clone() for p in pair.parameters()]]
    finally:
        kernels.set_kernel_mode("auto")
    for e, c in zip(out["eager"], out["compiled"]):
        assert e.shape == c.shape
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    keys = [k for k in kernels._compiled if k[1] == "salu_swalu" and k[4][0][1] == PAIR_SHAPE]  # x's / g's shape
    assert {k[0] for k in keys if k[3] == realize} == {"fwd", "bwd"}
    assert all(getattr(kernels._compiled[k], "keeps_derived", False) == k[3] for k in keys)


def test_only_a_failed_compilation_switches_to_eager(monkeypatch):
    """auto mode: a specialisation whose first (compiling) call fails -> warn once, eager on that device type;
    out-of-memory, or an error of a kernel that has already run, is raised (never a silent, lasting fallback)."""
    monkeypatch.setattr(kernels, "_compile_failed", {})
    monkeypatch.setattr(kernels, "_compiled_ran", set())
    monkeypatch.setattr(kernels, "_reported", set())
    kernels.set_kernel_mode("auto")
    x = torch.randn(4, 3)
    args = (x, None, torch.tensor(1.0), torch.tensor(0.5))
    expect = kernels._forward_math("salu", False, *args)
    calls = []

    def compiled(kind):
        def fn(op, log_params, *args):
            calls.append(kind)
            if kind == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory")
            if kind == "later" and calls.count("later") > 1:
                raise RuntimeError("device-side assert")
            if kind == "broken":
                raise RuntimeError("inductor: C compiler not found")
            return kernels._forward_math(op, log_params, *args)
        return fn

    for kind in ("oom", "later"):
        fn = compiled(kind)
        monkeypatch.setattr(kernels, "_get_compiled", lambda *a, fn=fn: fn)
        if kind == "later":
            torch.testing.assert_close(kernels._call_core("compiled", "fwd", "salu", False, *args), expect)
        with pytest.raises((torch.OutOfMemoryError, RuntimeError)):
            kernels._call_core("compiled", "fwd", "salu", False, *args)
    assert kernels._compile_failed == {}
    monkeypatch.setattr(kernels, "_get_compiled", lambda *a: compiled("broken"))
    with pytest.warns(RuntimeWarning, match="could not build the fused SALU kernels on cpu"):
        y = kernels._call_core("compiled", "fwd", "salu", False, *args)
    torch.testing.assert_close(y, expect)
    assert list(kernels._compile_failed) == ["cpu"]
    assert kernels._path_for(torch.device("cuda")) == "compiled"  # per device type: CUDA is not judged by CPU


def test_residual_tail_of_a_tensor_with_itself_compiles_fullgraph():
    """act(SALU(h) + h), input and residual one tensor: dynamo refused the autograd.Function given one tensor
    twice ("duplicate tensor input") under fullgraph=True; the compiled model now matches eager, gradients too."""
    from salunet.nn import SALUAddAct

    torch.manual_seed(0)
    m = SALUAddAct(SALU(4), SWALU(4))
    f = torch.compile(lambda h: m(h, h), fullgraph=True, backend="aot_eager")
    h = torch.randn(2, 4, 3, 3, requires_grad=True)
    y = f(h)
    y.sum().backward()
    h2 = h.detach().clone().requires_grad_()
    y2 = m(h2, h2)
    y2.sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(h.grad, h2.grad)


def test_inference_calls_record_no_autograd_node(monkeypatch):
    """Under no_grad, or with no input that requires grad, a fused call runs its path's forward alone (no autograd
    Function, whose overhead an eager model's inference on a GPU pays per call): the same values, no graph; with
    grad mode and a parameter that requires grad, the Function runs."""
    kernels.set_kernel_mode("eager")
    m = _randomise(SALUAct(SALU(3), SWALU(3)))
    x = torch.randn(2, 3, 4, 4)
    want = m(x)
    assert want.grad_fn is not None  # the parameters require grad
    calls = []
    apply = kernels.FusedFn.apply
    monkeypatch.setattr(kernels.FusedFn, "apply", lambda *a: calls.append(1) or apply(*a))
    with torch.no_grad():
        got = m(x)
    assert got.grad_fn is None and not calls
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    m.requires_grad_(False)
    assert m(x).grad_fn is None and not calls  # nothing requires grad: no node either
    assert m(x.requires_grad_()).grad_fn is not None and len(calls) == 1
