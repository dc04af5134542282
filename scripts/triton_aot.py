"""Compile salunet's hand-written Triton kernels for a GPU target ahead of time, on a machine without a GPU.

    python scripts/triton_aot.py [--arch 90] [--quick] [--regs]

Triton's front end, its optimisation passes and ptxas (shipped in the triton wheel) need no device, so every
specialisation the kernels can take (7 ops x forward / backward x input dtype x the two tilings) is compiled to a
cubin here. This catches what Triton's interpreter, which runs the kernels in numpy for the CPU tests
(tests/test_triton.py), does not check: the compiler's typing rules (e.g. every ``return`` of a function typed
alike, even behind a constexpr ``if``). It does not run them: that needs the GPU (docs/GPU.md). The tile sizes and
warps are those the wrappers pick (``_geometry``, ``_TILES``, ``_WARPS``) for a ResNet's NCHW map (256, 64, 32, 32) and its
channels_last twin. ``--quick``: the richest specialisations only (tests/test_triton.py runs it); ``--regs``: also
ptxas's registers and spilled bytes per kernel (a kernel that spills is slower than its traffic says). Prints one
line per failure and a count; exit 1 if anything failed.
"""
from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp64": "fp64"}


def compile_one(op: str, x_dtype: str, rows: bool, direction: str, arch: int = 90):
    """Compile one specialisation of the forward or backward kernel of ``op`` for CUDA sm_``arch``; return the
    compiled kernel (its ``asm`` holds the PTX and cubin). Raises the compiler's error."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from salunet.nn import triton_kernels as tk

    first, gate, res = tk._OP_FLAGS[op]
    f64 = x_dtype == "fp64"
    pt = "*fp64" if f64 else "*fp32"
    xt = "*" + DTYPE[x_dtype]
    params = {k: pt for k in ("a1_ptr", "b1_ptr", "a2_ptr", "b2_ptr")}
    layout = (256, 64, 1024) if rows else (256 * 1024, 64, 1)
    _, _, rows_, bm, bn, iters, _, _ = tk._geometry(*layout, tk._PROGRAMS, tk._TILES[direction])
    assert rows_ == rows
    const = dict(FIRST=first, GATE=gate, RES=res, LOG=True, LIMIT=30.0, CDT=tl.float64 if f64 else tl.float32,
                 LIM=1e150 if f64 else 1e18, SAT=2.0**28 if f64 else 2.0**13, ROWS=rows, BM=bm, BN=bn, ITERS=iters)
    if direction == "fwd":
        fn = tk._forward_kernel
        sig = {"x_ptr": xt, "res_ptr": xt, "y_ptr": xt, **params, "M": "i32", "N": "i32", "C": "i32", "GRID_N": "i32"}
    else:
        fn = tk._backward_kernel
        sig = {"g_ptr": xt, "x_ptr": xt, "res_ptr": xt, "gx_ptr": xt, "gres_ptr": xt, "part_ptr": pt, **params,
               "M": "i32", "N": "i32", "C": "i32", "P": "i32", "GRID_N": "i32"}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": tk._WARPS})


def registers(kernel, arch: int = 90) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) that ptxas reports for a compiled kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o",
                              str(Path(d) / "k.cubin")], capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0


QUICK = [("salu_add_galu", "bf16", rows, d) for rows in (True, False) for d in ("fwd", "bwd")] + \
    [("salu", "fp64", True, "bwd"), ("swalu", "fp32", False, "bwd")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100 / H200)")
    ap.add_argument("--quick", action="store_true", help="only the richest specialisations (%d)" % len(QUICK))
    ap.add_argument("--regs", action="store_true", help="print ptxas's registers and spill stores per kernel")
    args = ap.parse_args(argv)
    from salunet.nn.kernels import OPS

    cases = QUICK if args.quick else list(itertools.product(OPS, ("bf16", "fp16", "fp32", "fp64"), (True, False),
                                                            ("fwd", "bwd")))
    t0, failed = time.time(), 0
    for op, dt, rows, direction in cases:
        try:
            kernel = compile_one(op, dt, rows, direction, args.arch)
            if args.regs:
                regs, spill = registers(kernel, args.arch)
                print(f"{op} {dt} {'rows' if rows else 'columns'} {direction}: {regs} registers, {spill} bytes spilled")
        except Exception as exc:  # noqa: BLE001 - the compiler raises many types; each is reported
            failed += 1
            print(f"FAILED {op} {dt} {'rows' if rows else 'columns'} {direction}: "
                  f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
    print(f"triton_aot: {len(cases) - failed} of {len(cases)} specialisations compiled for sm_{args.arch} "
          f"in {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
