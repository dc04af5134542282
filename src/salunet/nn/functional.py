"""Functional SALU, SWALU and GALU (arXiv 2606.02927; definitions in docs/SPEC.md section 1).

Each op takes ``a`` and ``b``: positive tensors broadcastable to ``x`` (a scalar, or a per-channel vector
viewed for broadcasting, e.g. shape (C, 1, 1) for NCHW input). ``impl="fused"`` (default) runs the
numerically safe custom-autograd kernel of :mod:`salunet.nn.kernels`; ``impl="reference"`` is the plain
formula differentiated by autograd, kept as the ground truth for tests. The reference is exactly what the
paper writes and therefore collapses to 0 once ``a*b*x**2`` overflows; never use it for training.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import kernels

__all__ = ["salu", "swalu", "galu", "salu_swalu", "salu_galu", "salu_add_swalu", "salu_add_galu", "salu_reference", "swalu_reference",
           "galu_reference"]

_IMPLS = ("fused", "reference")


def _check(name: str, x: Tensor, params: tuple[Tensor, ...]) -> None:
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}: parameters must be tensors, got {type(p).__name__}")
        try:
            ok = kernels.broadcast_shape([x.shape, p.shape]) == tuple(x.shape)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name}: parameter of shape {tuple(p.shape)} does not broadcast to input of shape "
                f"{tuple(x.shape)}; view per-channel parameters as e.g. (C, 1, 1) for NCHW input")
    if not x.is_floating_point():
        raise TypeError(f"{name}: input must be a floating-point tensor, got {x.dtype}")


def _dispatch(op: str, x: Tensor, params: tuple[Tensor, ...], impl: str, reference,
              residual: Tensor | None = None) -> Tensor:
    if not torch.compiler.is_compiling():
        _check(op, x, params)
    if impl == "fused":
        return kernels.fused(op, x, *params, residual=residual)
    if impl == "reference":
        return reference(x, *params) if residual is None else reference(x, residual, *params)
    raise ValueError(f"{op}: unknown impl {impl!r}; use one of {', '.join(_IMPLS)}")


# ---- plain formulas (reference) ---------------------------------------------------------------------------

def salu_reference(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return a * x / torch.sqrt(1 + a * b * x * x)


def swalu_reference(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return x * torch.sigmoid(salu_reference(x, a, b))


def galu_reference(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return x * 0.5 * (1 + torch.erf(salu_reference(x, a, b) / math.sqrt(2.0)))


# ---- public ops -------------------------------------------------------------------------------------------

def salu(x: Tensor, a: Tensor, b: Tensor, *, impl: str = "fused") -> Tensor:
    """SALU(x; a, b) = a x / sqrt(1 + a b x^2): slope ``a`` at 0, saturation at +-sqrt(a/b)."""
    return _dispatch("salu", x, (a, b), impl, salu_reference)


def swalu(x: Tensor, a: Tensor, b: Tensor, *, impl: str = "fused") -> Tensor:
    """SWALU(x; a, b) = x * sigmoid(SALU(x; a, b)) (docs/SPEC.md [decided])."""
    return _dispatch("swalu", x, (a, b), impl, swalu_reference)


def galu(x: Tensor, a: Tensor, b: Tensor, *, impl: str = "fused") -> Tensor:
    """GALU(x; a, b) = x * Phi(SALU(x; a, b)), Phi the standard normal CDF (docs/SPEC.md [decided])."""
    return _dispatch("galu", x, (a, b), impl, galu_reference)


def salu_swalu(x: Tensor, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, *, impl: str = "fused") -> Tensor:
    """SWALU(SALU(x; a1, b1); a2, b2) in one pass (saves only ``x`` for backward)."""
    return _dispatch("salu_swalu", x, (a1, b1, a2, b2), impl,
                     lambda x, a1, b1, a2, b2: swalu_reference(salu_reference(x, a1, b1), a2, b2))


def salu_galu(x: Tensor, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, *, impl: str = "fused") -> Tensor:
    """GALU(SALU(x; a1, b1); a2, b2) in one pass (saves only ``x`` for backward)."""
    return _dispatch("salu_galu", x, (a1, b1, a2, b2), impl,
                     lambda x, a1, b1, a2, b2: galu_reference(salu_reference(x, a1, b1), a2, b2))


def salu_add_swalu(x: Tensor, residual: Tensor, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, *,
                   impl: str = "fused") -> Tensor:
    """SWALU(SALU(x; a1, b1) + residual; a2, b2) in one pass: a residual block's tail (the norm closing the
    branch, the sum with the shortcut, the gate). Saves ``x`` and ``residual`` for backward."""
    return _dispatch("salu_add_swalu", x, (a1, b1, a2, b2), impl,
                     lambda x, r, a1, b1, a2, b2: swalu_reference(salu_reference(x, a1, b1) + r, a2, b2), residual)


def salu_add_galu(x: Tensor, residual: Tensor, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, *,
                  impl: str = "fused") -> Tensor:
    """GALU(SALU(x; a1, b1) + residual; a2, b2) in one pass (see :func:`salu_add_swalu`)."""
    return _dispatch("salu_add_galu", x, (a1, b1, a2, b2), impl,
                     lambda x, r, a1, b1, a2, b2: galu_reference(salu_reference(x, a1, b1) + r, a2, b2), residual)
