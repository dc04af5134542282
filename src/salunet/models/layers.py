"""One factory for normalization and activation layers, so that "BN + ReLU vs SALU + SWALU" is a config
change, never a code fork. :func:`salunet.convert` uses the same factory, so every name and every callable
that works in :func:`salunet.create_model` works there too.

A *norm layer* and an *act layer* are callables ``(num_features, *, dim) -> nn.Module``:
- ``num_features`` is the channel count, or ``None`` when it is unknown (``convert`` on an activation it
  could not size, or on a LayerNorm over several dims). SALU-family layers then get one scalar (a, b) pair;
  layers that cannot exist without a width (BatchNorm, LayerNorm, GroupNorm) raise ``ValueError``, which
  ``convert`` reports instead of guessing a width.
- ``dim`` is the channel dimension: 1 for channel-first tensors (N, C, *), -1 for token tensors (..., D).
:func:`get_norm_layer` / :func:`get_act_layer` resolve names (below) or pass callables through;
:func:`norm_act` builds ``act(norm(x))`` and fuses a SALU followed by SWALU/GALU into one
:class:`salunet.nn.SALUAct` pass.

Norms: ``salu``, ``batchnorm``, ``layernorm``, ``groupnorm``, ``identity`` (no normalization at all),
``batchnorm+salu`` (normalization kept and SALU added after it: the referees' ablation), ``salu+shift`` (SALU then
a learnable per-channel shift, :class:`ChannelShift`: BatchNorm's beta after the curve, unfused), and three diagnostics
that take BatchNorm apart: ``batchnorm_detached`` (BatchNorm whose batch statistics are constants in the backward,
:class:`DetachedBatchNorm`), ``batchnorm_uncentred`` (scale only: divides by the batch's root mean square, no mean
subtracted, :class:`UncentredBatchNorm`) and ``batchnorm_uncentred_detached`` (the same with its statistic a
constant in the backward: what SALU's per-step pinning does, on the BN model).
Activations: ``swalu``, ``galu``, ``relu``, ``silu``, ``gelu``, ``prelu``.

``batchnorm`` at dim=1 is a plain ``nn.BatchNorm2d`` on purpose: deployment tools (``torch.fx`` conv-BN
fusion, used by ``salunet bench``) match the exact type. ``convert`` adapts it to 3-D/5-D inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..nn import GALU, SALU, SALUAct, SALUAddAct, SWALU

__all__ = ["NORMS", "ACTS", "get_norm_layer", "get_act_layer", "norm_act", "norm_add_act", "NormAddAct",
           "LayerNorm2d", "TokenBatchNorm", "DetachedBatchNorm", "UncentredBatchNorm", "ChannelShift", "LayerFactory"]

LayerFactory = Callable[..., nn.Module]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over dim 1 of a channel-first tensor (N, C, *) (ConvNeXt's channels-first LayerNorm).

    Moves the channel dim last and back (rather than a fixed NCHW permute) so that the same module works for
    (N, C), (N, C, L) and (N, C, D, H, W) inputs, which ``convert`` may meet."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the last dim of token tensors (..., D): statistics over every other dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class _TrainStatisticsBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Base of the diagnostic BatchNorms of channel-first input (N, C, *): evaluation is BatchNorm's own (on the
    running buffers); training calls ``_train_forward(x, dims)`` with the dims the statistics reduce over."""
    kind = ""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"{self.kind} expects (N, C, *) input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        return self._train_forward(x, (0,) + tuple(range(2, x.dim())))

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


class DetachedBatchNorm(_TrainStatisticsBatchNorm):
    """BatchNorm of channel-first input (N, C, *) whose batch mean and variance are constants in the backward (a
    diagnostic, not a layer to train with). In training it normalises by the batch's statistics exactly as BatchNorm
    does, but the gradient does not flow through them: what is left of BatchNorm is the pinning of each channel's
    scale and shift at every step, without its gradient projection (the components of the gradient along the
    channel mean and along the normalised input, which BatchNorm removes). docs/RESULTS.md "What BatchNorm does at
    every step" separates the two with it. Running statistics and evaluation are BatchNorm's."""
    kind = "batchnorm_detached"

    def _train_forward(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        with torch.no_grad():
            xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            mean, var = xs.mean(dims), xs.var(dims, unbiased=False)
            if self.track_running_stats and self.running_mean is not None:
                n = x.numel() // x.shape[1]
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / max(n - 1, 1)).to(self.running_var.dtype), m)
                self.num_batches_tracked.add_(1)
            scale = (var + self.eps).rsqrt()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self._affine((x - mean.to(x.dtype).view(shape)) * scale.to(x.dtype).view(shape))


