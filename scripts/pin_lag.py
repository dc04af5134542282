"""Does pinning from the training forward's statistics settle? Per-step corrections of the exact pin and of the
one-step-late pin at several rates, on the same batches from the same init.

    python scripts/pin_lag.py [--data-path ../shared/data/cifar10.npz] [--model salunet_c18_v2] [--width 16]
                              [--overrides '{"conv_ws": "scaled"}'] [--steps 30] [--rates 1,0.75,0.5]

For each setting it trains ``--steps`` SGD steps (lr 0.05, Nesterov momentum 0.9, batch 128, the first ``steps``
batches of the training set, no augmentation) with SALU pinned to K = 0.5 before every step: ``exact`` by one extra
forward on the step's batch (``--salu-recalibrate-measure forward``), ``r`` from the previous step's training
forward at rate r (``--salu-recalibrate-measure step``; the first step pinned exactly with the extra forward,
where the trainer pins it with the extra forward at rate r). It
prints, per step, the largest |log c| over the sites (c: the factor the pin applied to a and b): a pin that tracks
drift stays near the exact pin's, one that overshoots grows. One JSON line at the end holds every series.
Without ``--data-path`` (or with a missing file) it says so and exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from salunet.models import create_model
from salunet.train.recalibrate import StepStatistics, recalibrate_salu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from salu_operating_point import labelled_training_images  # noqa: E402  (NCHW in memory)


def _series(setting: str, args, x: torch.Tensor, y: torch.Tensor, overrides: dict) -> tuple[list[float], float]:
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, in_chans=x.shape[1], width=args.width, **overrides)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    stats = None if setting == "exact" else StepStatistics(model)
    out, loss = [], float("nan")
    for i in range(args.steps):
        xb, yb = x[i * args.batch:(i + 1) * args.batch], y[i * args.batch:(i + 1) * args.batch]
        factors = stats.pin(0.5, float(setting)) if stats is not None else None
        if factors is None:
            factors = recalibrate_salu(model, [xb], 0.5)
        out.append(round(max(abs(float(np.log(c))) for c in factors.values()), 4))
        loss_t = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        opt.step()
        loss = loss_t.item()
    return out, loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data-path", default="../shared/data/cifar10.npz")
    p.add_argument("--model", default="salunet_c18_v2")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--overrides", default='{"conv_ws": "scaled"}', help="model overrides, JSON")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rates", default="1,0.75,0.5", help="comma-separated rates of the one-step-late pin")
    a = p.parse_args(argv)
    try:
        rates = [float(r) for r in a.rates.split(",")]
        overrides = json.loads(a.overrides)
    except ValueError as exc:
        p.error(f"--rates / --overrides: {exc}")
    if any(not 0 < r <= 1 for r in rates) or a.steps <= 0 or a.batch <= 0:
        p.error("--rates must be in (0, 1]; --steps and --batch positive")
    # NCHW in memory (the permuted .npz array would be channels_last, which at width < 8 meets torch's CPU
    # bug in 1x1 stride-2 convs: models/channels_last.py); None: the file is missing, said on stderr
    data = labelled_training_images(a.data_path, a.steps * a.batch, "the training steps need the labels")
    if data is None:
        return 2
    x, y = data
    if len(x) < a.steps * a.batch:
        print(f"{a.data_path}: {len(x)} training images, {a.steps} steps of {a.batch} need {a.steps * a.batch}; "
              "lower --steps or --batch", file=sys.stderr)
        return 2
    result = {}
    for setting in ["exact"] + [str(r) for r in rates]:
        series, loss = _series(setting, a, x, y, overrides)
        result[setting] = {"max_abs_log_factor": series, "last_loss": round(loss, 4)}
        label = "exact (extra forward)" if setting == "exact" else f"a step late, rate {setting}"
        print(f"{label:>24}: largest |log c| of steps 2-{a.steps}: max {max(series[1:], default=0):.3f}, "
              f"median {float(np.median(series[1:])) if len(series) > 1 else 0:.3f}; last loss {loss:.3f}")
    print(json.dumps({"model": a.model, "width": a.width, "overrides": overrides, "steps": a.steps,
                      "series": result}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
