"""What ``--salu-project-grad``'s backward costs per training step: the C++ kernel against the op-by-op form.

    OMP_NUM_THREADS=1 python scripts/bench_projection.py [--model salunet_c50_v2] [--overrides '{"stem": "cifar"}']
                                                         [--width 16] [--batch 128] [--repeats 7]

One forward of the model on a random batch records the input of every SALU site (what the projection acts on);
then each repeat times, for each path in turn, the projection's backward at every site (the sites' inputs and
random gradients of their shapes), summed over the sites: one training step's worth. The C++ path is
``kernels.radial_project`` (SALUNET_KERNELS=cpp), the op-by-op one the same backward with SALUNET_KERNELS=eager.
Prints the median milliseconds per step of each and their ratio, and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from salunet.models import create_model
from salunet.train.config import parse_value
from salunet.nn import kernels
from salunet.train.recalibrate import project_radial_grad, salu_sites


def site_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, int | None]]:
    """(input, channel axis) of every SALU site in one forward of ``x``."""
    seen = []
    handles = [m.register_forward_pre_hook(lambda mod, a, s=salu: seen.append((a[0].detach(), s.channel_axis(a[0]))))
               for m, salu in salu_sites(model).values()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def time_path(mode: str, sites, grads) -> float:
    with kernels.using_kernel_mode(mode):
        t = time.perf_counter()
        for (x, axis), g in zip(sites, grads):
            xi = x.requires_grad_()
            project_radial_grad(xi, axis).backward(g)
            xi.grad = None
        return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", default="salunet_c50_v2")
    p.add_argument("--overrides", default='{"stem": "cifar"}', help="the model's keyword arguments as JSON")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    try:
        overrides = parse_value("model_overrides", a.overrides)  # the trainer's --model-overrides parser
    except ValueError as exc:
        p.error(f"--overrides: {exc}")
    if a.repeats <= 0 or a.batch <= 0:
        p.error("--repeats and --batch must be positive")
    if kernels.kernel_path("cpu").startswith("eager"):
        p.error(f"the C++ kernels are not available here ({kernels.kernel_path('cpu')}): nothing to compare")
    torch.manual_seed(0)
    model = create_model(a.model, num_classes=10, width=a.width, **overrides)
    sites = site_inputs(model, torch.randn(a.batch, 3, a.size, a.size))
    grads = [torch.randn_like(x) for x, _ in sites]
    for mode in ("cpp", "eager"):  # warm-up
        time_path(mode, sites, grads)
    times = {"cpp": [], "eager": []}
    for _ in range(a.repeats):
        for mode in times:
            times[mode].append(time_path(mode, sites, grads))
    ms = {mode: round(1e3 * statistics.median(v), 2) for mode, v in times.items()}
    out = {"model": a.model, "overrides": overrides, "width": a.width, "batch": a.batch, "sites": len(sites),
           "elements": sum(x.numel() for x, _ in sites), "threads": torch.get_num_threads(), "ms_per_step": ms,
           "cpp_to_eager": round(statistics.median(times["cpp"]) / statistics.median(times["eager"]), 3)}
    print(f"{a.model}: {len(sites)} SALU sites, {out['elements']:,} input values per step")
    print(f"  op by op: {ms['eager']:8.2f} ms/step\n  C++:      {ms['cpp']:8.2f} ms/step  ({out['cpp_to_eager']:.3f}x)")
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
