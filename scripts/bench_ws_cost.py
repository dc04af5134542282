"""What weight standardisation costs a training step: a model with ``conv_ws`` timed as it is and with its kernels
used as stored (the standardisation skipped: a different model, for timing only), interleaved in one process,
median of the repeats. docs/BENCHMARKS.md "`salunet_c50_v2`" reads its output.

    python scripts/bench_ws_cost.py --model salunet_c50_v2 --width 16 --batch 8 --side 64 --repeats 31
    python scripts/bench_ws_cost.py --model salunet_c50_v2 --width 64 --batch 4 --side 224 --repeats 9

Prints one JSON line: the median step times (ms) and their ratio (skipped / as is).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import salunet.models.nf as nf
from salunet.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="salunet_c50_v2")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.classes, width=args.width)
    if not any(isinstance(m, nf.NFConv2d) and m.ws != "none" for m in model.modules()):
        raise SystemExit(f"bench_ws_cost: {args.model} standardises no conv kernel; give a model with conv_ws")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(args.batch, 3, args.side, args.side)
    y = torch.randint(0, args.classes, (args.batch,))
    as_is = nf.ws_kernel

    def skipped(weight, mode, gain=None, eps=1e-4):
        return weight

    def step(ws) -> float:
        nf.ws_kernel = ws
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"as_is": [], "skipped": []}
    try:
        for _ in range(2):  # warm-up
            step(as_is), step(skipped)
        for _ in range(args.repeats):  # interleaved: machine noise hits both alike
            times["as_is"].append(step(as_is))
            times["skipped"].append(step(skipped))
    finally:
        nf.ws_kernel = as_is
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(json.dumps({**vars(args), "as_is_ms": round(med["as_is"], 2), "skipped_ms": round(med["skipped"], 2),
                      "skipped_over_as_is": round(med["skipped"] / med["as_is"], 3)}))


if __name__ == "__main__":
    main()
