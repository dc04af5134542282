"""How much of the loss gradient at each SALU input lies along the input itself: the part that
``--salu-project-grad`` removes, and that the gradient through a scale normalisation's statistic removes.

    python scripts/radial_share.py [--data-path ../shared/data/cifar10.npz | digits] [--images 512] [--width 16]
                                   [--json FILE] RUN_OR_MODEL...

RUN_OR_MODEL is a run directory (its last checkpoint, raw weights) or ``init:MODEL`` (a freshly initialised
registered model at ``--width``, seed 0). On the first ``--images`` training images (normalised per channel, no
augmentation; batches of 128; the model in train mode, no hooks), for every SALU site and channel c it measures
the radial share

    r_c = (sum g x)^2 / (sum g^2 * sum x^2)       (sums over the batch and the positions)

of two gradients: ``g_in``, the loss gradient at the SALU input (what the projection sees), and ``g_out = g_in /
SALU'(x)``, the gradient at the SALU output, i.e. before SALU's derivative a / (1 + ab x^2)^(3/2) weights it. r is
1 when the gradient only rescales the channel and 1/n on average for a direction unrelated to x (n values per
channel). It prints, per stage (stem, layer1..layer4), the mean over the stage's sites and channels of n*r(g_in)
and n*r(g_out), i.e. in units of a random direction's share, and, with ``--json``, writes every site's r and n
(and, below, t and the mean rho per channel).

Whether the radial part is a steady push or noise: per batch j and channel c, the coefficient

    rho_cj = sum g_in x / sum x^2          (what the projection subtracts: g_in - rho x)

A descent step moves x against g, so rho < 0 asks the channel's scale to grow, rho > 0 to shrink; a per-step pin
undoes either. Over the full batches (a short last one is left out: the mean loss's gradient scales as 1/B), per
channel, t_c = mean_j rho / (std_j rho / sqrt(J)); the script prints the stage means of |t| (0.84 for pure noise
over 16 batches, 1.1 over 4; large for a push that keeps its sign from batch to batch) and the share of channels
pushed to grow (mean rho < 0). Used in docs/RESULTS.md "The curve and the statistic's gradient".
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from salunet.train.recalibrate import salu_sites

sys.path.insert(0, str(Path(__file__).resolve().parent))
from salu_operating_point import add_arguments, labelled_training_images, model_of  # noqa: E402  (same runs, data)


def _channel_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    return tuple(range(x.dim())) if axis is None else tuple(d for d in range(x.dim()) if d != axis % x.dim())


def radial_shares(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> dict[str, dict]:
    """Per SALU site: per-channel radial shares of g_in and g_out (float64 sums over every batch), in forward
    order. The gradients are the mean cross-entropy's of each batch."""
    model.train()
    sites = salu_sites(model)
    sums: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(0, len(x), batch):
        seen: dict[str, tuple[torch.Tensor, torch.nn.Module]] = {}

        def hook(name, salu):
            def pre(module, args):
                if args[0].requires_grad:
                    args[0].retain_grad()
                    seen[name] = (args[0], salu)
            return pre

        handles = [m.register_forward_pre_hook(hook(n, s)) for n, (m, s) in sites.items()]
        try:
            F.cross_entropy(model(x[i:i + batch]), y[i:i + batch]).backward()
        finally:
            for h in handles:
                h.remove()
        model.zero_grad(set_to_none=True)
        for name, (xin, salu) in seen.items():
            v, g_in = xin.detach().double(), xin.grad.double()
            axis = salu.channel_axis(v)
            dims = _channel_dims(v, axis)
            shape = [1] * v.dim()
            if axis is not None:
                shape[axis % v.dim()] = -1
            a, b = salu.a.double().reshape(shape), salu.b.double().reshape(shape)
            g_out = g_in * (1 + a * b * v * v).pow(1.5) / a
            acc = sums.setdefault(name, defaultdict(lambda: 0))
            for key, g in (("in", g_in), ("out", g_out)):
                acc[f"gx_{key}"] = acc[f"gx_{key}"] + (g * v).sum(dims)
                acc[f"gg_{key}"] = acc[f"gg_{key}"] + (g * g).sum(dims)
            xx = (v * v).sum(dims)
            acc["xx"] = acc["xx"] + xx
            rho = acc.setdefault("rho", [])
            if len(x[i:i + batch]) == batch:  # the mean loss's gradient scales as 1/B: a short last batch is left out
                rho.append(((g_in * v).sum(dims) / xx.clamp_min(1e-300)).tolist())
            acc["n"] = acc["n"] + v.numel() // (1 if axis is None else v.shape[axis])
    out = {}
    for name, acc in sums.items():
        out[name] = {key: (acc[f"gx_{key}"] ** 2 / (acc[f"gg_{key}"] * acc["xx"]).clamp_min(1e-300)).tolist()
                     for key in ("in", "out")}
        out[name]["n"] = int(acc["n"])
        out[name]["rho"] = acc["rho"]  # per batch, per channel
    return out


