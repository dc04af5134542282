"""``nn.Module`` wrappers of SALU, SWALU and GALU, and the fused SALU -> gate pair.

Parameters (docs/SPEC.md section 1, **[decided]**): per channel along ``dim`` when ``num_features`` is given
(dim=1 for NCHW / NC / NCL, dim=-1 for token tensors (..., D)), one scalar pair otherwise. Positivity comes
from a log-parametrisation, a = exp(log_a), which also makes learning scale-free. Defaults: SALU a0 = b0 = 1
(the operator's default; models choose their own, see ``salunet.models``), SWALU/GALU a0 = 1, b0 = 1e-2 so
that at init SWALU ~ SiLU and GALU ~ GELU on [-4, 4] (saturation A = 10, width w = 10).
There is no bias, no running buffer and no batch statistic: train and eval behave identically.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from . import kernels

__all__ = ["SALU", "SWALU", "GALU", "SALUAct", "SALUAddAct", "SaluFamily"]

pin_site: Callable[["SALU", Tensor], None] | None = None
"""None, except while :func:`salunet.train.recalibrate.pin_in_forward` runs a model: then every SALU site (a
standalone SALU, the SALU of a fused :class:`SALUAct` / :class:`SALUAddAct`) calls it with its input before it
applies its parameters, and it sets them in place. One module-level slot rather than a hook per module, so that a
compiled model traces the pin inside its own graph (dynamo guards on the slot: the pinning forward is one more
graph, compiled once, with no hooks)."""


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return value


class SaluFamily(nn.Module):
    """Shared machinery: log-parametrised (a, b), per-channel views, the fused call."""

    op: str = "salu"
    default_a: float = 1.0
    default_b: float = 1.0

    def __init__(self, num_features: int | None = None, *, dim: int = 1, a_init: float | None = None,
                 b_init: float | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if num_features is not None and (isinstance(num_features, bool) or not isinstance(num_features, int)
                                         or num_features <= 0):
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int or None, "
                             f"got {num_features!r}")
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise ValueError(f"{type(self).__name__}: dim must be an int, got {dim!r}")
        self.num_features = num_features
        self.dim = dim
        self.a_init = _positive("a_init", self.default_a if a_init is None else a_init)
        self.b_init = _positive("b_init", self.default_b if b_init is None else b_init)
        shape = () if num_features is None else (num_features,)
        kw = {"device": device, "dtype": dtype}
        self.log_a = nn.Parameter(torch.empty(shape, **kw))
        self.log_b = nn.Parameter(torch.empty(shape, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_a.fill_(math.log(self.a_init))
            self.log_b.fill_(math.log(self.b_init))

    # ---- derived quantities (read-only) ----
    def _logs(self) -> tuple[Tensor, Tensor]:
        lim = kernels.LOG_LIMIT
        return self.log_a.detach().clamp(-lim, lim), self.log_b.detach().clamp(-lim, lim)

    @property
    def a(self) -> Tensor:
        """Slope at 0 (linear gain and Lipschitz constant) of the inner SALU, as the kernels use it."""
        return self._logs()[0].exp()

    @property
    def b(self) -> Tensor:
        return self._logs()[1].exp()

    @property
    def amplitude(self) -> Tensor:
        """Saturation amplitude A = sqrt(a/b) of the inner SALU."""
        la, lb = self._logs()
        return torch.exp(0.5 * (la - lb))

    @property
    def width(self) -> Tensor:
        """Linear-regime width w = 1/sqrt(a b) of the inner SALU."""
        la, lb = self._logs()
        return torch.exp(-0.5 * (la + lb))

    def param_views(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(log_a, log_b) viewed to broadcast against ``x`` along ``self.dim`` (for the functional API)."""
        d = self.channel_axis(x)
        if d is None:
            return self.log_a, self.log_b
        shape = (self.num_features,) + (1,) * (x.dim() - d - 1)
        return self.log_a.view(shape), self.log_b.view(shape)

    def channel_axis(self, x: Tensor) -> int | None:
        """The dim of ``x`` that holds the channels (None for scalar parameters), checked against the shape."""
        if self.num_features is None:
            return None
        nd = x.dim()
        if not -nd <= self.dim < nd:
            raise ValueError(f"{type(self).__name__}: dim={self.dim} is out of range for an input of "
                             f"shape {tuple(x.shape)}")
        d = self.dim % nd
        if x.shape[d] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected {self.num_features} channels along dim "
                             f"{self.dim}, got {x.shape[d]} (input shape {tuple(x.shape)})")
        return d

    def forward(self, x: Tensor) -> Tensor:
        return kernels.fused(self.op, x, self.log_a, self.log_b, log_params=True, axis=self.channel_axis(x))

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this on every submodule before compiling anything: refuse here, in one line
        with the alternatives, rather than fail deep inside TorchScript's frontend. (The forward chooses between
        the C++, compiled and eager kernels in Python, which TorchScript cannot express; ``torch.jit.trace``
        records the math instead, see :func:`salunet.nn.kernels.recorded`.)"""
        raise ValueError(f"torch.jit.script cannot compile salunet's {type(self).__name__}; record the model with "
                         "torch.jit.trace(model, example_input) or torch.export.export(model, (example_input,)), or "
                         "write ONNX with salunet.export_onnx / `salunet export` (README: Deployment)")

    def extra_repr(self) -> str:
        n = "scalar" if self.num_features is None else f"{self.num_features}, dim={self.dim}"
        return f"{n}, a_init={self.a_init:g}, b_init={self.b_init:g}"


class SALU(SaluFamily):
    """SALU(x; a, b) = a x / sqrt(1 + a b x^2): the bounded, statistics-free replacement of a norm layer."""

    op = "salu"

    def forward(self, x: Tensor) -> Tensor:
        if pin_site is not None:
            pin_site(self, x)
        return super().forward(x)


class SWALU(SaluFamily):
    """SWALU(x; a, b) = x * sigmoid(SALU(x; a, b)): learnable gate replacing ReLU / SiLU."""

    op = "swalu"
    default_b = 1e-2


class GALU(SaluFamily):
    """GALU(x; a, b) = x * Phi(SALU(x; a, b)): learnable gate replacing GELU."""

    op = "galu"
    default_b = 1e-2


class SALUAct(nn.Module):
    """``act(norm(x))`` for a SALU ``norm`` followed by a SWALU/GALU ``act`` in one fused pass.

    Keeps the two modules as children (state-dict keys ``norm.*`` and ``act.*``, so weights are
    interchangeable with the unfused pair) and saves only ``x`` for backward instead of ``x`` and
    ``norm(x)``. Both must act on the same channel dimension with the same number of channels.
    """

    def __init__(self, norm: SALU, act: SWALU | GALU) -> None:
        super().__init__()
        if not isinstance(norm, SALU) or not isinstance(act, (SWALU, GALU)):
            raise ValueError(f"SALUAct needs a SALU and a SWALU/GALU, got {type(norm).__name__} and "
                             f"{type(act).__name__}")
        if norm.num_features != act.num_features or (norm.num_features is not None and norm.dim != act.dim):
            raise ValueError(f"SALUAct: norm ({norm.num_features}, dim={norm.dim}) and act "
                             f"({act.num_features}, dim={act.dim}) must have the same channels and dim")
        self.norm = norm
        self.act = act
        self.op = "salu_swalu" if isinstance(act, SWALU) else "salu_galu"

    def forward(self, x: Tensor) -> Tensor:
        d = self.norm.channel_axis(x)
        if self.act.channel_axis(x) != d:
            raise ValueError(f"SALUAct: norm and act see different channel dims ({d} and {self.act.channel_axis(x)})")
        if pin_site is not None:
            pin_site(self.norm, x)
        return kernels.fused(self.op, x, self.norm.log_a, self.norm.log_b, self.act.log_a, self.act.log_b,
                             log_params=True, axis=d)


class SALUAddAct(SALUAct):
    """``act(norm(x) + residual)`` for a SALU ``norm`` and a SWALU/GALU ``act`` in one fused pass: the tail of a
    residual block (the norm closing the branch, the sum with the shortcut, the gate after it). ``branch_scale``
    (stochastic depth, training only): per-sample factors on ``norm(x)`` before the sum, computed unfused.

    Children and state-dict keys are those of :class:`SALUAct` (``norm.*``, ``act.*``). Saves ``x`` and
    ``residual`` for backward, as the unfused norm and gate would (the sum is recomputed, never stored)."""

    def __init__(self, norm: SALU, act: SWALU | GALU) -> None:
        super().__init__(norm, act)
        self.op = "salu_add_swalu" if isinstance(act, SWALU) else "salu_add_galu"

    def forward(self, x: Tensor, residual: Tensor,  # type: ignore[override]
                branch_scale: Tensor | None = None) -> Tensor:
        d = self.norm.channel_axis(x)
        if self.act.channel_axis(x) != d:
            raise ValueError(f"SALUAddAct: norm and act see different channel dims ({d} and {self.act.channel_axis(x)})")
        if pin_site is not None:
            pin_site(self.norm, x)
        if branch_scale is not None:  # stochastic depth: the two ops apart, SALU(x) scaled per sample before the sum
            y = kernels.fused(self.norm.op, x, self.norm.log_a, self.norm.log_b, log_params=True, axis=d)
            return kernels.fused(self.act.op, y * branch_scale + residual, self.act.log_a, self.act.log_b,
                                 log_params=True, axis=d)
        return kernels.fused(self.op, x, self.norm.log_a, self.norm.log_b, self.act.log_a, self.act.log_b,
                             log_params=True, axis=d, residual=residual)
