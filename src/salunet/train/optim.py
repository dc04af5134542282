"""Optimizer, learning-rate schedule and gradient clipping: what turns a gradient into a step.

- :func:`lr_at`: linear warm-up then cosine decay, a plain function of the step.
- :func:`param_groups`: weight decay on conv kernels and weight matrices only (every parameter in exactly one
  group, asserted); SALU-family parameters (log a, log b) in a group of their own when their learning rate is
  scaled (``salu_lr_scale``), the group's ``lr_scale`` multiplying the schedule's value at every step.
- :func:`make_optimizer`: SGD-Nesterov / AdamW / Adam over those groups.
- :func:`adaptive_clip_`: unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, "High-performance
  large-scale image recognition without normalization"): each output unit's gradient is scaled down to at
  most ``clip`` times its weight norm, ||G_i|| <= clip * max(||W_i||, eps). Applied to conv kernels and weight
  matrices (parameters with 2 or more dims), the final classifier excluded, as in the NFNets; vectors (biases,
  gains, SALU parameters) are left alone, since their norms start at or near 0 (log a = 0 for a = 1) and a
  norm-relative bound would freeze them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..nn import SaluFamily

__all__ = ["lr_at", "param_groups", "make_optimizer", "adaptive_clip_", "agc_parameters", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adamw", "adam")


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float, salu_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on conv kernels and Linear weight matrices only; SALU/SWALU/GALU parameters, biases,
    norm and WS gains, embeddings and tokens are not decayed. With ``salu_lr_scale != 1`` the SALU-family
    parameters form a third group whose ``lr_scale`` multiplies the learning rate (with 1 the groups are the
    two they have always been, so old checkpoints' optimizer states still load). Asserts every parameter is in
    exactly one group."""
    decay_ids = {id(m.weight) for m in model.modules()
                 if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and not isinstance(m, SaluFamily)}
    salu_ids = set()
    if salu_lr_scale != 1.0:
        salu_ids = {id(p) for m in model.modules() if isinstance(m, SaluFamily) for p in m.parameters(recurse=False)}
    decay, no_decay, salu = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (salu if id(p) in salu_ids else decay if id(p) in decay_ids else no_decay).append(p)
    n = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay) + len(no_decay) + len(salu) == n
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if salu_ids:
        groups.append({"params": salu, "weight_decay": 0.0, "lr_scale": float(salu_lr_scale)})
    return groups


def make_optimizer(model: nn.Module, *, optimizer: str, lr: float, momentum: float, weight_decay: float,
                   salu_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, weight_decay, salu_lr_scale)
    # foreach: one C++ loop over all parameters instead of a Python loop (PyTorch enables it by default on CUDA
    # only); a SaluNet has many small per-channel parameter tensors, measured 1.5 -> 1.0 ms per step on CPU
    kw = {"lr": lr, "foreach": True}
    if optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, nesterov=momentum > 0, **kw)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, **kw)
    return torch.optim.Adam(groups, **kw)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's ``lr`` into every group, times the group's ``lr_scale`` (1 when it has none)."""
    for gr in opt.param_groups:
        gr["lr"] = lr * gr.get("lr_scale", 1.0)


def agc_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters AGC clips: weights with 2 or more dims, except the final classifier, as in the NFNets: the
    module ``model.get_classifier()`` returns (timm's models, e.g. EfficientNet's ``classifier``), else ``model.fc``
    (or ``model.head``)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "fc", None) or getattr(model, "head", None)
    skip = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return [p for p in model.parameters() if p.requires_grad and p.dim() >= 2 and id(p) not in skip]


@torch.no_grad()
def adaptive_clip_(params: list[nn.Parameter], clip: float, eps: float = 1e-3) -> None:
    """Unit-wise AGC in place on the ``.grad`` of ``params``: an output unit (row of dim 0) whose gradient norm
    exceeds ``clip * max(||W_unit||, eps)`` is scaled down to that bound; others are untouched."""
    if clip <= 0:
        raise ValueError(f"AGC clipping factor must be > 0, got {clip}")
    for p in params:
        g = p.grad
        if g is None:
            continue
        dims = tuple(range(1, p.dim()))
        w_norm = torch.linalg.vector_norm(p.detach().float(), dim=dims, keepdim=True).clamp_min(eps)
        g_norm = torch.linalg.vector_norm(g.float(), dim=dims, keepdim=True)
        bound = w_norm * clip
        scale = torch.where(g_norm > bound, bound / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))
        g.mul_(scale.to(g.dtype))
