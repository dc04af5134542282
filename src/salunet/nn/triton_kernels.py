"""Hand-written Triton kernels for the fused ops: one launch per forward, two per backward (kernel mode ``triton``).

Why they exist. The ``compiled`` path (inductor) generates good device code, but each call of a compiled region
costs the host about half a millisecond (guards, the AOT-autograd wrappers, inductor's launcher): on an H200 a
fused SALU + SWALU forward + backward on a (256, 64, 32, 32) tensor took 1.17 ms to issue against 0.42 ms of
kernels (docs/BENCHMARKS.md "On a GPU"), so an op called alone was host-bound at 1.4-3.7x its normalised baseline.
These kernels are launched directly: the forward is one kernel, the backward one kernel for dL/dx (and dL/dres)
and the parameter gradients' partial sums per tile (the log-parametrisation's chain rule applied), then one
``sum`` over the partial sums per channel (a fixed order, hence deterministic: no atomics). Directly also in the
launcher's sense: after the first call of each specialisation, the cached CompiledKernel's launcher is called with
the runtime arguments only (:func:`_launch`: ``kernel[grid]`` binds, specialises and looks up every argument on
each call; through it the H200's host spent 0.78 ms issuing a fused forward + backward, against 0.40 ms for
BatchNorm2d + ReLU, and how much of that the direct launch saves is for a GPU to measure).

The math is :mod:`salunet.nn.kernels`'s (its module docstring): the rescaled SALU t = clamp(x sqrt(ab)), q =
t rsqrt(1 + t^2), y = sqrt(a/b) q, with q pinned to +-1 past saturation (Triton's float32 rsqrt is approximate),
every derivative in the bounded q and r. GALU's normal CDF uses erfc from elementary operations
(:data:`salunet.nn.kernels._ERFC_COEFFS`, relative error < 1e-5 in float32, also in the far tail): Triton has
erf but no erfc on every backend, and 1 - erf cancels to 0 in the left tail. Compute in float32 (float64 when the
input or a parameter is float64), inputs and outputs in their own dtypes. In float64 these kernels are not float64
references: GALU's erfc fit is good to ~1e-7 relative and the device's float64 rsqrt is an approximation (the eager
and compiled paths use torch's erfc and rsqrt); float64 work that needs more should take those paths. A backward
with create_graph=True runs the eager math (kernels.TritonFn), so that its gradients carry a graph.

Layout. ``x`` is viewed as (outer, C, inner) in memory order (:func:`salunet.nn.kernels._layout`: contiguous or
channels_last; 1 channel for scalar parameters), tiled two ways so that the per-channel quantities (square roots,
quotients) are computed once per tile row or column, not per element:

- inner > 1 (NCHW): rows are (outer, channel) pairs, columns the inner positions; parameters vary along rows;
- inner == 1 (channels_last, tokens): rows are the outer positions, columns the channels; parameters along columns.

Each program handles one tile (with channels as columns, up to 8 consecutive row blocks, so that the partial sums
stay small), on a 1-D grid (CUDA limits a grid's other axes to 65,535 blocks). Tile sizes and warps: ``_TILES``.
A scalar given beside per-channel parameters (the functional API allows it) is repeated per channel for the
kernels, and its gradient summed back.

Where it runs: CUDA tensors; CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported: numpy, very slow), which is how CI tests these kernels (tests/test_triton.py). Checked on CPU
against float64 in the interpreter; what a GPU compiles is checked by tests/triton_cases.py on CUDA
(scripts/gpu_check.sh).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the optional extra: pip install 'salunet[triton]' (CUDA torch builds ship it)
    triton = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = ""

__all__ = ["available", "unavailable_reason", "launch_path", "forward", "backward"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None if they can)."""
    if triton is None:
        return f"triton is not installed ({_IMPORT_ERROR}); pip install 'salunet[triton]'"
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return None
    return (f"the Triton kernels run CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, for tests), got a tensor "
            f"on {device}")


def available(device: torch.device) -> bool:
    return unavailable_reason(device) is None


# op -> (has a SALU stage first, gate: 0 none / 1 logistic / 2 normal CDF, has a residual)
_OP_FLAGS = {"salu": (True, 0, False), "swalu": (False, 1, False), "galu": (False, 2, False),
             "salu_swalu": (True, 1, False), "salu_galu": (True, 2, False),
             "salu_add_swalu": (True, 1, True), "salu_add_galu": (True, 2, True)}

