"""Where the time of one fused op's forward + backward goes: host (Python, dispatch, launches) or device kernels.

    python scripts/profile_op.py [--device cuda] [--shape 256,64,32,32] [--dtype fp32] [--iters 20] [--forms]
                                 [--triton] [--cprofile]

For the fused SALU -> SWALU pair (SALUAct) on the default kernel path and for BatchNorm2d + ReLU, it prints per
call: the host's wall time to issue forward + backward without waiting (``host_ms``), the device's time between
two events around the same calls (``device_ms``, on CUDA), medians of interleaved repeats with their
ratios to BatchNorm2d + ReLU, and the torch.profiler table of the kernels and
operators that took the most time. ``device_ms`` well above the kernels' own time, with ``host_ms`` close to it,
means the op is bound by host overhead, not by memory bandwidth. Issue 13 added it after `salunet bench ops` on
an H200 measured the fused pair at 3.5x BatchNorm2d + ReLU at a size where bandwidth alone predicts < 1x.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch import nn

from salunet import SALU, SWALU, SALUAct
from salunet.nn import kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(fn, x: torch.Tensor, grad: torch.Tensor, iters: int) -> dict:
    """host_ms: issuing one fwd+bwd (no waiting); device_ms: event time per call on CUDA (None elsewhere)."""
    dev = x.device
    for _ in range(3):  # warm-up and compilation
        x.grad = None
        fn(x).backward(grad)
    _sync(dev)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if dev.type == "cuda" else None
    if ev:
        ev[0].record()
    t0 = time.perf_counter()
    for _ in range(iters):
        x.grad = None
        fn(x).backward(grad)
    host = (time.perf_counter() - t0) / iters
    if ev:
        ev[1].record()
    _sync(dev)
    wall = (time.perf_counter() - t0) / iters
    return {"host_ms": round(host * 1e3, 4), "wall_ms": round(wall * 1e3, 4),
            "device_ms": round(ev[0].elapsed_time(ev[1]) / iters, 4) if ev else None}


def profile(fn, x, grad, iters: int, rows: int) -> str:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if x.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            x.grad = None
            fn(x).backward(grad)
        _sync(x.device)
    key = "device_time_total" if x.device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


@contextlib.contextmanager
def _settings(realize: bool, direct: bool):
    """kernels.REALIZE_DERIVED (each setting compiles its own specialisations) and the Triton path's
    DIRECT_LAUNCH set for one variant."""
    tk = kernels._triton()
    tk = tk if tk.triton is not None else None
    old = kernels.REALIZE_DERIVED, tk and tk.DIRECT_LAUNCH
    kernels.REALIZE_DERIVED = realize
    if tk:
        tk.DIRECT_LAUNCH = direct
    try:
        yield
    finally:
        kernels.REALIZE_DERIVED = old[0]
        if tk:
            tk.DIRECT_LAUNCH = old[1]


def host_profile(fn, x, grad, iters: int, rows: int) -> str:
    """cProfile of ``iters`` forward + backward calls: the host's Python time by function (tottime)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        x.grad = None
        fn(x).backward(grad)
    prof.disable()
    _sync(x.device)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(rows)
    return out.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="256,64,32,32")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the medians are printed")
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--kernels", default="auto", help="kernel mode (auto, cpp, compiled, triton, eager); "
                    "`compiled` on a CPU at a tiny --shape measures the compiled path's host overhead without a GPU")
    ap.add_argument("--no-profile", action="store_true", help="only the timings, no profiler tables")
    ap.add_argument("--forms", action="store_true", help="also the fused pair with the derived parameter quantities "
                    "left inside the compiled kernels (kernels.REALIZE_DERIVED off), to compare on one device")
    ap.add_argument("--triton", action="store_true", help="also the fused pair on salunet's hand-written Triton "
                    "kernels (kernel mode triton; CUDA), launched directly and through Triton's launcher")
    ap.add_argument("--cprofile", action="store_true", help="also cProfile's table of each variant's host time by "
                    "Python function (where the issuing time goes)")
    args = ap.parse_args(argv)
    kernels.set_kernel_mode(args.kernels)
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    shape = tuple(int(s) for s in args.shape.split(","))
    c = shape[1]
    torch.manual_seed(0)
    x = torch.randn(shape, device=dev).to(dt).requires_grad_()
    grad = torch.randn(shape, device=dev).to(dt)
    bn, relu = nn.BatchNorm2d(c).to(dev), nn.ReLU()
    pair = SALUAct(SALU(c), SWALU(c)).to(dev)
    # name -> (function, kernels.REALIZE_DERIVED, the Triton path's DIRECT_LAUNCH while it runs forward and backward)
    variants = {"batchnorm2d+relu": (lambda t: relu(bn(t)), True, True),
                "salu+swalu (fused SALUAct)": (pair, True, True)}
    if args.forms:
        variants["salu+swalu (fused SALUAct, derived inlined)"] = (pair, False, True)
        if not kernels.kernel_path(dev).startswith("compiled"):
            print(f"profile_op: --forms compares two forms of the compiled path; {dev} runs "
                  f"{kernels.kernel_path(dev)}, so both rows run the same code (add --kernels compiled)")
    if args.triton:
        why = kernels._triton().unavailable_reason(dev)
        if why is None:
            def on_triton(t):
                with kernels.using_kernel_mode("triton"):
                    return pair(t)
            variants["salu+swalu (fused SALUAct, Triton kernels)"] = (on_triton, True, True)
            variants["salu+swalu (fused SALUAct, Triton kernels, Triton's launcher)"] = (on_triton, True, False)
            print(f"profile_op: Triton kernels launched {kernels._triton().launch_path()} in the first row")
        else:
            print(f"profile_op: --triton: no row ({why})")
    print(f"profile_op: {shape} {args.dtype} on {dev}; kernels: {kernels.kernel_path(dev)}")
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
        for name, (fn, *settings) in variants.items():
            with _settings(*settings):
                runs[name].append(measure(fn, x, grad, args.iters))
    base = None
    for name, rs in runs.items():
        med = {k: (statistics.median(r[k] for r in rs) if rs[0][k] is not None else None) for k in rs[0]}
        base = base or med
        ratio = {f"{k}_vs_bn": round(med[k] / base[k], 3) for k in med if med[k] is not None}
        print(json.dumps({"variant": name, "repeats": args.repeats, **med, **ratio}))
    if args.cprofile:
        for name, (fn, *settings) in variants.items():
            print(f"\n== {name}: cProfile, {args.iters} calls (host time by function) ==")
            with _settings(*settings):
                print(host_profile(fn, x, grad, args.iters, args.rows))
    if args.no_profile:
        return 0
    for name, (fn, *settings) in variants.items():
        print(f"\n== {name}: torch.profiler, {args.iters} calls ==")
        with _settings(*settings):
            print(profile(fn, x, grad, args.iters, args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
