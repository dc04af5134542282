"""Pin every SALU's operating point between epochs, with no batch statistics in the forward.

``salunet train --salu-recalibrate K`` (docs/RESULTS.md "Pinning the SALU inputs' scale"). SALU's argument is
t = sqrt(ab) x, and scaling its input x by c is the same function as scaling a and b by c (the amplitude
A = sqrt(a/b) is unchanged). So the fraction of a channel's inputs that SALU saturates depends only on
sqrt(ab) * rms(x). BatchNorm keeps its output at unit scale whatever the kernels before it learn, at every step,
from the batch; the normalization-free models cannot, and the 12-epoch weight-decay sweep measured their SALU
inputs drifting (shrinking with centred kernels, growing past the knee with scaled WS).

:func:`recalibrate_salu` measures, per SALU channel, the RMS of its input over a few training batches (no
gradient, the model in eval mode) and sets log a and log b so that sqrt(ab) * rms = K, the same K for every
channel. The forward stays a pointwise function of each sample: batch size 1, inference and export are
untouched; only the parameters move, once an epoch, and the checkpoint holds them (a resumed run repeats the same
recalibrations, since the batches are the epoch's seeded ones). Under DDP the per-channel sums are all-reduced,
so every rank sets the same parameters.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ..nn import SALU, SALUAct

__all__ = ["salu_sites", "salu_input_rms", "recalibrate_salu"]


def salu_sites(model: nn.Module) -> dict[str, tuple[nn.Module, SALU]]:
    """name -> (module whose input is the SALU's input, the SALU holding log a / log b): every standalone SALU and
    the SALU of every fused SALU -> gate module (SALUAct, SALUAddAct), whose inner SALU's forward never runs."""
    inner = {id(m.norm) for m in model.modules() if isinstance(m, SALUAct)}
    sites = {}
    for name, m in model.named_modules():
        if isinstance(m, SALUAct):
            sites[name] = (m, m.norm)
        elif isinstance(m, SALU) and id(m) not in inner:
            sites[name] = (m, m)
    return sites


@torch.no_grad()
def salu_input_rms(model: nn.Module, batches: Iterable, reduce: Callable[[Tensor], Tensor] | None = None
                   ) -> dict[str, Tensor]:
    """Per-channel RMS of every SALU site's input over ``batches`` (each a tensor or a tuple whose first item is
    the input), as float64 vectors (a 0-d tensor for scalar-parameter SALUs). ``reduce``: sums over processes
    (DDP's all-reduce), applied to the stacked (sum of squares, count) of each site."""
    sites = salu_sites(model)
    sums: dict[str, list] = {}

    def hook_for(name, salu):
        def hook(_m, args):
            x = args[0].detach().double()
            axis = salu.channel_axis(x)
            if axis is None:  # scalar parameters: one RMS for the whole tensor
                s2, n = (x * x).sum(), float(x.numel())
            else:
                s2 = (x * x).movedim(axis, -1).reshape(-1, x.shape[axis]).sum(0)
                n = float(x.numel() // x.shape[axis])
            prev = sums.get(name)
            sums[name] = [s2, n] if prev is None else [prev[0] + s2, prev[1] + n]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name, salu)) for name, (m, salu) in sites.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, (s2, n) in sums.items():
        if reduce is not None:
            packed = reduce(torch.cat([s2.reshape(-1), torch.tensor([n], dtype=torch.float64, device=s2.device)]))
            s2, n = packed[:-1].reshape(s2.shape), packed[-1].item()
        out[name] = (s2 / n).sqrt()
    return out


@torch.no_grad()
def recalibrate_salu(model: nn.Module, batches: Iterable, target: float,
                     reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """Set every SALU channel's log a and log b so that sqrt(ab) * rms(input) = ``target`` (module docstring).

    Channels whose input is exactly 0 are left as they are. Returns, per site, the median factor c applied to
    a and b (1 = no change), for the log."""
    if not (target > 0 and math.isfinite(target)):
        raise ValueError(f"SALU recalibration target must be a positive number, got {target}")
    rms = salu_input_rms(model, batches, reduce)
    sites = salu_sites(model)
    factors = {}
    for name, r in rms.items():
        salu = sites[name][1]
        la, lb = salu.log_a, salu.log_b
        sab = torch.exp(0.5 * (la.double() + lb.double())).reshape(r.shape)
        arg = sab * r
        log_c = torch.where(arg > 0, torch.log(target / arg.clamp_min(1e-300)), torch.zeros_like(arg))
        la.add_(log_c.reshape(la.shape).to(la.dtype))
        lb.add_(log_c.reshape(lb.shape).to(lb.dtype))
        factors[name] = float(torch.exp(log_c).median())
    return factors