if triton is not None:
    from .kernels import _ERFC_COEFFS as _E

    _E0, _E1, _E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9 = (tl.constexpr(c) for c in _E)
    _INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))
    _INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))

    @triton.jit
    def _prepared(p_ptr, idx, mask, LOG: tl.constexpr, LIMIT: tl.constexpr, CDT: tl.constexpr):
        """A parameter (exp of its clamped log if LOG) at channel indices ``idx``, in the compute dtype."""
        p = tl.load(p_ptr + idx, mask=mask, other=1.0).to(CDT)
        if LOG:
            p = tl.exp(tl.minimum(tl.maximum(p, -LIMIT), LIMIT))
        return p

    @triton.jit
    def _terms(x, sab, LIM: tl.constexpr, SAT: tl.constexpr):
        """(r, q) of the rescaled SALU (kernels._salu_terms; LIM, SAT: its clamp and saturation for the compute
        dtype): NaN passes, +-inf gives q = +-1."""
        t = x * sab
        t = tl.minimum(tl.maximum(t, -LIM, propagate_nan=tl.PropagateNan.ALL), LIM, propagate_nan=tl.PropagateNan.ALL)
        r = tl.math.rsqrt(1.0 + t * t)
        q = tl.minimum(tl.maximum(t * r, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                       propagate_nan=tl.PropagateNan.ALL)
        q = tl.where(tl.abs(t) >= SAT, tl.where(t > 0, 1.0, -1.0).to(q.dtype), q)
        return r, q

    @triton.jit
    def _erfc(z):
        """erfc from exp and arithmetic (kernels._erfc_elementary's fit)."""
        az = tl.abs(z)
        t = 1.0 / (1.0 + 0.5 * az)
        poly = _E9 + t * 0.0
        poly = poly * t + _E8
        poly = poly * t + _E7
        poly = poly * t + _E6
        poly = poly * t + _E5
        poly = poly * t + _E4
        poly = poly * t + _E3
        poly = poly * t + _E2
        poly = poly * t + _E1
        poly = poly * t + _E0
        y = t * tl.exp(poly - az * az)
        return tl.where(z < 0, 2.0 - y, y)

    @triton.jit
    def _gate(s, GATE: tl.constexpr):
        """(p(s), p'(s)): logistic for GATE 1, the normal CDF for GATE 2."""
        if GATE == 1:
            p = 1.0 / (1.0 + tl.exp(-s))
            dp = p * (1.0 - p)
        else:
            p = 0.5 * _erfc(-s * _INV_SQRT2)
            dp = tl.exp(-0.5 * s * s) * _INV_SQRT_2PI
        return p, dp

    @triton.jit
    def _tile(pid_m, pid_n, M, N, C, BM: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr):
        """Offsets, mask and channel indices of a (BM, BN) tile of the (M, N) matrix view; ROWS: the parameters
        vary along rows (channel = row % C) or else along columns (channel = column)."""
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        rmask = rows < M
        cmask = cols < N
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        if ROWS:
            ch = rows % C
            chmask = rmask
        else:
            ch = cols
            chmask = cmask
        return offs, mask, ch, chmask

    @triton.jit
    def _stage(p_ptr_a, p_ptr_b, ch, chmask, ROWS: tl.constexpr, LOG: tl.constexpr, LIMIT: tl.constexpr,
               CDT: tl.constexpr):
        """A SALU stage's (a, b, sqrt(ab), A = sqrt(a/b), w = 1/sqrt(ab), A/2b), per channel, shaped to
        broadcast."""
        a = _prepared(p_ptr_a, ch, chmask, LOG, LIMIT, CDT)
        b = _prepared(p_ptr_b, ch, chmask, LOG, LIMIT, CDT)
        if ROWS:
            a = a[:, None]
            b = b[:, None]
        else:
            a = a[None, :]
            b = b[None, :]
        sab = tl.sqrt(a * b)
        amp = tl.sqrt(a / b)
        return a, b, sab, amp, 1.0 / sab, 0.5 * amp / b

    @triton.jit
    def _salu_at(x, p_ptr_a, p_ptr_b, ch, chmask, ROWS: tl.constexpr, LOG: tl.constexpr, LIMIT: tl.constexpr,
                 CDT: tl.constexpr, LIM: tl.constexpr, SAT: tl.constexpr):
        """SALU of the tile ``x`` and what its derivatives need: (A q, a, b, w, A/2b, r, q) (kernels' module
        docstring)."""
        a, b, sab, amp, w, hb = _stage(p_ptr_a, p_ptr_b, ch, chmask, ROWS, LOG, LIMIT, CDT)
        r, q = _terms(x, sab, LIM, SAT)
        return amp * q, a, b, w, hb, r, q

    @triton.jit
    def _forward_kernel(x_ptr, res_ptr, y_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr, M, N, C, GRID_N,
                        FIRST: tl.constexpr, GATE: tl.constexpr, RES: tl.constexpr, LOG: tl.constexpr,
                        LIMIT: tl.constexpr, CDT: tl.constexpr, LIM: tl.constexpr, SAT: tl.constexpr,
                        ROWS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ITERS: tl.constexpr):
        pid_m = tl.program_id(0) // GRID_N  # a 1-D grid (CUDA limits a grid's other axes to 65,535 blocks)
        pid_n = tl.program_id(0) % GRID_N
        for it in range(ITERS):  # ITERS consecutive row blocks per program (a loop: unrolled, it took registers)
            offs, mask, ch, chmask = _tile(pid_m * ITERS + it, pid_n, M, N, C, BM, BN, ROWS)
            z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CDT)
            if FIRST:
                z, _, _, _, _, _, _ = _salu_at(z, a1_ptr, b1_ptr, ch, chmask, ROWS, LOG, LIMIT, CDT, LIM, SAT)
                if RES:
                    z = z + tl.load(res_ptr + offs, mask=mask, other=0.0).to(CDT)
            if GATE != 0:
                s2, _, _, _, _, _, _ = _salu_at(z, a2_ptr, b2_ptr, ch, chmask, ROWS, LOG, LIMIT, CDT, LIM, SAT)
                p, _ = _gate(s2, GATE)
                z = z * p
            tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _reduce(v, mask, ROWS: tl.constexpr):
        """The tile's sums of ``v`` per channel: per row (ROWS) or per column; masked elements count 0."""
        v = tl.where(mask, v, 0.0)
        if ROWS:  # one return: the compiler types every return of a function, even behind a constexpr if
            s = tl.sum(v, axis=1)
        else:
            s = tl.sum(v, axis=0)
        return s

    @triton.jit
    def _param_sums(u, a, b, w, hb, rr, q, mask, ROWS: tl.constexpr, LOG: tl.constexpr):
        """The tile's per-channel sums of a SALU stage's dL/da and dL/db (of dL/dlog a = a dL/da, dL/dlog b with
        LOG), ``u``: dL/d(its output) per element; rr = r^2."""
        ga = u * (w * q * (rr + 0.5 * q * q))
        gb = u * (-hb * q * q * q)
        if LOG:
            ga = ga * a
            gb = gb * b
        return _reduce(ga, mask, ROWS), _reduce(gb, mask, ROWS)

    @triton.jit
    def _store_partial(part_ptr, k, P, C, s, pid_m, pid_n, M, ch, chmask, ROWS: tl.constexpr, BM: tl.constexpr):
        """partials[k, p, c] = s: ROWS, one sum per row (row = o * C + c, slot p = pid_n * (M // C) + o, so the flat
        slot is pid_n * M + row); else one per column (channel), slot p = pid_m. Each (p, c) has one writer."""
        if ROWS:
            rows = pid_m * BM + tl.arange(0, BM)
            tl.store(part_ptr + k * P * C + pid_n.to(tl.int64) * M + rows, s, mask=chmask)
        else:
            tl.store(part_ptr + k * P * C + pid_m.to(tl.int64) * C + ch, s, mask=chmask)

    @triton.jit
    def _backward_kernel(g_ptr, x_ptr, res_ptr, gx_ptr, gres_ptr, part_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr,
                         M, N, C, P, GRID_N, FIRST: tl.constexpr, GATE: tl.constexpr, RES: tl.constexpr,
                         LOG: tl.constexpr, LIMIT: tl.constexpr, CDT: tl.constexpr, LIM: tl.constexpr,
                         SAT: tl.constexpr, ROWS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         ITERS: tl.constexpr):
        pid_m = tl.program_id(0) // GRID_N
        pid_n = tl.program_id(0) % GRID_N
        # per-channel sums of the parameter gradients over this program's tiles (ROWS: ITERS is 1)
        zero = tl.zeros((BM, BN), dtype=CDT)
        sa1 = _reduce(zero, zero != 0, ROWS)
        sb1 = sa1
        sa2 = sa1
        sb2 = sa1
        # the channels of the partial sums: a column tiling's are the same in every row block, a row tiling has one
        _, _, ch_out, chmask_out = _tile(pid_m * ITERS, pid_n, M, N, C, BM, BN, ROWS)
        for it in range(ITERS):  # a loop, not unrolled: unrolled, the row blocks' values piled up in registers
            offs, mask, ch, chmask = _tile(pid_m * ITERS + it, pid_n, M, N, C, BM, BN, ROWS)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(CDT)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CDT)
            z = x
            if FIRST:
                z, a1, b1, w1, hb1, r1, q1 = _salu_at(x, a1_ptr, b1_ptr, ch, chmask, ROWS, LOG, LIMIT, CDT, LIM, SAT)
                if RES:
                    z = z + tl.load(res_ptr + offs, mask=mask, other=0.0).to(CDT)
            gz = g
            if GATE != 0:
                s2, a2, b2, w2, hb2, r2, q2 = _salu_at(z, a2_ptr, b2_ptr, ch, chmask, ROWS, LOG, LIMIT, CDT, LIM, SAT)
                p, dp = _gate(s2, GATE)
                rr2 = r2 * r2
                gz = g * (p + dp * s2 * rr2)  # z * ds/dz = A q r^2: bounded for a huge z
                da2, db2 = _param_sums(g * z * dp, a2, b2, w2, hb2, rr2, q2, mask, ROWS, LOG)
                sa2 += da2
                sb2 += db2
            if RES:
                tl.store(gres_ptr + offs, gz.to(gres_ptr.dtype.element_ty), mask=mask)
            gx = gz
            if FIRST:
                rr1 = r1 * r1
                gx = gz * (a1 * rr1 * r1)
                da1, db1 = _param_sums(gz, a1, b1, w1, hb1, rr1, q1, mask, ROWS, LOG)
                sa1 += da1
                sb1 += db1
            tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        if FIRST:
            _store_partial(part_ptr, 0, P, C, sa1, pid_m, pid_n, M, ch_out, chmask_out, ROWS, BM)
            _store_partial(part_ptr, 1, P, C, sb1, pid_m, pid_n, M, ch_out, chmask_out, ROWS, BM)
        if GATE != 0:
            k2 = 2 if FIRST else 0
            _store_partial(part_ptr, k2, P, C, sa2, pid_m, pid_n, M, ch_out, chmask_out, ROWS, BM)
            _store_partial(part_ptr, k2 + 1, P, C, sb2, pid_m, pid_n, M, ch_out, chmask_out, ROWS, BM)


