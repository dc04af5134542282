"""Fused, numerically safe kernels for SALU, SWALU, GALU and the SALU->gate pairs.

Paper: "SaluNet: Enabling Total Plasticity in Normalization-Free Deep Networks" (arXiv 2606.02927).

    SALU(x; a, b) = a x / sqrt(1 + a b x^2)

Numerics. The plain formula overflows: once a*b*x^2 is inf, x * rsqrt(inf) = 0 and SALU collapses to 0
instead of its saturation value A = sqrt(a/b). We evaluate it in the rescaled form

    t = clamp(x * sqrt(ab), -T, T),  r = rsqrt(1 + t^2),  q = t * r  (|q| < 1),  y = A * q

T (1e18 in float32, 1e150 in float64) is far beyond the point where t * r rounds to +-1, so the clamp never
changes a result, and t^2 never overflows. NaN passes through (clamp propagates NaN), +-inf gives +-A.
Every derivative is written in the bounded quantities q and r (docs/SPEC.md section 1 gives the raw forms):

    dy/dx = a r^3,   dy/da = w q (r^2 + q^2 / 2),   dy/db = -(A / 2b) q^3,    w = 1/sqrt(ab)

so that backward needs only x and the parameters: the fused path saves nothing else.
float16 / bfloat16 inputs are computed in float32 and returned in their own dtype; float64 stays float64.

Gates (docs/SPEC.md **[decided]**): SWALU(x) = x * sigmoid(SALU(x)), GALU(x) = x * Phi(SALU(x)).

Execution. The math below is plain tensor code; :class:`FusedFn` (a custom autograd Function) runs it on one
of four paths, chosen by ``set_kernel_mode`` / ``SALUNET_KERNELS``:

- ``cpp`` (``auto`` on CPU): the same math hand-written in ``csrc/salu_cpu.cpp`` with ATen's vector types, one
  pass over memory per direction, parameter gradients reduced in per-thread accumulators; built once per
  machine (:mod:`salunet.nn.cpu_ext`). This is what makes SALU+SWALU cheaper than BatchNorm+ReLU on CPU. The
  backward of ``--salu-project-grad`` takes this path too (:func:`radial_project`; elsewhere it runs op by op,
  and inside a compiled graph inductor fuses it).
  In float32 it uses fast approximations: hardware reciprocal / rsqrt estimates with one Newton step (a few
  ulp), ATen's polynomial exp, and Abramowitz-Stegun 7.1.26 for the normal CDF (gate absolute error < 3.5e-7,
  the precision of ATen's vectorised GELU); float64 uses exact operations (gradcheck runs on this path).
- ``compiled`` (``auto`` on CUDA): ``torch.compile``/inductor of the whole forward and the whole backward
  (:func:`_forward_math`, :func:`_backward_math`: parameter preparation and gradient reduction included), one
  compiled call per direction, so that the host issues little besides the kernels; the per-channel derived
  quantities are returned beside the result so that inductor stores them once (:data:`REALIZE_DERIVED`).
- ``triton`` (CUDA; chosen explicitly): the same math hand-written in Triton (:mod:`salunet.nn.triton_kernels`),
  launched directly (cached compiled kernels after a specialisation's first call): one kernel forward, two
  backward, where a compiled region costs the host about half a millisecond per call. On an H200 its kernels took
  0.22x BatchNorm2d + ReLU's device time, but an op called alone was host-bound (docs/BENCHMARKS.md); it becomes
  ``auto``'s choice on CUDA (:data:`AUTO_CUDA`) once a GPU measures the direct launch faster (docs/GPU.md).
- ``eager``: the functions below op by op.
If the chosen path cannot be built on this machine, ``auto`` warns once, says why and how to fix it, and takes the
eager path.
Inside a model that the user compiles, the math is traced inline so that inductor can fuse it with its
neighbours (no graph break). While a graph is recorded for deployment (``torch.jit.trace``, ``torch.export``,
either ONNX exporter) every path gives way to :func:`recorded`, the same math as plain ops, so that the graph
holds the math and never an opaque kernel call (``salunet.export``; README "Deployment").
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import types
import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import cpu_ext

__all__ = ["OPS", "LOG_LIMIT", "FusedFn", "TritonFn", "fused", "recorded", "get_kernel_mode", "set_kernel_mode",
           "using_kernel_mode", "kernel_path", "radial_project_in_cpp", "radial_project"]

log = logging.getLogger("salunet.kernels")

OPS = ("salu", "swalu", "galu", "salu_swalu", "salu_galu", "salu_add_swalu", "salu_add_galu")
_NPARAMS = {"salu": 2, "swalu": 2, "galu": 2, "salu_swalu": 4, "salu_galu": 4, "salu_add_swalu": 4, "salu_add_galu": 4}
RESIDUAL_OPS = ("salu_add_swalu", "salu_add_galu")  # gate(SALU(x) + residual): a residual block's tail
LOG_LIMIT = 30.0  # |log a|, |log b| are clamped to this: a, b in [1e-13, 1e13]
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------------------
# math (pure tensor functions, all inputs already in the compute dtype)

def _clamp_limit(dtype: torch.dtype) -> float:
    return 1e150 if dtype == torch.float64 else 1e18


def _derive(a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
    """Per-parameter quantities, computed once on the (small) parameter tensors, not per element:
    (sqrt(ab), A = sqrt(a/b), a, w = 1/sqrt(ab), A/2b)."""
    sab = torch.sqrt(a * b)
    amp = torch.sqrt(a / b)
    return sab, amp, a, 1.0 / sab, 0.5 * amp / b


def _saturation(dtype: torch.dtype) -> float:
    """|t| from which the exact q = t / sqrt(1 + t^2) rounds to +-1 in ``dtype``'s compute precision: 1 - q is
    about 1 / (2 t^2), under half an ulp below 1 once t^2 > 2^24 (float32) or 2^53 (float64); a power of two
    above that, with margin."""
    return 2.0**28 if dtype == torch.float64 else 2.0**13


def _salu_terms(x: Tensor, sab: Tensor):
    """Return (r, q) of the rescaled form; see the module docstring.

    q is exactly +-1 where its exact value rounds to that (|t| past :func:`_saturation`) and never outside
    [-1, 1]: Triton's float32 rsqrt is an approximation (a few ulp), so t * r alone can land just above 1 or
    just below it at saturation, and SALU(+-inf) would miss +-A (seen on an H200, issue 13)."""
    lim = _clamp_limit(x.dtype)
    t = torch.clamp(x * sab, -lim, lim)
    r = torch.rsqrt(1.0 + t * t)
    q = torch.where(t.abs() >= _saturation(x.dtype), torch.sign(t), torch.clamp(t * r, -1.0, 1.0))
    return r, q


def _salu_fwd(x, d):
    _, q = _salu_terms(x, d[0])
    return d[1] * q


def _salu_bwd(g, x, d):
    """Return (dL/dx, dL/da, dL/db), the last two unreduced (shape of x)."""
    sab, amp, a, w, hb = d
    r, q = _salu_terms(x, sab)
    r2 = r * r
    gx = g * (a * r2 * r)
    ga = g * (w * q * (r2 + 0.5 * q * q))
    gb = g * (-hb * q * q * q)
    return gx, ga, gb


def _gate(s: Tensor, kind: str, elementary: bool = False):
    """Return (p(s), p'(s)) for the gate kind: logistic (SWALU) or standard normal CDF (GALU).
    Phi(s) = erfc(-s/sqrt 2)/2 keeps relative precision in the left tail, where 0.5 + 0.5 erf(.) cancels to 0
    for s < -5.5 (A = sqrt(a/b) is 10 at GALU's default init, so such s occur), which would turn
    GALU(-inf) = -inf * Phi(-A) into NaN. ``elementary``: erfc from elementary ops (:func:`_erfc_elementary`),
    for recorded graphs (ONNX has no erfc)."""
    if kind == "sigmoid":
        p = torch.sigmoid(s)
        return p, p * (1.0 - p)
    z = -s * _INV_SQRT2
    p = 0.5 * (_erfc_elementary(z) if elementary else torch.erfc(z))
    return p, torch.exp(-0.5 * s * s) * _INV_SQRT_2PI


# erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0: the Chebyshev fit of Press et al., Numerical Recipes
# (2nd ed., section 6.2), relative error < 1.2e-7 for every z >= 0, tails included (in float32 the rounding of
# z^2 and of the polynomial makes it < 1e-5: measured 1.1e-6 for z < 3, 7.7e-6 at z = 9)
_ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
                1.48851587, -0.82215223, 0.17087277)


def _erfc_elementary(z: Tensor) -> Tensor:
    """erfc from exp, mul, add, div and where only (relative error < 1.2e-7 in float64, < 1e-5 in float32, also
    far in the tail, so that Phi(-A) stays > 0 and GALU(-inf) = -inf as on the other paths). Used where a graph
    is recorded for export: the ONNX operator set has Erf but no Erfc, and 1 - erf(z) cancels to 0 in the tail."""
    az = z.abs()
    t = 1.0 / (1.0 + 0.5 * az)
    poly = torch.full_like(t, _ERFC_COEFFS[-1])
    for c in _ERFC_COEFFS[-2::-1]:
        poly = poly * t + c
    y = t * torch.exp(poly - az * az)
    return torch.where(z < 0, 2.0 - y, y)


def _gate_fwd(x, d, kind, elementary: bool = False):
    p, _ = _gate(_salu_fwd(x, d), kind, elementary)
    return x * p


def _gate_bwd(g, x, d, kind):
    sab, amp, a, w, hb = d
    r, q = _salu_terms(x, sab)
    p, dp = _gate(amp * q, kind)
    r2 = r * r
    # x * ds/dx = x a r^3 = A q r^2 (bounded), so dL/dx never forms x * r^3 from a huge x
    gx = g * (p + dp * amp * q * r2)
    gxd = g * x * dp
    ga = gxd * (w * q * (r2 + 0.5 * q * q))
    gb = gxd * (-hb * q * q * q)
    return gx, ga, gb


_GATE_KIND = {"swalu": "sigmoid", "galu": "normal", "salu_swalu": "sigmoid", "salu_galu": "normal",
              "salu_add_swalu": "sigmoid", "salu_add_galu": "normal"}


def _fwd_core(op: str, x: Tensor, res: Tensor | None, *d: Tensor, elementary: bool = False) -> Tensor:
    """Forward on compute-dtype ``x`` (and ``res``, the residual of RESIDUAL_OPS, else None) and the derived
    quantities ``d`` (5 per SALU stage); ``elementary``: see :func:`_gate`."""
    if op == "salu":
        return _salu_fwd(x, d)
    if op in ("swalu", "galu"):
        return _gate_fwd(x, d, _GATE_KIND[op], elementary)
    z = _salu_fwd(x, d[:5])
    if res is not None:
        z = z + res
    return _gate_fwd(z, d[5:], _GATE_KIND[op], elementary)


def _bwd_core(op: str, g: Tensor, x: Tensor, res: Tensor | None, *d: Tensor):
    """Return (dL/dx, dL/dres or None, dL/da1, dL/db1[, dL/da2, dL/db2]), parameter gradients reduced to the
    derived quantities' shapes."""
    gres = None
    if op == "salu":
        gx, ga, gb = _salu_bwd(g, x, d)
        gps = [ga, gb]
    elif op in ("swalu", "galu"):
        gx, ga, gb = _gate_bwd(g, x, d, _GATE_KIND[op])
        gps = [ga, gb]
    else:
        z = _salu_fwd(x, d[:5])  # recomputed: only x (and the residual) are kept for backward
        if res is not None:
            z = z + res
        gz, ga2, gb2 = _gate_bwd(g, z, d[5:], _GATE_KIND[op])
        gres = gz if res is not None else None
        gx, ga1, gb1 = _salu_bwd(gz, x, d[:5])
        gps = [ga1, gb1, ga2, gb2]
    # reduce over the broadcast dims here (fused into the kernel); the last step to each parameter's own
    # shape happens outside, on small tensors
    shapes = [d[0].shape, d[0].shape] + ([d[5].shape, d[5].shape] if len(d) > 5 else [])
    return (gx, gres, *[gp.sum_to_size(shp) for gp, shp in zip(gps, shapes)])


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare(log_params: bool, cdt: torch.dtype, params: Sequence[Tensor]):
    """Parameters in the compute dtype (exponentiated if log-parametrised) and their derived quantities."""
    ps = [p.to(cdt) for p in params]
    if log_params:
        # clamped so that a and b stay positive and finite whatever an optimizer does to log_a / log_b;
        # backward multiplies by this clamped value (straight-through), so a parameter pushed out of range
        # still receives gradient and can come back
        ps = [torch.exp(torch.clamp(p, -LOG_LIMIT, LOG_LIMIT)) for p in ps]
    derived = []
    for i in range(0, len(ps), 2):
        derived += _derive(ps[i], ps[i + 1])
    return ps, derived


# ----------------------------------------------------------------------------------------------------------
# execution paths: C++ (CPU), compiled (inductor), Triton (CUDA), eager

_MODES = ("auto", "cpp", "compiled", "triton", "eager")
_mode = os.environ.get("SALUNET_KERNELS", "auto").strip().lower() or "auto"
if _mode not in _MODES:
    raise ValueError(f"SALUNET_KERNELS={_mode!r} is not a kernel mode; use one of {', '.join(_MODES)}")
# torch.export (and the dynamo ONNX exporter) since torch 2.5; on 2.4, non-strict export reports itself as
# compiling, which traces the same math inline through FusedFn
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
_compile_failed: dict[str, str] = {}  # device type -> reason, once compilation failed there in auto mode
_compiled_ran: set[int] = set()  # compiled specialisations that have run once (compiled) successfully
_compiled: dict[tuple, Callable] = {}
_reported: set[str] = set()
_OP_CODE = {op: i for i, op in enumerate(OPS)}  # must match enum Op in csrc/salu_cpu.h


def set_kernel_mode(mode: str) -> None:
    """Choose how fused kernels execute (also settable with the environment variable ``SALUNET_KERNELS``):

    - ``auto`` (default): the C++ kernels on CPU tensors, ``torch.compile`` (Triton) on CUDA and other
      devices; if that path cannot be built on this machine, warn once, say why, and run eagerly;
    - ``cpp``: the C++ kernels (CPU tensors only); an error if they cannot be built;
    - ``compiled``: ``torch.compile``/inductor on every device (one compilation per input shape);
    - ``triton``: salunet's hand-written Triton kernels (CUDA tensors; CPU tensors only under Triton's interpreter,
      ``TRITON_INTERPRET=1``, for tests); an error where they cannot run;
    - ``eager``: the same math op by op (slowest; no build step).
    """
    global _mode
    mode = str(mode).strip().lower()
    if mode not in _MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; use one of {', '.join(_MODES)}")
    _mode = mode


def get_kernel_mode() -> str:
    return _mode


@contextlib.contextmanager
def using_kernel_mode(mode: str):
    """``with using_kernel_mode("triton"): y = model(x)``: the mode for the block, the previous one after it. A
    backward runs the path its forward took, whatever the mode is then."""
    old = _mode
    set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(old)


# auto's path for CUDA tensors outside a compiled region: "compiled" (inductor) until a GPU measures the Triton
# kernels faster for an op called alone (docs/GPU.md), "triton" then; with "triton", what the Triton kernels refuse
# (parameters varying along several axes, no triton installed) takes the compiled path, and says so once.
AUTO_CUDA = "compiled"


def _compiled_or_eager(device: torch.device) -> str:
    """auto's path on a non-CPU device: compiled, unless torch.compile already failed there."""
    return "eager" if device.type in _compile_failed else "compiled"


def _path_for(device: torch.device) -> str:
    """The path (``cpp`` / ``compiled`` / ``triton`` / ``eager``) that the current mode takes on ``device``."""
    if _mode == "eager" or device.type == "meta":  # meta tensors: shapes only, the math traces as is
        return "eager"
    if _mode == "compiled":
        return "compiled"
    if _mode == "triton":
        why = _triton().unavailable_reason(device)
        if why is not None:
            raise ValueError(f"salunet: kernel mode 'triton': {why} (or choose another path: SALUNET_KERNELS=auto)")
        return "triton"
    if device.type == "cpu":
        if cpu_ext.load() is not None:
            return "cpp"
        if _mode == "cpp":
            raise RuntimeError(f"salunet: {cpu_ext.load_error()} (or choose another path: SALUNET_KERNELS=compiled "
                               "or eager)")
        _warn_fallback(cpu_ext.load_error())
        return "eager"
    if _mode == "cpp":
        raise ValueError(f"salunet: kernel mode 'cpp' runs CPU tensors only, got a tensor on {device}; "
                         "use 'auto' or 'compiled'")
    if device.type == "cuda" and AUTO_CUDA == "triton":
        why = _triton().unavailable_reason(device)
        if why is None:
            return "triton"
        _log_once(f"the Triton kernels cannot run ({why}); CUDA tensors take the {_compiled_or_eager(device)} path")
    return _compiled_or_eager(device)


def _warn_fallback(problem: str) -> None:
    """Warn once per problem that ``auto`` mode runs eagerly; ``problem`` says what failed and how to fix it."""
    if problem in _reported:
        return
    _reported.add(problem)
    warnings.warn(f"salunet: {problem}. Until then the kernels run op by op (the eager path, several times "
                  "slower).", RuntimeWarning, stacklevel=5)


def kernel_path(device: torch.device | str = "cpu") -> str:
    """Describe the path that fused kernels take on ``device`` right now (for logs and benchmarks)."""
    dev = torch.device(device)
    path = _path_for(dev)
    if path == "cpp":
        return f"C++ (salunet CPU extension, {cpu_ext.capability()})"
    if path == "compiled":
        backend = "C++/OpenMP" if dev.type == "cpu" else "Triton" if dev.type == "cuda" else dev.type
        return f"compiled (torch.compile/inductor, {backend})"
    if path == "triton":
        how = "Triton's interpreter" if dev.type == "cpu" else f"Triton {_triton().triton.__version__}"
        return f"triton (salunet's hand-written kernels, {how})"
    why = ("SALUNET_KERNELS=eager" if _mode == "eager" else f"torch.compile failed: {_compile_failed.get(dev.type)}"
           if dev.type != "cpu" else f"C++ build failed: {cpu_ext.load_error()}")
    return f"eager (op by op; {why})"


def _report(device: torch.device) -> None:
    key = ("path", device.type)
    if key not in _reported:
        _reported.add(key)
        log.info("salunet kernels on %s: %s", device.type, kernel_path(device))


def _fresh_copy(fn: Callable, tag: int) -> Callable:
    """A copy of ``fn`` with its own code object: dynamo caches (and counts recompiles) per code object,
    so each compiled specialisation below gets its own cache instead of sharing one limited to 8 entries."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__  # FunctionType takes positional defaults only
    return copy


REALIZE_DERIVED = True
"""The compiled path's regions return the parameters' prepared and derived quantities (per channel, a few bytes)
beside their result, which makes inductor store them once in small buffers that the elementwise kernels read:
left inside, inductor recomputes them for every element (it inlines a small broadcast producer into each
reader). Read when a specialisation is compiled (part of its cache key); ``scripts/profile_op.py --forms``
measures both settings on one device. Only parameters at most an eighth of x's size are stored. Checked on torch
2.13 (the generated loop reads the stored values); another torch may lower the concatenation differently and
recompute them again: the same results, without the gain."""


def _get_compiled(direction: str, op: str, log_params: bool, args: Sequence[Tensor | None]):
    """The compiled whole forward or backward (:func:`_forward_math` / :func:`_backward_math`, or with
    :data:`REALIZE_DERIVED` their regions that also return the derived quantities) for these inputs."""
    x, params = (args[0], args[2:]) if direction == "fwd" else (args[1], args[3:])
    # only per-channel-sized parameters: the functional API takes parameters of any broadcastable shape, up to
    # x's own, whose derived quantities would be stored (7-14x x's size) only to be dropped
    realize = REALIZE_DERIVED and all(p.numel() * 8 <= x.numel() for p in params)
    key = (direction, op, log_params, realize,
           tuple(None if t is None else (t.dtype, tuple(t.shape), t.stride(), t.device) for t in args))
    fn = _compiled.get(key)
    if fn is None:
        # One static-shape kernel per (op, dtypes, shapes, layouts, device): inductor turns static shapes into
        # loops about 1.6x faster than dynamic-shape ones for the per-channel reductions of backward. Each
        # costs one compilation (seconds, cached on disk by inductor across runs).
        fn = torch.compile(_fresh_copy((_REGIONS if key[3] else _MATH)[direction], len(_compiled)), dynamic=False,
                           fullgraph=True)
        fn.keeps_derived = key[3]
        _compiled[key] = fn
        if len(_compiled) in (64, 256, 1024):
            log.warning("salunet kernels: %d compiled specialisations so far; inputs of ever-changing "
                        "shape recompile each time, consider SALUNET_KERNELS=eager or cpp", len(_compiled))
    return fn


def _call_core(path: str, direction: str, op: str, log_params: bool, *args: Tensor | None):
    """Run the whole forward (``args`` = x, res, *params) or backward (g, x, res, *params) on ``path``
    ("compiled" or "eager").

    The compiled path compiles the whole direction, the parameters' preparation (exp of log-parameters, the
    derived quantities), the dtype casts and the reduction of parameter gradients to their shapes included: one
    compiled call per direction. Compiling only the elementwise core left ~70 small eager ops per forward +
    backward around it; on an H200, issuing the op (those and the two compiled calls) took the host 5x the
    kernels' own time (issue 13, scripts/profile_op.py).

    In ``auto`` mode a failure of a specialisation's *first* call (when inductor compiles it) means this machine
    cannot compile for that device type: warn once, and run eagerly there from then on. Anything else (out of
    memory, a device-side error, any error of a kernel that has already run) is the caller's error, raised."""
    math_fn = _MATH[direction]
    if path == "eager" or torch.compiler.is_compiling():  # in a compiled model: trace inline, inductor fuses
        return math_fn(op, log_params, *args)
    x = args[0] if direction == "fwd" else args[1]
    fn = _get_compiled(direction, op, log_params, args)
    try:
        out = fn(op, log_params, *args)
        if getattr(fn, "keeps_derived", False):  # drop the derived quantities (returned for inductor to store)
            out = out[0] if direction == "fwd" else out[:len(args) - 1]  # (g, x, res, *p) -> (gx, gres, *gp)
    except Exception as exc:  # noqa: BLE001 - compiler failures have many types (inductor, triton, the C compiler)
        if _mode == "compiled" or id(fn) in _compiled_ran or isinstance(exc, torch.OutOfMemoryError):
            raise
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        _compile_failed[x.device.type] = why
        _warn_fallback(f"torch.compile could not build the fused SALU kernels on {x.device.type} ({why}); make "
                       "torch.compile work here (on CUDA it needs triton; `salunet doctor` shows the versions)")
        return math_fn(op, log_params, *args)
    _compiled_ran.add(id(fn))
    return out


def _triton():
    """salunet.nn.triton_kernels, imported on first use (importing triton takes about a second)."""
    from . import triton_kernels
    return triton_kernels


# ---- the C++ path: (outer, C, inner) layouts ---------------------------------------------------------------

def broadcast_shape(shapes) -> tuple[int, ...]:
    """Broadcast shape of a few small shapes; ``torch.broadcast_shapes`` costs ~40 us per call (it runs the
    symbolic-shape machinery), which dominates a batch-size-1 step. Raises ValueError if they do not broadcast."""
    nd = max(len(s) for s in shapes)
    out = [1] * nd
    for shp in shapes:
        for i, n in enumerate(shp, nd - len(shp)):
            if n != 1:
                if out[i] not in (1, n):
                    raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[i] = n
    return tuple(out)


def _param_axis(x_dim: int, pshape: tuple[int, ...]) -> int | None | bool:
    """The axis of ``x`` along which parameters of broadcast shape ``pshape`` vary: an int, None for scalar
    parameters, False if they vary along several axes (no C++ layout)."""
    aligned = (1,) * (x_dim - len(pshape)) + tuple(pshape)
    axes = [i for i, n in enumerate(aligned) if n != 1]
    return False if len(axes) > 1 else (axes[0] if axes else None)


@functools.lru_cache(maxsize=4096)
def _layout(shape: tuple[int, ...], stride: tuple[int, ...], axis: int | None):
    """(outer, C, inner) of a tensor of ``shape`` / ``stride`` in memory order, parameters per channel along
    ``axis`` (None: scalar), or None if the tensor is not dense in a supported order (then it is made contiguous
    first). Cached: a network meets a handful of shapes, and this runs for every call."""
    nd = len(shape)
    numel = math.prod(shape)
    contiguous = _dense_in_order(shape, stride, range(nd - 1, -1, -1))
    channels_last = nd in (4, 5) and not contiguous and _dense_in_order(shape, stride, [1, *range(nd - 1, 1, -1), 0])
    if not (contiguous or channels_last):
        return None
    if axis is None:  # scalar parameters: blocks of >= 1024 contiguous elements, so that threads can share them
        inner = 1
        for d in sorted(range(nd), key=lambda i: stride[i]):  # physical order, innermost first
            if inner >= 1024:
                break
            inner *= shape[d]
        inner = max(inner, 1)
        return numel // inner, 1, inner
    if channels_last:
        if axis != 1:
            return None
        return numel // shape[1], shape[1], 1  # (N, *spatial, C) in memory
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def _dense_in_order(shape, stride, order) -> bool:
    """Whether the tensor is dense with its dims laid out innermost-first in ``order`` (size-1 dims ignored):
    reversed dims for contiguous, (1, last, ..., 2, 0) for channels_last / channels_last_3d."""
    expect = 1
    for d in order:
        if shape[d] != 1 and stride[d] != expect:
            return False
        expect *= shape[d]
    return True


def _memory_format(x: Tensor) -> torch.memory_format:
    """The memory format that the kernels walk ``x`` in (the test ``_layout`` uses)."""
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if cl is not None and not x.is_contiguous() and x.is_contiguous(memory_format=cl):
        return cl
    return torch.contiguous_format


def _forward_math(op: str, log_params: bool, x: Tensor, res: Tensor | None, *params: Tensor,
                  keep_derived: bool = False):
    """The whole forward in plain tensor ops: parameters prepared, the math in the compute dtype, the output in
    ``x``'s dtype (the eager path runs it op by op, the compiled path compiles it whole). ``keep_derived``: return
    (output, *derived quantities) instead (see :data:`REALIZE_DERIVED`)."""
    cdt = _compute_dtype(x, *params)
    ps, derived = _prepare(log_params, cdt, params)
    r = None if res is None else res.to(cdt)
    y = _fwd_core(op, x.to(cdt), r, *derived).to(x.dtype)
    return (y, _stored(ps, derived)) if keep_derived else y


def _backward_math(op: str, log_params: bool, g: Tensor, x: Tensor, res: Tensor | None, *params: Tensor,
                   keep_derived: bool = False):
    """Gradients (x, res, *params) of the whole op; res's is None for ops without a residual. ``keep_derived``:
    the derived quantities follow the gradients (see :data:`REALIZE_DERIVED`)."""
    cdt = _compute_dtype(x, *params)
    ps, derived = _prepare(log_params, cdt, params)
    r = None if res is None else res.to(cdt)
    gx, gres, *gps = _bwd_core(op, g.to(cdt), x.to(cdt), r, *derived)
    out = [gx.to(x.dtype), None if gres is None else gres.to(res.dtype)]
    for gp, p, raw in zip(gps, ps, params):
        gp = gp.sum_to_size(raw.shape)
        if log_params:  # d/dlog_a = a * d/da
            gp = gp * p
        out.append(gp.to(raw.dtype))
    return (*out, _stored(ps, derived)) if keep_derived else tuple(out)


def _stored(ps: Sequence[Tensor], derived: Sequence[Tensor]) -> Tensor:
    """The prepared and derived quantities as one flat tensor: one extra output of a compiled region (each output
    is an allocation on the host), and a concatenation, which inductor lowers by storing each piece."""
    return torch.cat([t.reshape(-1) for t in (*ps, *derived)])


def _forward_region(op: str, log_params: bool, *args: Tensor | None):
    return _forward_math(op, log_params, *args, keep_derived=True)


def _backward_region(op: str, log_params: bool, *args: Tensor | None):
    return _backward_math(op, log_params, *args, keep_derived=True)


_MATH = {"fwd": _forward_math, "bwd": _backward_math}
# What the compiled path compiles when REALIZE_DERIVED is on: the same math, the parameters' prepared and derived
# quantities returned beside the result (and dropped by the caller)
_REGIONS = {"fwd": _forward_region, "bwd": _backward_region}


def _forward(path: str, op: str, log_params: bool, x: Tensor, res: Tensor | None,
             params: Sequence[Tensor]) -> Tensor:
    return _call_core(path, "fwd", op, log_params, x, res, *params)


def _backward(path: str, op: str, log_params: bool, g: Tensor, x: Tensor, res: Tensor | None,
              params: Sequence[Tensor]):
    return _call_core(path, "bwd", op, log_params, g, x, res, *params)


# ----------------------------------------------------------------------------------------------------------
# autograd

class FusedFn(torch.autograd.Function):
    """Autograd Function of the compiled and eager paths for every op in :data:`OPS`; saves only ``x`` and the
    parameters. The path is fixed at forward time, so backward runs the same math whatever the mode is then.
    (The C++ path has its own autograd node in C++: ``SaluFunction`` in csrc/salu_bind.cpp.)"""

    @staticmethod
    def forward(ctx, path: str, op: str, log_params: bool, x: Tensor, res: Tensor | None, *params: Tensor) -> Tensor:
        ctx.path, ctx.op, ctx.log_params, ctx.has_res = path, op, log_params, res is not None
        ctx.save_for_backward(x, *(() if res is None else (res,)), *params)
        return _forward(path, op, log_params, x, res, params)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, *rest = ctx.saved_tensors
        res, params = (rest[0], rest[1:]) if ctx.has_res else (None, rest)
        grads = _backward(ctx.path, ctx.op, ctx.log_params, g.contiguous(memory_format=_memory_format(x)), x, res,
                          params)
        return (None, None, None, *grads)


class TritonFn(torch.autograd.Function):
    """Autograd Function of the Triton path (:mod:`salunet.nn.triton_kernels`): ``x`` (and the residual, in x's
    strides) dense in ``layout`` = (outer, C, inner) of :func:`_layout`, parameters as they are (1 or C values each,
    along ``axis``). Its own Function, not :class:`FusedFn`, so that the host does nothing per call beyond the
    launches and their outputs: no broadcast views of the parameters, no layout found twice.

    Double backward (``create_graph=True``): the kernels' gradients would carry no graph, so that backward runs the
    eager math's (differentiable, as on the eager path) instead: higher-order gradients as the eager path gives them,
    at its speed, for the calls that ask for them."""

    @staticmethod
    def forward(ctx, op: str, log_params: bool, layout: tuple, axis: int | None, x: Tensor, res: Tensor | None,
                *params: Tensor):
        ctx.op, ctx.log_params, ctx.layout, ctx.axis, ctx.has_res = op, log_params, layout, axis, res is not None
        ctx.save_for_backward(x, *(() if res is None else (res,)), *params)
        return _triton().forward(op, log_params, x, res, params, layout, LOG_LIMIT)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, *rest = ctx.saved_tensors
        res, params = (rest[0], rest[1:]) if ctx.has_res else (None, rest)
        if torch.is_grad_enabled():  # create_graph=True: gradients with a graph, from the eager math
            tail = (1,) * (x.dim() - ctx.axis - 1) if ctx.axis is not None else ()
            views = [p.reshape((-1, *tail)) if ctx.axis is not None else p for p in params]
            gx, gres, *gps = _backward_math(ctx.op, ctx.log_params, g, x, res, *views)
            return (None, None, None, None, gx, gres, *[gp.reshape(p.shape) for gp, p in zip(gps, params)])
        if g.stride() != x.stride():
            g = torch.empty_like(x, dtype=g.dtype).copy_(g)
        grads = _triton().backward(ctx.op, ctx.log_params, g, x, res, params, ctx.layout, LOG_LIMIT)
        return (None, None, None, None, *grads)


def fused(op: str, x: Tensor, *params: Tensor, log_params: bool = False, axis: int | None | bool = False,
          residual: Tensor | None = None) -> Tensor:
    """Apply fused op ``op`` to ``x``; ``params`` are (a, b) or (a1, b1, a2, b2), or their logs if
    ``log_params``. Parameters must broadcast against ``x`` and live on its device. ``residual`` (the
    RESIDUAL_OPS only, required there): a tensor of ``x``'s shape added to SALU(x) before the gate.

    ``axis`` (modules only): the parameters are 1-D (or 0-d) vectors of the channels along that dim of ``x``
    (None: scalars); then they are passed to the C++ kernels as they are, and viewed for broadcasting only on the
    other paths. The default (False) means "broadcast ``params`` against ``x``", the functional API's contract."""
    if op not in _NPARAMS:
        raise ValueError(f"unknown op {op!r}; use one of {', '.join(OPS)}")
    if len(params) != _NPARAMS[op]:
        raise ValueError(f"op {op!r} takes {_NPARAMS[op]} parameter tensors, got {len(params)}")
    if any(p.device != x.device for p in params):
        raise ValueError(f"{op}: parameters on {sorted({str(p.device) for p in params})} but input on {x.device}; "
                         "move the module to the input's device (module.to(x.device))")
    if (residual is not None) != (op in RESIDUAL_OPS):
        raise ValueError(f"{op}: a residual is {'required' if op in RESIDUAL_OPS else 'not taken'} "
                         f"(residual ops: {', '.join(RESIDUAL_OPS)})")
    if residual is not None and (residual.shape != x.shape or residual.device != x.device):
        raise ValueError(f"{op}: residual of shape {tuple(residual.shape)} on {residual.device} does not match the "
                         f"input's {tuple(x.shape)} on {x.device}")
    if axis is not False and axis is not None:
        axis %= x.dim()
    if torch.jit.is_tracing() or _is_exporting():  # a graph is being recorded: plain ops
        return recorded(op, x, *_broadcastable(params, x, axis), log_params=log_params, residual=residual)
    if torch.compiler.is_compiling():  # traced inline: inductor fuses the math with its neighbours
        if not torch.is_grad_enabled():  # inference needs no autograd node (and dynamo cannot trace FusedFn's
            # ctx under no_grad: fullgraph=True failed there)
            return _forward("eager", op, log_params, x, residual, _broadcastable(params, x, axis))
        if residual is x:  # act(SALU(h) + h): dynamo refuses an autograd.Function given one tensor twice
            residual = x.clone()
        return FusedFn.apply("eager", op, log_params, x, residual, *_broadcastable(params, x, axis))
    path = _path_for(x.device)
    _report(x.device)
    if path in ("triton", "cpp") and axis is False:  # both take scalar or per-channel parameters only
        axis = _param_axis(x.dim(), broadcast_shape([p.shape for p in params]))
    if path == "triton" and axis is False and _mode == "auto":
        path = _compiled_or_eager(x.device)
        _log_once(f"{op}: parameters vary along more than one axis; the Triton kernels handle scalar or "
                  f"per-channel parameters, this call takes the {path} path")
    if path == "triton":
        if axis is False:
            raise ValueError(f"salunet: {op}: parameters of shapes {[tuple(p.shape) for p in params]} vary along "
                             "more than one axis of the input; the Triton kernels take scalar or per-channel "
                             "parameters (use SALUNET_KERNELS=compiled or eager for these)")
        x, residual = _dense_for_kernels(x, axis, residual)
        layout = _layout(tuple(x.shape), x.stride(), axis)
        if not _needs_graph(x, residual, params):  # inference: no autograd node, one launch
            return _triton().forward(op, log_params, x, residual, params, layout, LOG_LIMIT)
        return TritonFn.apply(op, log_params, layout, axis, x, residual, *params)
    if path == "cpp":
        if axis is not False:
            return _cpp_apply(op, log_params, x, params, axis, residual)
        path = "eager"  # parameters varying along several axes (functional API only): no C++ layout
        _log_once(f"{op}: parameters vary along more than one axis; the C++ kernels handle scalar or "
                  "per-channel parameters, this call runs op by op")
    if not _needs_graph(x, residual, params):  # inference: no autograd node
        return _forward(path, op, log_params, x, residual, _broadcastable(params, x, axis))
    return FusedFn.apply(path, op, log_params, x, residual, *_broadcastable(params, x, axis))


def _needs_graph(x: Tensor, residual: Tensor | None, params: Sequence[Tensor]) -> bool:
    """Whether a call must record an autograd node: grad mode on and an input that requires grad. Without one (the
    inference of an eager model on a GPU, where each call's host time is the op's cost) the paths' forward runs
    alone, without the autograd Function's overhead."""
    return torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)
                                        or any(p.requires_grad for p in params))


