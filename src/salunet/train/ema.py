"""Exponential moving average of weights, evaluated beside the raw weights.

The paper uses decay 0.9997 for SaluNet and 0.997 for the BN ResNet. **[decided]** The effective decay is
warmed up as min(decay, (1 + n) / (10 + n)) after n updates (as timm's EMA warm-up does), so that short
runs get a meaningful average instead of one dominated by the random init. Buffers (BatchNorm running
statistics) are copied, not averaged: this is exactly the mismatch the paper blames for the BN ResNet's
oscillating EMA curves.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        ema_p, raw_p = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        ema_b, raw_b = list(self.module.buffers()), list(model.buffers())
        # one fused call per list rather than one launch per tensor: a SaluNet has hundreds of small
        # per-channel parameters, and per-tensor calls would be hundreds of GPU launches per step
        if ema_p:
            torch._foreach_lerp_(ema_p, raw_p, 1.0 - d)
        if ema_b:
            torch._foreach_copy_(ema_b, raw_b)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
