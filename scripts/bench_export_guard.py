"""Side measurement for docs/BENCHMARKS.md: what the export guard costs.

Every fused-kernel call first asks whether a graph is being recorded (``torch.jit.is_tracing() or
torch.compiler.is_exporting()``, nn/kernels.py) so that exports see plain ops. This prints that check's time per
call (net of an empty call), and its share of a fused SALU -> SWALU forward + backward (small and large inputs) and
of a whole salunet_c18_v2 training step (width 16, batch 128), counting the guarded calls each one makes.

    python scripts/bench_export_guard.py [THREADS]      # default 1 thread; medians of interleaved repeats
"""
import statistics
import sys
import time

import torch

import salunet
from salunet.nn import kernels


def _median_per_call(fn, n: int, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def _guarded_calls(fn) -> int:
    """How many fused-kernel calls ``fn`` makes (each asks the guard once, when not tracing)."""
    count, original = [0], kernels._is_exporting

    def counting():
        count[0] += 1
        return original()

    kernels._is_exporting = counting
    try:
        fn()
    finally:
        kernels._is_exporting = original
    return count[0]


def main(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    guard_s = (_median_per_call(lambda: torch.jit.is_tracing() or kernels._is_exporting(), 200_000)
               - _median_per_call(lambda: False, 200_000))
    print(f"guard: {1e9 * guard_s:.0f} ns per kernel call (net of an empty call)")
    for shape in [(1, 16, 8, 8), (64, 16, 32, 32)]:
        pair = salunet.SALUAct(salunet.SALU(shape[1]), salunet.SWALU(shape[1]))
        x0, grad = torch.randn(shape), torch.randn(shape)

        def step():
            pair(x0.clone().requires_grad_()).backward(grad)

        for _ in range(20):
            step()
        t, n = _median_per_call(step, 50, repeats=15), _guarded_calls(step)
        print(f"SALU->SWALU fwd+bwd {shape}: {1e6 * t:.1f} us, {n} guarded call(s): guard share "
              f"{100 * n * guard_s / t:.3f}%")
    model = salunet.create_model("salunet_c18_v2", num_classes=10, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def train_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):
        train_step()
    t, n = _median_per_call(train_step, 1, repeats=7), _guarded_calls(train_step)
    print(f"salunet_c18_v2 width 16 batch 128 training step: {1e3 * t:.1f} ms, {n} guarded calls: guard share "
          f"{100 * n * guard_s / t:.4f}%")
    print(f"torch {torch.__version__}, {threads} thread(s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
