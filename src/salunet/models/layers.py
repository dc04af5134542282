"""One factory for normalization and activation layers, so that "BN + ReLU vs SALU + SWALU" is a config
change, never a code fork.

A *norm layer* and an *act layer* are callables ``(num_features, *, dim) -> nn.Module``; ``dim`` is the
channel dimension (1 for NCHW maps, -1 for token tensors). :func:`get_norm_layer` / :func:`get_act_layer`
resolve names (below) or pass callables through; :func:`norm_act` builds ``act(norm(x))`` and fuses a SALU
followed by SWALU/GALU into one :class:`salunet.nn.SALUAct` pass.

Norms: ``salu``, ``batchnorm``, ``layernorm``, ``groupnorm``, ``identity`` (no normalization at all),
``batchnorm+salu`` (normalization kept and SALU added after it: the referees' ablation).
Activations: ``swalu``, ``galu``, ``relu``, ``silu``, ``gelu``, ``prelu``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..nn import GALU, SALU, SALUAct, SWALU

__all__ = ["NORMS", "ACTS", "get_norm_layer", "get_act_layer", "norm_act", "LayerNorm2d", "TokenBatchNorm",
           "LayerFactory"]

LayerFactory = Callable[..., nn.Module]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's channels-first LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the last dim of token tensors (..., D): statistics over every other dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if c % g == 0:
            return g
    return 1


def _batchnorm(c: int, *, dim: int = 1) -> nn.Module:
    return nn.BatchNorm2d(c) if dim == 1 else TokenBatchNorm(c)


def _layernorm(c: int, *, dim: int = 1) -> nn.Module:
    return LayerNorm2d(c) if dim == 1 else nn.LayerNorm(c)


def _groupnorm(c: int, *, dim: int = 1) -> nn.Module:
    if dim != 1:
        raise ValueError("groupnorm needs channel-first input (dim=1); use layernorm for token tensors")
    return nn.GroupNorm(_groups(c), c)


def _bn_salu(c: int, *, dim: int = 1) -> nn.Module:
    return nn.Sequential(_batchnorm(c, dim=dim), SALU(c, dim=dim))


NORMS: dict[str, LayerFactory] = {
    "salu": lambda c, *, dim=1: SALU(c, dim=dim),
    "batchnorm": _batchnorm,
    "layernorm": _layernorm,
    "groupnorm": _groupnorm,
    "identity": lambda c, *, dim=1: nn.Identity(),
    "batchnorm+salu": _bn_salu,
}

ACTS: dict[str, LayerFactory] = {
    "swalu": lambda c, *, dim=1: SWALU(c, dim=dim),
    "galu": lambda c, *, dim=1: GALU(c, dim=dim),
    "relu": lambda c, *, dim=1: nn.ReLU(inplace=False),
    "silu": lambda c, *, dim=1: nn.SiLU(),
    "gelu": lambda c, *, dim=1: nn.GELU(),
    "prelu": lambda c, *, dim=1: nn.PReLU(c) if dim == 1 else _TokenPReLU(c),
}


class _TokenPReLU(nn.PReLU):
    """PReLU with one slope per feature of the last dim (nn.PReLU's channels are dim 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, x, self.weight * x)


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


def norm_act(norm: LayerFactory, act: LayerFactory, c: int, *, dim: int = 1) -> nn.Module:
    """``act(norm(x))`` for ``c`` channels; one fused pass when it is SALU followed by SWALU/GALU."""
    n, a = norm(c, dim=dim), act(c, dim=dim)
    if isinstance(n, SALU) and isinstance(a, (SWALU, GALU)):
        return SALUAct(n, a)
    return nn.Sequential(n, a)
