"""What ``--amp bf16`` / ``fp16`` costs on this CPU: one SGD step of a model (forward, backward, update) under
autocast against the same step in float32, interleaved in one process, as a ratio (median of ``--repeats``); with
the bare convolution and matrix product of the same dtype beside it. On a CPU without native half precision in
oneDNN (``salunet doctor``: "CPU bf16 / fp16") torch takes its slow fallback paths, and the trainer says so
(``amp_note`` in train/evaluate.py); this measures how slow.

    OMP_NUM_THREADS=1 python scripts/cpu_amp_cost.py [--model salunet_c18] [--width 16] [--batch 32]
                                                      [--amp bf16] [--repeats 5]

Prints one line per measurement and one JSON line with all of it (docs/BENCHMARKS.md "Side measurements").
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from salunet.models import create_model
from salunet.train.evaluate import cpu_has_native


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitives, the kernels' first call
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="salunet_c18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--amp", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    dtype = torch.bfloat16 if a.amp == "bf16" else torch.float16
    torch.manual_seed(0)
    model = create_model(a.model, num_classes=10, width=a.width)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(a.batch, 3, 32, 32), torch.randint(0, 10, (a.batch,))

    def step(half: bool):
        def run():
            with torch.autocast("cpu", dtype=dtype, enabled=half):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    conv, img = torch.nn.Conv2d(a.width, a.width, 3, padding=1), torch.randn(a.batch, a.width, 32, 32)
    mat, w = torch.randn(4096, 384), torch.randn(384, 384)
    conv_half, img_half = torch.nn.Conv2d(a.width, a.width, 3, padding=1).to(dtype), img.to(dtype)
    mat_half, w_half = mat.to(dtype), w.to(dtype)
    cases = {"train step": (step(False), step(True)),
             "conv 3x3": (lambda: conv(img), lambda: conv_half(img_half)),
             "matmul 4096x384x384": (lambda: mat @ w, lambda: mat_half @ w_half)}
    out = {"model": a.model, "width": a.width, "batch": a.batch, "amp": a.amp, "native": cpu_has_native(a.amp),
           "cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    for name, (full, half) in cases.items():
        t32, t16 = _median_s(full, a.repeats), _median_s(half, a.repeats)
        out[name] = {"float32_s": t32, f"{a.amp}_s": t16, "ratio": t16 / t32}
        print(f"{name:22s} float32 {t32 * 1e3:9.2f} ms   {a.amp} {t16 * 1e3:9.2f} ms   {t16 / t32:6.1f}x", flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