def recorded(op: str, x: Tensor, *params: Tensor, log_params: bool = False,
             residual: Tensor | None = None) -> Tensor:
    """The forward of ``op`` as plain tensor ops, for a graph being recorded (``torch.jit.trace``, the TorchScript
    ONNX exporter, ``torch.export`` and the dynamo ONNX exporter built on it): what :func:`fused` runs while
    one of them is active. No custom autograd Function and no C++ call, so the recorder sees every op: the C++
    kernels write their output through raw pointers, which ``torch.jit.trace`` records as an uninitialised
    ``empty_like`` (a silently wrong graph). GALU's normal CDF uses :func:`_erfc_elementary` (relative error
    < 1e-5 in float32). Gradients through a recorded graph are autograd's of these ops (the log-parameter clamp at
    +-LOG_LIMIT then stops gradient instead of passing it straight through); train with the module itself.
    ``params`` must already broadcast against ``x``."""
    cdt = _compute_dtype(x, *params)
    _, derived = _prepare(log_params, cdt, params)
    res = None if residual is None else residual.to(cdt)
    return _fwd_core(op, x.to(cdt), res, *derived, elementary=True).to(x.dtype)


def _dense_for_kernels(x: Tensor, axis: int | None, residual: Tensor | None):
    """``x`` dense in a layout of :func:`_layout` (else made contiguous) and the residual in x's strides (its own
    dtype): what the C++ and Triton kernels read with one flat offset."""
    if _layout(tuple(x.shape), x.stride(), axis) is None:
        x = x.contiguous()
    if residual is not None and residual.stride() != x.stride():
        residual = torch.empty_like(x, dtype=residual.dtype).copy_(residual)
    return x, residual