def push_consistency(rho: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, from the per-batch coefficients ``rho`` (full batches x channels): the t statistic of the mean
    coefficient, mean / (std / sqrt(J)) (J >= 2 batches), and the mean. A channel whose every batch gave the same
    value (a dead channel: rho = 0) gets t = 0; NaN stays NaN."""
    r = np.asarray(rho, dtype=np.float64)
    if r.shape[0] < 2:
        raise ValueError(f"push consistency needs at least 2 full batches, got {r.shape[0]}: raise --images")
    mean, sd = r.mean(0), r.std(0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / (sd / np.sqrt(r.shape[0]))
    return np.where(sd == 0, 0.0, t), mean


def _record(site: dict) -> dict:
    """A site's entry in the --json file: r and n, and the push statistic per channel (t, the mean rho and the
    number of batches) instead of every batch's rho."""
    out = {k: v for k, v in site.items() if k != "rho"}
    out["batches"] = len(site["rho"])
    if out["batches"] >= 2:
        t, mean = push_consistency(site["rho"])
        out["t"], out["rho_mean"] = t.tolist(), mean.tolist()
    return out


def stage_of(name: str) -> str:
    for s in ("layer1", "layer2", "layer3", "layer4"):
        if name.startswith(s):
            return s
    return "stem"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--json", default=None, help="write every site's per-channel shares here")
    args = ap.parse_args(argv)
    data = labelled_training_images(args.data_path, args.images, "the loss gradient needs the labels")
    if data is None:
        return 2
    x, y = data
    record = {}
    for spec in args.runs:
        shares = radial_shares(model_of(spec, args.width, x.shape[1]), x, y)
        record[spec] = {name: _record(r) for name, r in shares.items()}
        per_stage = defaultdict(lambda: {"in": [], "out": [], "t": [], "grow": []})
        for name, r in shares.items():
            for key in ("in", "out"):
                per_stage[stage_of(name)][key].extend(v * r["n"] for v in r[key])
            if len(r["rho"]) >= 2:
                t, mean = push_consistency(r["rho"])
                per_stage[stage_of(name)]["t"].extend(np.abs(t))
                per_stage[stage_of(name)]["grow"].extend(mean < 0)
        print(f"{spec}: " + "  ".join(f"{s} {np.mean(v['in']):.1f}/{np.mean(v['out']):.1f}"
                                      for s, v in per_stage.items()) + "   (n*r(g_in) / n*r(g_out), stage means)")
        batches = len(next(iter(shares.values()), {"rho": []})["rho"])
        if batches < 2:
            print(f"{' ' * len(spec)}  (fewer than 2 full batches or no SALU: no radial push statistic; "
                  "--images 256 or more gives it)")
            continue
        print(f"{' ' * len(spec)}  " + "  ".join(f"{s} |t| {np.mean(v['t']):.1f}, grow {np.mean(v['grow']):.0%}"
                                                for s, v in per_stage.items())
              + f"   (the radial push over {batches} batches, stage means)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
