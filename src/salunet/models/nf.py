"""The normalization-free toolkit for convolutions: weight standardisation, a per-channel bias and a residual
branch gain, all carried by one conv class whose kernel is re-parametrised (no extra pass over activations).

Why (docs/RESULTS.md "Closing the gap"): SALU is pointwise, odd and bias-free, so it cannot remove the mean
that a conv of mostly-positive gate outputs gives each channel (of order mean(x) * sum(w), growing with depth).
BatchNorm subtracts it; a SaluNet must not create it. Weight standardisation (Qiao et al. 2019; scaled, as in
NF-ResNets, Brock et al. 2021) gives every output channel a zero-mean kernel, so a conv maps inputs with a
common mean to outputs with (about) zero mean, and, scaled, a fixed gain per channel.

:class:`NFConv2d` is an ``nn.Conv2d`` whose effective kernel is

    ws="none":    W
    ws="center":  W - mean(W)                                   (per output channel, over its fan-in)
    ws="scaled":  gain * gamma * (W - mean(W)) / sqrt(fan_in * var(W) + eps),   gamma = sqrt(2)
    ws="scaled_fixed": the same with no gain (fixed at 1): the kernel's scale is pinned, not learned

times a scalar ``res_gain`` when the conv ends a residual branch (SkipInit, De & Smith 2020; the NF-ResNets'
alpha). gamma = sqrt(2) is Kaiming's ReLU gain, so at init a scaled-WS kernel has the second moment of the
Kaiming-normal kernels the init rules were calibrated with. ``gain`` is per output channel, learnable, not
weight-decayed; ``bias`` (``bias=True``) takes the place of a BatchNorm's beta, before the SALU.

Why ``scaled_fixed`` (docs/RESULTS.md "What the twin has"): a standardised kernel is scale-invariant, so weight
decay shrinks its norm at no cost and raises its effective learning rate, as a BatchNorm does for the conv before
it. With a learnable, undecayed gain the signal's scale is then free to grow (at weight decay 8e-3 the SALU inputs
of a ``scaled`` v2 reach std 5, half of them past the knee); without one it stays where the init rules put it, as
BatchNorm pins it. The per-channel scale is left to the SALU's ``a``.

The residual gain sits in the kernel of the branch's *last conv*, i.e. before the branch's closing SALU: SALU is
linear near 0 (slope a), so a small gain scales the branch's output exactly as SkipInit's gain after the branch
would, gain 0 makes the block the identity at init, and it costs nothing per activation (a gain after a fused
SALU -> add -> gate tail would need an extra pass). A normalizing branch end (BatchNorm, LayerNorm, GroupNorm)
would divide the gain away, so :class:`~salunet.models.ResNet` refuses the combination.

:func:`fold_nf_convs` replaces every :class:`NFConv2d` with a plain ``nn.Conv2d`` holding its effective kernel
(for inference and export; the outputs are equal to float rounding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NFConv2d", "WS_MODES", "fold_nf_convs", "ws_kernel"]

WS_MODES = ("none", "center", "scaled", "scaled_fixed")
_GAMMA = math.sqrt(2.0)  # Kaiming's ReLU gain: the init scale the init rules (models/init.py) assume


def ws_kernel(weight: Tensor, mode: str, gain: Tensor | None = None, eps: float = 1e-4) -> Tensor:
    """The standardised kernel of ``weight`` (out, in/groups, *k) under ``mode`` (see the module docstring)."""
    if mode == "none":
        return weight
    if mode not in WS_MODES:
        raise ValueError(f"ws must be one of {', '.join(map(repr, WS_MODES))}, got {mode!r}")
    dims = tuple(range(1, weight.dim()))
    centred = weight - weight.mean(dim=dims, keepdim=True)
    if mode == "center":
        return centred
    fan_in = weight[0].numel()
    var = weight.var(dim=dims, unbiased=False, keepdim=True)
    scale = torch.rsqrt(var * fan_in + eps) * _GAMMA  # (out, 1, 1, 1)
    if gain is not None:
        scale = scale * gain.view(-1, *([1] * (weight.dim() - 1)))
    return centred * scale


class NFConv2d(nn.Conv2d):
    """``nn.Conv2d`` with weight standardisation (``ws``) and an optional scalar residual gain (``res_gain``,
    None = none). Parameters: ``weight`` (decayed like any kernel), ``gain`` (ws="scaled" only, per output
    channel, init 1), ``res_gain`` (scalar, init ``res_gain``) and ``bias`` if asked for."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 *, bias: bool = False, ws: str = "none", res_gain: float | None = None, eps: float = 1e-4) -> None:
        if ws not in WS_MODES:
            raise ValueError(f"ws must be one of {', '.join(map(repr, WS_MODES))}, got {ws!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.ws, self.eps = ws, float(eps)
        self.gain = nn.Parameter(torch.ones(out_channels)) if ws == "scaled" else None
        self.res_gain_init = res_gain
        self.res_gain = None if res_gain is None else nn.Parameter(torch.tensor(float(res_gain)))

    def reset_nf_parameters(self) -> None:
        """Gains back to their init values (the kernel and bias are the init rules' business)."""
        with torch.no_grad():
            if self.gain is not None:
                self.gain.fill_(1.0)
            if self.res_gain is not None:
                self.res_gain.fill_(float(self.res_gain_init))

    def effective_weight(self) -> Tensor:
        w = ws_kernel(self.weight, self.ws, self.gain, self.eps)
        return w if self.res_gain is None else w * self.res_gain

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def folded(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with this conv's effective kernel and bias (same device and dtype)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.effective_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.train(self.training)

    def extra_repr(self) -> str:
        extra = f", ws={self.ws!r}" if self.ws != "none" else ""
        return super().extra_repr() + extra + (f", res_gain={self.res_gain_init}" if self.res_gain is not None else "")


def fold_nf_convs(model: nn.Module) -> int:
    """Replace every :class:`NFConv2d` in ``model`` (in place) by the plain conv of its effective kernel, for
    inference; returns how many were folded. The folded model no longer trains the gains."""
    folded = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, NFConv2d):
                setattr(parent, name, child.folded())
                folded += 1
    return folded