def _broadcastable(params: Sequence[Tensor], x: Tensor, axis) -> Sequence[Tensor]:
    """Per-channel parameter vectors viewed as (C, 1, ..., 1) to broadcast along ``axis`` of ``x``."""
    if axis is False or axis is None:
        return params
    shape = (-1,) + (1,) * (x.dim() - axis - 1)
    return [p.view(shape) if p.dim() else p for p in params]


def _cpp_apply(op: str, log_params: bool, x: Tensor, params: Sequence[Tensor], axis: int | None,
               residual: Tensor | None = None) -> Tensor:
    """The C++ autograd node (csrc/salu_bind.cpp, SaluFunction)."""
    cdt = _compute_dtype(x, *params)
    xc = x if cdt != torch.float64 else x.to(cdt)
    # the kernel reads the residual in x's memory order and dtype
    xc, res = _dense_for_kernels(xc, axis, None if residual is None else residual.to(xc.dtype))
    lay = _layout(tuple(xc.shape), xc.stride(), axis)
    if res is None:
        res = xc  # a placeholder: autograd inputs cannot be undefined; its slot gets no gradient
    # single-stage ops pass (a, b) again in the second slots, for the same reason
    a2, b2 = (params[2], params[3]) if len(params) == 4 else (params[0], params[1])
    y = cpu_ext.load().apply(xc, res, params[0], params[1], a2, b2, _OP_CODE[op],
                             LOG_LIMIT if log_params else -1.0, *lay)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def radial_project_in_cpp(x: Tensor) -> bool:
    """Whether the projected gradient of ``x`` (``--salu-project-grad``) is to run in the C++ kernel
    (:func:`radial_project`): the C++ path runs ``x``'s device, and no graph is being compiled, traced or recorded
    and no dispatch mode watches (traced or wrapped tensors, ``torch.compile``, ``torch.jit.trace``, export, make_fx,
    FlopCounterMode: their graphs must hold the op-by-op math). Decided in the forward, as every kernel's path is."""
    return (not torch.compiler.is_compiling() and type(x) is Tensor and not torch.jit.is_tracing()
            and not _is_exporting() and _get_current_dispatch_mode() is None and x.device.type == "cpu"
            and _path_for(x.device) == "cpp")