class UncentredBatchNorm(_TrainStatisticsBatchNorm):
    """Scale-only BatchNorm of channel-first input (N, C, *), a diagnostic: in training each channel is divided by
    its batch root mean square, sqrt(mean(x²) + eps), with no mean subtracted, then BatchNorm's affine (weight and
    bias). ``detach=True`` makes the statistic a constant in the backward. It asks which half of BatchNorm's
    forward the twin's lead rests on: the centring (which no SALU pin does) or the scale (which
    ``--salu-recalibrate-every 1`` pins, as a constant). The running statistic is the mean square, kept in
    ``running_var`` with ``running_mean`` fixed at zero, so evaluation is BatchNorm's own with those buffers."""

    kind = "batchnorm_uncentred"

    def __init__(self, num_features: int, *, detach: bool = False, **kw) -> None:
        super().__init__(num_features, **kw)
        self.detach = detach

    def extra_repr(self) -> str:
        return super().extra_repr() + f", detach={self.detach}"

    def _train_forward(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean_sq = xs.square().mean(dims)
        if self.detach:
            mean_sq = mean_sq.detach()
        if self.track_running_stats and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_var.lerp_(mean_sq.detach().to(self.running_var.dtype), m)
                self.num_batches_tracked.add_(1)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self._affine(x * (mean_sq + self.eps).rsqrt().to(x.dtype).view(shape))


class ChannelShift(nn.Module):
    """x + beta, one learnable shift per channel along ``dim`` (one scalar without ``num_features``), zero at init.

    After a SALU (norm ``salu+shift``) it is BatchNorm's beta: SALU's curve is odd and has no offset, so without it
    the gate after a SALU always switches at a zero input, where ReLU after a BatchNorm switches at -beta/gamma,
    which each channel learns. Not decayed by the trainer (a bias: ``train/optim.py``). Measured on the pinned v2 at
    the CPU budget: no gain (docs/RESULTS.md "The layer: SALU's curve")."""

    def __init__(self, num_features: int | None = None, *, dim: int = 1) -> None:
        super().__init__()
        self.num_features, self.dim = num_features, dim
        self.bias = nn.Parameter(torch.zeros(() if num_features is None else (num_features,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_features is None:
            return x + self.bias.to(x.dtype)
        d = self.dim % x.dim()
        if x.shape[d] != self.num_features:
            raise ValueError(f"ChannelShift: expected {self.num_features} channels along dim {self.dim}, got "
                             f"input shape {tuple(x.shape)}")
        return x + self.bias.to(x.dtype).view((-1,) + (1,) * (x.dim() - d - 1))

    def extra_repr(self) -> str:
        return "scalar" if self.num_features is None else f"{self.num_features}, dim={self.dim}"


class _DimPReLU(nn.PReLU):
    """PReLU with one slope per entry of ``dim`` (nn.PReLU's channels are always dim 1)."""

    def __init__(self, num_parameters: int, dim: int) -> None:
        super().__init__(num_parameters)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dim % x.dim()
        w = self.weight.view((-1,) + (1,) * (x.dim() - d - 1))
        return torch.where(x >= 0, x, w * x)


def _need_width(name: str, c: int | None) -> int:
    if c is None:
        raise ValueError(f"{name} needs a channel count (num_features), got None")
    return c


def _channel_dim(name: str, dim: int) -> None:
    if dim not in (1, -1):
        raise ValueError(f"{name} supports dim=1 (channel-first) or dim=-1 (tokens), got dim={dim}")


def _groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if c % g == 0:
            return g
    return 1


def _batchnorm(c: int | None, *, dim: int = 1) -> nn.Module:
    c = _need_width("batchnorm", c)
    _channel_dim("batchnorm", dim)
    return nn.BatchNorm2d(c) if dim == 1 else TokenBatchNorm(c)


def _layernorm(c: int | None, *, dim: int = 1) -> nn.Module:
    c = _need_width("layernorm", c)
    _channel_dim("layernorm", dim)
    return LayerNorm2d(c) if dim == 1 else nn.LayerNorm(c)


def _groupnorm(c: int | None, *, dim: int = 1) -> nn.Module:
    c = _need_width("groupnorm", c)
    if dim != 1:
        raise ValueError("groupnorm needs channel-first input (dim=1); use layernorm for token tensors")
    return nn.GroupNorm(_groups(c), c)


def _batchnorm_detached(c: int | None, *, dim: int = 1) -> nn.Module:
    c = _need_width("batchnorm_detached", c)
    if dim != 1:
        raise ValueError("batchnorm_detached needs channel-first (N, C, *) input (dim=1); use batchnorm for tokens")
    return DetachedBatchNorm(c)


def _batchnorm_uncentred(c: int | None, *, dim: int = 1, detach: bool = False) -> nn.Module:
    name = "batchnorm_uncentred" + ("_detached" if detach else "")
    c = _need_width(name, c)
    if dim != 1:
        raise ValueError(f"{name} needs channel-first (N, C, *) input (dim=1); use batchnorm for tokens")
    return UncentredBatchNorm(c, detach=detach)


def _bn_salu(c: int | None, *, dim: int = 1) -> nn.Module:
    return nn.Sequential(_batchnorm(c, dim=dim), SALU(c, dim=dim))


def _salu_shift(c: int | None, *, dim: int = 1) -> nn.Module:
    return nn.Sequential(SALU(c, dim=dim), ChannelShift(c, dim=dim))


def _prelu(c: int | None, *, dim: int = 1) -> nn.Module:
    if c is None:
        return nn.PReLU()  # one shared slope: what nn.PReLU does without a channel count
    return nn.PReLU(c) if dim == 1 else _DimPReLU(c, dim)


NORMS: dict[str, LayerFactory] = {
    "salu": lambda c, *, dim=1: SALU(c, dim=dim),
    "batchnorm": _batchnorm,
    "layernorm": _layernorm,
    "groupnorm": _groupnorm,
    "identity": lambda c, *, dim=1: nn.Identity(),
    "batchnorm+salu": _bn_salu,
    "salu+shift": _salu_shift,
    "batchnorm_detached": _batchnorm_detached,
    "batchnorm_uncentred": _batchnorm_uncentred,
    "batchnorm_uncentred_detached": lambda c, *, dim=1: _batchnorm_uncentred(c, dim=dim, detach=True),
}

ACTS: dict[str, LayerFactory] = {
    "swalu": lambda c, *, dim=1: SWALU(c, dim=dim),
    "galu": lambda c, *, dim=1: GALU(c, dim=dim),
    "relu": lambda c, *, dim=1: nn.ReLU(inplace=False),
    "silu": lambda c, *, dim=1: nn.SiLU(),
    "gelu": lambda c, *, dim=1: nn.GELU(),
    "prelu": _prelu,
}


def _resolve(kind: str, table: dict[str, LayerFactory], layer) -> LayerFactory:
    if callable(layer) and not isinstance(layer, str):
        return layer
    if isinstance(layer, str) and layer.lower() in table:
        return table[layer.lower()]
    raise ValueError(f"unknown {kind} {layer!r}; choose one of {', '.join(table)} or pass a callable")


def get_norm_layer(layer: str | LayerFactory) -> LayerFactory:
    return _resolve("norm_layer", NORMS, layer)


def get_act_layer(layer: str | LayerFactory) -> LayerFactory:
    return _resolve("act_layer", ACTS, layer)


class NormAddAct(nn.Module):
    """``act(norm(x) + residual)`` for any norm and activation: the tail of a residual block. With a SALU and a
    SWALU/GALU, :func:`norm_add_act` builds the fused :class:`~salunet.nn.SALUAddAct` instead (same children).
    ``branch_scale`` (stochastic depth): per-sample factors on ``norm(x)`` before the sum."""

    def __init__(self, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm, self.act = norm, act

    def forward(self, x: torch.Tensor, residual: torch.Tensor,
                branch_scale: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm(x)
        return self.act((y if branch_scale is None else y * branch_scale) + residual)


def norm_add_act(norm: LayerFactory, act: LayerFactory, c: int, *, dim: int = 1) -> nn.Module:
    """``act(norm(x) + residual)`` for ``c`` channels; one fused pass when it is SALU followed by SWALU/GALU.
    The children are ``norm`` and ``act`` in both cases, so weights move between the two forms."""
    n, a = norm(c, dim=dim), act(c, dim=dim)
    if isinstance(n, SALU) and isinstance(a, (SWALU, GALU)):
        return SALUAddAct(n, a)
    return NormAddAct(n, a)


def norm_act(norm: LayerFactory, act: LayerFactory, c: int, *, dim: int = 1) -> nn.Module:
    """``act(norm(x))`` for ``c`` channels; one fused pass when it is SALU followed by SWALU/GALU."""
    n, a = norm(c, dim=dim), act(c, dim=dim)
    if isinstance(n, SALU) and isinstance(a, (SWALU, GALU)):
        return SALUAct(n, a)
    return nn.Sequential(n, a)