# Elements per tile and warps per program, by direction: chosen on ptxas's register counts for sm_90 (scripts/
# triton_aot.py --regs), not yet on a GPU's timings. 4 warps: the forward at 2048 elements takes 64-80 registers a
# thread, the backward at 1024 80-106; the backward at 4096 (8 warps) took 255 and spilled, and the forward at 4096
# 128-228.
_TILES = {"fwd": 2048, "bwd": 1024}
_WARPS = 4
_PROGRAMS = 1024  # the channels-as-columns tiling gives each program up to 8 row blocks while this many remain


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a jit function: calling it on the host costs ~10 us


@functools.lru_cache(maxsize=1024)
def _geometry(outer: int, C: int, inner: int, programs: int, tile: int):
    """(M, N, rows-carry-parameters, BM, BN, ITERS, (grid_m, grid_n), P) of the tiling of an (outer, C, inner)
    view; the kernels run a 1-D grid of grid_m * grid_n programs; P: the partial-sum slots per channel. Parameter
    gradients leave one partial sum per channel and program (per row and program with rows): with channels as
    columns a program takes ITERS row blocks while ``programs`` remain, so that the partial sums stay a small
    fraction of x's size (with rows, they are x's size / inner: a quarter of it at inner = 16). Cached: a network
    meets a handful of shapes."""
    if inner > 1:
        M, N, rows, bn, iters = outer * C, inner, True, min(triton.next_power_of_2(inner), tile), 1
        bm = min(max(1, tile // bn), triton.next_power_of_2(M))  # a few rows (scalar parameters): none masked
    else:
        M, N, rows, bn, iters = outer, C, False, min(triton.next_power_of_2(C), 256, tile), 1
        bm = min(max(1, tile // bn), triton.next_power_of_2(M))
        while iters < 8 and _cdiv(outer, bm * iters * 2) >= programs:
            iters *= 2
    grid = (_cdiv(M, bm * iters), _cdiv(N, bn))
    return M, N, rows, bm, bn, iters, grid, grid[1] * outer if rows else grid[0]


def _stages(params, C: int):
    """The (a1, b1, a2, b2) pointers' tensors: each parameter's values contiguous, C of them (a scalar among
    per-channel parameters repeated, so that the kernels index every parameter alike); a single-stage op passes
    its (a, b) in both slots."""
    ps = [p if p.dim() == 1 and p.is_contiguous() else p.reshape(-1).contiguous() for p in params]
    if C > 1:
        ps = [p.expand(C).contiguous() if p.numel() == 1 else p for p in ps]
    return ps if len(ps) == 4 else ps + ps


@functools.lru_cache(maxsize=64)
def _dtype_constants(dtypes: tuple) -> tuple:
    """(compute dtype, its kernel constants CDT, LIM, SAT): float64 if x or a parameter is, else float32, with the
    SALU clamp and saturation of that dtype (kernels._clamp_limit, kernels._saturation)."""
    from .kernels import _clamp_limit, _saturation

    cdt = torch.float64 if torch.float64 in dtypes else torch.float32
    return cdt, (tl.float64 if cdt == torch.float64 else tl.float32, _clamp_limit(cdt), _saturation(cdt))


def _on_device(x: Tensor):
    """Triton launches on the current CUDA device (and its current stream): make it x's."""
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


# Launching. ``kernel[grid](...)`` makes Triton bind and specialise every argument, build its cache key, check the
# kernel's globals, read its settings and build launch metadata for its (empty) launch hooks, on every call: on the
# H200's host the Triton path took 0.78 ms to issue a fused forward + backward (two launches), BatchNorm2d + ReLU
# 0.40 ms. The direct launch does that work once per specialisation: the first call of each goes through
# ``kernel[grid]`` (which compiles and returns the CompiledKernel), later ones call its launcher with the runtime
# arguments only. The key covers everything Triton specialises on: the constexprs, the warps, the device, each
# pointer's dtype and 16-byte alignment, each integer's ``== 1``, ``% 16 == 0`` and 32/64-bit width.
DIRECT_LAUNCH = True  # False: every call through ``kernel[grid]`` (profile_op.py --triton compares both)
_DIRECT_VERSIONS = ((3, 6),)  # Triton versions whose CompiledKernel.run signature the direct launch was written for
_CONSTEXPRS = ("FIRST", "GATE", "RES", "LOG", "LIMIT", "CDT", "LIM", "SAT", "ROWS", "BM", "BN", "ITERS")
_LAUNCHES: dict = {}  # key above -> CompiledKernel


def launch_path() -> str:
    """How the kernels are launched here: what ``salunet doctor`` and the benchmarks report."""
    if INTERPRETED:
        return "Triton's interpreter"
    if not DIRECT_LAUNCH:
        return "through Triton's launcher (DIRECT_LAUNCH off)"
    if _direct_supported():
        return f"direct (cached CompiledKernels, Triton {triton.__version__})"
    if torch.version.hip is not None:
        return "through Triton's launcher (ROCm: the direct launch's key is NVIDIA's specialisation)"
    return (f"through Triton's launcher (the direct launch is written for Triton "
            f"{', '.join('.'.join(map(str, v)) for v in _DIRECT_VERSIONS)}, this is {triton.__version__})")


@functools.lru_cache(maxsize=1)
def _direct_supported() -> bool:
    """Triton 3.6 on NVIDIA: ROCm's Triton also specialises a pointer on its storage's size (buffer operations under
    2 GiB), which the key leaves out, so ROCm builds of torch (device type "cuda" too) launch Triton's way."""
    return tuple(int(v) for v in triton.__version__.split(".")[:2]) in _DIRECT_VERSIONS and torch.version.hip is None


def _hooked() -> bool:
    """Whether a profiler (proton, say) hooked Triton's launches: then they go through Triton's own path, which
    calls the hooks (``triton.knobs`` as of Triton 3.6; checked only where the direct launch is supported)."""
    runtime = triton.knobs.runtime
    return any(h is not None and getattr(h, "calls", True) for h in (runtime.launch_enter_hook,
                                                                      runtime.launch_exit_hook))


def _key(name: str, device_index: int | None, meta: tuple, tensors: tuple, ints: tuple) -> tuple:
    """The direct launch's cache key: everything Triton specialises a kernel on (runtime/jit.py's binder,
    native_specialize_impl): the constexprs, the warps, the device, each pointer's dtype and 16-byte alignment,
    each integer's ``== 1``, divisibility by 16 and 32/64-bit width (sizes: never negative), and Triton's runtime
    settings that enter its key (debug, instrumentation). Inlined, not a call per argument: it runs on every
    launch."""
    knobs = triton.knobs
    return (name, device_index, _WARPS, knobs.runtime.debug, knobs.compilation.instrumentation_mode, meta,
            *[t.dtype for t in tensors], *[t.data_ptr() & 15 == 0 for t in tensors],
            *[v == 1 or (v & 15 == 0, v < 2 ** 31) for v in ints])


def _launch(name: str, kernel, programs: int, tensors: tuple, ints: tuple, meta: tuple,
            device_index: int | None) -> None:
    """Launch ``kernel`` on a 1-D grid of ``programs`` with its pointer arguments ``tensors``, then its integer
    arguments ``ints`` (the kernels' signatures put them in that order), and its constexprs ``meta`` (in
    :data:`_CONSTEXPRS` order), on the current device and stream."""
    if INTERPRETED or not DIRECT_LAUNCH or not _direct_supported() or _hooked():
        kernel[(programs,)](*tensors, *ints, **dict(zip(_CONSTEXPRS, meta)), num_warps=_WARPS)
        return
    key = _key(name, device_index, meta, tensors, ints)
    compiled = _LAUNCHES.get(key)
    if compiled is None:  # compile (or find in Triton's cache) and launch the first call Triton's way
        _LAUNCHES[key] = kernel[(programs,)](*tensors, *ints, **dict(zip(_CONSTEXPRS, meta)), num_warps=_WARPS)
        return
    compiled.run(programs, 1, 1, torch._C._cuda_getCurrentRawStream(device_index), compiled.function,
                 compiled.packed_metadata, None, None, None, *tensors, *ints, *meta)


def forward(op: str, log_params: bool, x: Tensor, res: Tensor | None, params, layout, log_limit: float) -> Tensor:
    """y = op(x[, res]); ``x`` (and ``res``, with x's strides) dense in the memory order of ``layout`` =
    (outer, C, inner); ``params`` hold 1 or C values each."""
    first, gate, has_res = _OP_FLAGS[op]
    C = layout[1]
    M, N, rows, bm, bn, iters, grid, _ = _geometry(*layout, _PROGRAMS, _TILES["fwd"])
    y = torch.empty_like(x)
    if x.numel():
        _, consts = _dtype_constants((x.dtype, *(p.dtype for p in params)))
        with _on_device(x):
            _launch("fwd", _forward_kernel, grid[0] * grid[1], (x, res if has_res else x, y, *_stages(params, C)),
                    (M, N, C, grid[1]), (first, gate, has_res, log_params, log_limit, *consts, rows, bm, bn, iters),
                    x.device.index)
    return y


def backward(op: str, log_params: bool, g: Tensor, x: Tensor, res: Tensor | None, params, layout,
             log_limit: float):
    """(dL/dx, dL/dres or None, *dL/dparams) in their tensors' dtypes and shapes; ``g`` has x's strides."""
    first, gate, has_res = _OP_FLAGS[op]
    C = layout[1]
    M, N, rows, bm, bn, iters, grid, P = _geometry(*layout, _PROGRAMS, _TILES["bwd"])
    cdt, consts = _dtype_constants((x.dtype, *(p.dtype for p in params)))
    gx = torch.empty_like(x)
    gres = torch.empty_like(res) if has_res else None
    if x.numel():
        part = torch.empty((len(params), P, C), device=x.device, dtype=cdt)
        with _on_device(x):
            _launch("bwd", _backward_kernel, grid[0] * grid[1],
                    (g, x, res if has_res else x, gx, gres if has_res else gx, part, *_stages(params, C)),
                    (M, N, C, P, grid[1]), (first, gate, has_res, log_params, log_limit, *consts, rows, bm, bn, iters),
                    x.device.index)
        out = part.sum(1)  # a fixed-order reduction (torch's are deterministic): (nparams, C)
    else:
        out = torch.zeros((len(params), C), device=x.device, dtype=cdt)
    gps = []
    for o, p in zip(out.unbind(0), params):
        if p.numel() != o.numel():  # a scalar among per-channel parameters: its gradient sums the channels'
            o = o.sum()
        gps.append(o if o.shape == p.shape else o.reshape(p.shape))
    return (gx, gres, *[gp if gp.dtype == p.dtype else gp.to(p.dtype) for gp, p in zip(gps, params)])
