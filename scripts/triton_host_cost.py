"""The host time of the Triton path's Python side, without a GPU: a fused SALU + SWALU forward + backward with
Triton's kernel launches replaced by no-ops, beside BatchNorm2d + ReLU and the eager path on the same tiny CPU
tensor (for scale: there their time is mostly the host's too).

    python scripts/triton_host_cost.py [--shape 8,64,4,4] [--iters 50] [--repeats 41]

What it measures: the autograd Function, the layout and tiling, the output and partial-sum allocations, the
reduction of the partial sums and the direct launch's key, on CPU tensors (a CPU allocation and a small sum stand
in for their CUDA launches, which are asynchronous and cost the host a few microseconds each). What it leaves out:
Triton's own launcher (two launches per forward + backward), which only a GPU can time (scripts/profile_op.py
--triton --cprofile on the GPU machine).
Prints one JSON line: the medians over interleaved repeats, in microseconds per forward + backward.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from salunet import SALU, SWALU, SALUAct
from salunet.nn import kernels


class _NoCompiled:
    """Stands in for a Triton CompiledKernel: its launcher does nothing."""
    function = packed_metadata = None

    def run(self, *args):
        return None


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing and returns a compiled kernel
    that does nothing, so that later calls take the direct launch (its keys and argument lists are timed)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _NoCompiled()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8,64,4,4", help="the input (the host cost does not depend on its size, "
                    "except for the allocations; the default keeps those small)")
    ap.add_argument("--iters", type=int, default=50, help="calls per timed block")
    ap.add_argument("--repeats", type=int, default=41, help="interleaved blocks per variant (many short blocks: the "
                    "median shrugs off a busy machine's bursts)")
    args = ap.parse_args(argv)
    tk = kernels._triton()
    if tk.triton is None:
        raise SystemExit(f"triton_host_cost: {tk.unavailable_reason(torch.device('cpu'))}")
    tk._forward_kernel = tk._backward_kernel = _NoLaunch()
    tk.unavailable_reason = lambda device: None  # CPU tensors take the path; the kernels do nothing
    tk._direct_supported = lambda: True  # the direct launch, as with Triton 3.6 on a GPU
    torch._C._cuda_getCurrentRawStream = lambda index: 0  # (a CPU build has no CUDA streams)
    torch.set_num_threads(1)
    shape = tuple(int(s) for s in args.shape.split(","))
    pair = SALUAct(SALU(shape[1]), SWALU(shape[1]))
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)

    def per_call(mode: str) -> float:
        with kernels.using_kernel_mode(mode):
            t = time.perf_counter()
            for _ in range(args.iters):
                pair(x).backward(g)
            return (time.perf_counter() - t) / args.iters * 1e6

    bn_relu = torch.nn.Sequential(torch.nn.BatchNorm2d(shape[1]), torch.nn.ReLU())

    def per_call_bn() -> float:
        t = time.perf_counter()
        for _ in range(args.iters):
            bn_relu(x).backward(g)
        return (time.perf_counter() - t) / args.iters * 1e6

    times = {"triton_python_side_us": [], "batchnorm2d_relu_us": [], "eager_math_us": []}
    per_call("triton"), per_call("eager"), per_call_bn()  # warm-up
    for _ in range(args.repeats):
        times["triton_python_side_us"].append(per_call("triton"))
        times["batchnorm2d_relu_us"].append(per_call_bn())
        times["eager_math_us"].append(per_call("eager"))
    print(json.dumps({"shape": shape, "iters": args.iters, "repeats": args.repeats,
                      **{k: round(statistics.median(v), 1) for k, v in times.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
