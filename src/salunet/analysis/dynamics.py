"""What one SGD step does to each layer of a network: the kernels' relative step and radial gradient, and how far
the per-channel gains have moved (``salunet experiment dynamics``; docs/RESULTS.md "The end gap").

Per conv kernel, per output channel c (the row W_c the optimiser steps and weight decay shrinks), from the gradient
g of the training loss (cross-entropy, the model in train mode, summed over a few batches):

- ``kernel_norm``: ||W_c||.
- ``grad_ratio``: ||g_c|| / ||W_c||, the relative step per unit learning rate (SGD moves W_c by lr * that, as a
  fraction of its norm, before momentum).
- ``radial``: |<g_c, W_c>| / (||g_c|| ||W_c||), the share of the gradient along the kernel. It is 0 for a
  scale-invariant kernel: one followed by a BatchNorm in train mode, or standardised (scaled WS), whose loss
  cannot depend on its norm. Weight decay then shrinks the norm at no cost in loss, and the effective learning
  rate lr / ||W_c||^2 rises as it does: BatchNorm's implicit learning-rate schedule. A kernel whose norm is the
  signal's scale (plain or only centred, as in ``salunet_c18_v2``) has a radial part and no such schedule.

Per-channel gain (SALU-family a and b, BatchNorm's weight, the scaled-WS gain): ``drift``, the median over
channels of |log(v / v0)| against its init value v0 (the module's ``a_init`` / ``b_init``; 1 for BatchNorm's
weight and the WS gain), and ``spread``, the std of log v over channels. A gain that stays at its init value
(drift ~ 0) is a constant, whatever its parametrisation allows.

Pure measurement: the model's parameters are left as they were (gradients are cleared afterwards); its mode is
the caller's (pass a copy in train mode to see what training sees).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..models.nf import NFConv2d
from ..nn import SaluFamily

__all__ = ["kernel_stats", "gain_stats", "dynamics_report", "dynamics_summary"]


def kernel_stats(weight: Tensor, grad: Tensor) -> dict[str, float]:
    """Mean over output channels (rows of dim 0) of ``kernel_norm``, ``grad_ratio`` and ``radial`` (module
    docstring), in float64."""
    w, g = weight.detach().double().flatten(1), grad.detach().double().flatten(1)
    wn, gn = w.norm(dim=1), g.norm(dim=1)
    ok = wn > 0
    ratio = gn[ok] / wn[ok]
    radial = (g * w).sum(1).abs()[ok] / (gn[ok] * wn[ok]).clamp_min(1e-300)  # a zero gradient row gives 0, not 0/0
    return {"kernel_norm": float(wn.mean()), "grad_ratio": float(ratio.mean()) if ok.any() else math.nan,
            "radial": float(radial.mean()) if ok.any() else math.nan, "channels": int(w.shape[0])}


def gain_stats(value: Tensor, init: float, log_value: Tensor | None = None) -> dict[str, float]:
    """``drift`` and ``spread`` (module docstring) of a per-channel gain ``value`` (> 0) with init ``init``;
    ``log_value`` when the module stores the log (SALU family), used as is."""
    lv = (value.detach().double().abs().clamp_min(1e-300).log() if log_value is None
          else log_value.detach().double())
    lv = lv.reshape(-1)
    return {"drift": float((lv - math.log(init)).abs().median()),
            "spread": float(lv.std(unbiased=False)) if lv.numel() > 1 else 0.0, "channels": int(lv.numel())}


def _gains(model: nn.Module) -> dict[str, tuple[str, Tensor, float, Tensor | None]]:
    """name -> (kind, value, init, log) for every per-channel gain of ``model``."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SaluFamily):
            kind = type(m).__name__
            out[f"{name}.a"] = (f"{kind}.a", m.a, m.a_init, m.log_a)
            out[f"{name}.b"] = (f"{kind}.b", m.b, m.b_init, m.log_b)
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
            out[f"{name}.weight"] = (f"{type(m).__name__}.weight", m.weight, 1.0, None)
        elif isinstance(m, NFConv2d) and m.gain is not None:
            out[f"{name}.gain"] = ("WS.gain", m.gain, 1.0, None)
    return out


def dynamics_report(model: nn.Module, batches) -> dict[str, dict[str, dict]]:
    """``{"kernels": {conv name: kernel_stats}, "gains": {name: {"kind": ..., **gain_stats}}}`` for ``model`` on
    ``batches`` (an iterable of ``(x, y)``): the gradient is that of the mean cross-entropy over all of them (one
    step's gradient, on one batch, is noisier and so larger). Parameters are unchanged, and each one's ``.grad``
    is what it was before the call."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    params = list(model.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        batches = list(batches)
        if not batches:
            raise ValueError("dynamics_report needs at least one (x, y) batch")
        with torch.enable_grad():
            for x, y in batches:
                (nn.functional.cross_entropy(model(x), y) / len(batches)).backward()
        kernels = {n: kernel_stats(m.weight, m.weight.grad) for n, m in convs.items() if m.weight.grad is not None}
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    gains = {n: {"kind": kind, **gain_stats(v, v0, lv)} for n, (kind, v, v0, lv) in _gains(model).items()}
    return {"kernels": kernels, "gains": gains}


def dynamics_summary(report: dict[str, dict[str, dict]], stage_of) -> dict[str, dict]:
    """Per stage (in the order they first appear; ``stage_of(name)`` names it): the mean of each kernel
    statistic over the stage's convs, ``{"kernels": {...}, "gains": {kind: {"drift": ..., "spread": ...}}}``."""
    out: dict[str, dict] = {}
    for name, st in report["kernels"].items():
        out.setdefault(stage_of(name), {"kernels": [], "gains": {}})["kernels"].append(st)
    for name, st in report["gains"].items():
        out.setdefault(stage_of(name), {"kernels": [], "gains": {}})["gains"].setdefault(st["kind"], []).append(st)

    def mean(items: list[dict], keys) -> dict:
        return {k: sum(i[k] for i in items) / len(items) for k in keys} | {"layers": len(items)}

    return {stage: {"kernels": mean(v["kernels"], ("kernel_norm", "grad_ratio", "radial")) if v["kernels"] else {},
                    "gains": {kind: mean(items, ("drift", "spread")) for kind, items in v["gains"].items()}}
            for stage, v in out.items()}