def radial_project(g: Tensor, x: Tensor, axis: int | None, running: tuple[Tensor, Tensor] | None = None,
                   rate: float = 1.0) -> tuple[Tensor, Tensor]:
    """The backward of ``--salu-project-grad`` (``salunet.train.recalibrate.project_radial_grad``) in the C++
    kernel, where :func:`radial_project_in_cpp` said so in the forward: per channel along ``axis`` (None: one for
    the whole tensor), ``g - x * coef`` with coef = sum(g x) / sum(x²) (0 where sum(x²) = 0), or with ``running``
    (the running sums of both, C values each) the coefficient of ``(1 - rate) * running + rate * this batch's
    sums``. Two passes over memory, no temporaries; sums in the compute dtype (float32, float64 for float64 input)
    within a channel's block and float64 across blocks. Returns the projected gradient in ``g``'s dtype and this
    batch's sums (2, C) in float64. No graph: the caller takes the op-by-op form for a double backward."""
    axis = None if axis is None else axis % x.dim()
    xd, _ = _dense_for_kernels(x, axis, None)
    outer, channels, inner = _layout(tuple(xd.shape), xd.stride(), axis)
    if xd.numel() == 0:
        return torch.zeros_like(g), torch.zeros(2, channels, dtype=torch.float64)
    gd = g.to(xd.dtype)
    if gd.stride() != xd.stride():
        gd = torch.empty_like(xd).copy_(gd)
    out = torch.empty_like(xd)
    if running is not None:
        running = torch.stack([running[0].flatten(), running[1].flatten()]).double()
    sums = cpu_ext.load().radial_project(gd, xd, out, outer, channels, inner, running, rate)
    return (out if out.dtype == g.dtype else out.to(g.dtype)), sums


def _log_once(msg: str) -> None:
    if msg not in _reported:
        _reported.add(msg)
        log.info("salunet kernels: %s", msg)

