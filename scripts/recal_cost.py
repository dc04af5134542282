"""What ``--salu-recalibrate-every N`` costs per training step: one SGD step of a model with and without the
recalibration, interleaved in one process, as a ratio to the step without it.

    python scripts/recal_cost.py [--model salunet_c18_v2] [--width 16] [--batch 128] [--every 1,10] [--repeats 7]
                                 [--measure forward,step,module,recipe] [--device cpu|cuda] [--compile]
                                 [--overrides '{"stem": "cifar"}'] [--reference 32]

``--measure``: ``forward`` is the extra forward per recalibration with a forward pre-hook per SALU site on the
uncompiled model (``recalibrate_salu``, the trainer's path before ``pin_in_forward``; settings named ``N``);
``module`` is that forward with the sites pinning themselves, through the model as it trains (``pin_in_forward``,
the trainer's path: with ``--compile`` one more compiled graph; settings named ``N:module``); ``step`` gathers the
statistics in the training forward (``--salu-recalibrate-measure step``, rate 0.5; settings named ``N:step``);
``project`` is ``forward`` with ``--salu-project-grad`` (settings named ``N:project``); ``recipe`` is ``module``
with ``--salu-project-grad``, the measured-best pinned recipe as the trainer runs it (``salunet.SaluPin``; with
``--every 1`` and ``--batch 128`` its extra forward is the reference images', settings named ``N:recipe``).
``--overrides``: the model's keyword arguments as JSON (``--model-overrides``). ``--compile``: the training
steps run the ``torch.compile`` of the model (``forward`` and ``module`` only: the others' hooks would have to be
traced from the start); the warm-up compiles both graphs before anything is timed. ``--reference N``: ``module`` and
``recipe`` pin on N images of their own (``--salu-reference-images N``, which may exceed the batch: at small batch
sizes the pin's forward is the larger; default: on the training batch itself).

Each repeat times ``--steps`` optimizer steps (forward, backward, SGD) per setting, the settings in turn, on the
same random batch; it prints the median time per step of every setting and its ratio to no recalibration, and one
JSON line with all of it. Run it with OMP_NUM_THREADS set, as the trainer's runs are (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from salunet.models import create_model
from salunet.train.config import parse_value
from salunet.train.recalibrate import GradientProjection, StepStatistics, pin_in_forward, recalibrate_salu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(model, opt, x, y, n: int, every: int, start: int, measure: str = "forward", train=None,
           x_ref: torch.Tensor | None = None) -> float:
    train = model if train is None else train
    x_ref = x if x_ref is None else x_ref
    stats = StepStatistics(model) if every and measure == "step" else None
    if stats is not None:  # one untimed step gathers: timed steps then pin from statistics, as all but an epoch's
        _steps(model, opt, x, y, 1, 0, 0)  # first do in the trainer (which pins that one with the extra forward)
    proj = GradientProjection(model) if every and measure in ("project", "recipe") else None
    _sync(x.device)
    t = time.perf_counter()
    for s in range(start, start + n):
        if every and measure in ("module", "recipe"):
            if s % every == 0:
                pin_in_forward(model, x_ref, 0.5, forward=train)
        elif every and s % every == 0 and (stats is None or stats.pin(0.5, 0.5) is None):  # as the trainer does
            recalibrate_salu(model, [x], 0.5, training_shape=True)
        loss = F.cross_entropy(train(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(x.device)
    for hooks in (stats, proj):
        if hooks is not None:
            hooks.remove()
    return (time.perf_counter() - t) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", default="salunet_c18_v2")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--every", default="1,10", help="comma-separated N of --salu-recalibrate-every to time")
    p.add_argument("--steps", type=int, default=10, help="steps per setting and repeat")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the kernels' default path on that device)")
    p.add_argument("--measure", default="forward",
                   help="comma-separated: forward (extra forward, hooks), module (extra forward, the sites pin), step "
                   "(training's), project (forward + projection), recipe (module + projection)")
    p.add_argument("--overrides", default="{}", help="the model's keyword arguments as JSON, e.g. '{\"stem\": \"cifar\"}'")
    p.add_argument("--compile", action="store_true", help="train through torch.compile of the model")
    p.add_argument("--reference", type=int, default=None,
                   help="module and recipe pin on N images of their own (default: on the training batch)")
    a = p.parse_args(argv)
    measures = a.measure.split(",")
    if not measures or any(m not in ("forward", "module", "step", "project", "recipe") for m in measures):
        p.error(f"--measure: {a.measure!r} is not a comma-separated list of forward, module, step, project, recipe")
    try:
        overrides = parse_value("model_overrides", a.overrides)  # the trainer's --model-overrides parser
    except ValueError as exc:
        p.error(f"--overrides: {exc}")
    if a.compile and any(m in ("step", "project", "recipe") for m in measures):
        p.error("--compile: --measure step, project and recipe attach hooks the compiled graph would have to trace "
                "from the start; use --measure forward,module")
    try:
        everies = [int(v) for v in a.every.split(",")]
    except ValueError:
        p.error(f"--every: {a.every!r} is not a comma-separated list of whole numbers")
    if any(e <= 0 for e in everies) or a.steps <= 0 or a.repeats <= 0:
        p.error("--every, --steps and --repeats must be positive")
    if a.reference is not None and a.reference <= 0:
        p.error(f"--reference: {a.reference} images; pass a positive number (e.g. 32)")
    try:
        device = torch.device(a.device)
    except RuntimeError:
        p.error(f"--device: {a.device!r} is not a device (cpu, cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu")
    torch.manual_seed(0)
    model = create_model(a.model, num_classes=10, width=a.width, **overrides).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    y = torch.randint(0, 10, (a.batch,), device=device)
    x_ref = None if a.reference is None else torch.randn(a.reference, 3, a.size, a.size, device=device)
    train = torch.compile(model) if a.compile else model
    settings = [(0, "forward")] + [(e, m) for m in measures for e in everies]
    names = {st: str(st[0]) if st[1] == "forward" else f"{st[0]}:{st[1]}" for st in settings}
    times: dict[tuple, list[float]] = {st: [] for st in settings}
    for m in sorted({"forward", *measures}):  # warm-up (the C++ kernels' first use, the compiled graphs)
        _steps(model, opt, x, y, 2, 1, 0, m, train, x_ref)
    step = 0
    for _ in range(a.repeats):
        for st in settings:
            times[st].append(_steps(model, opt, x, y, a.steps, st[0], step, st[1], train, x_ref))
            step += a.steps
    base = statistics.median(times[settings[0]])
    out = {"model": a.model, "overrides": overrides, "device": str(device), "width": a.width, "batch": a.batch,
           "reference": a.reference, "threads": torch.get_num_threads(), "compile": a.compile,
           "ms_per_step": {names[st]: round(1e3 * statistics.median(times[st]), 2) for st in settings},
           "ratio_to_off": {names[st]: round(statistics.median(times[st]) / base, 3) for st in settings}}
    for st in settings:
        label = "no recalibration" if st[0] == 0 else f"every {st[0]} step(s), {st[1]}"
        print(f"{label:>28}: {out['ms_per_step'][names[st]]:8.2f} ms/step  ({out['ratio_to_off'][names[st]]:.3f}x)")
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
