"""Signal health of a network's norm and gate inputs: is each channel centred, spread and inside SALU's
near-linear range? (``salunet experiment signal``; docs/RESULTS.md "Closing the gap".)

For every *norm site* (the input of a SALU, a BatchNorm, a LayerNorm, ...) and *gate site* (the input of a
SWALU, GALU, ReLU, SiLU, GELU, ...), accumulated per channel over a few batches:

- ``mean2_var``: the mean over channels of m_c^2 / v_c (a channel's squared mean over its within-channel
  variance). BatchNorm removes m_c; a pointwise, odd SALU cannot, so a large ratio means a channel spends its
  range on a constant.
- ``within_std``: the mean over channels of sqrt(v_c); ``pooled_std``: the std of all values together, which
  also counts the spread *between* channel means (sqrt(mean v_c + var m_c)). The init rules (models/init.py)
  were calibrated on pooled std; where the two differ, "signal" is mostly mean shift.
- ``silent``: the fraction of channels that are exactly 0 for every input (left out of ``mean2_var``).
- ``stuck`` (gate sites): the fraction of channels with more than 90% of their inputs on one side of 0; such a
  gate is (nearly) always open or always closed, a linear map or a dead unit.
- ``past_knee`` (SALU sites): the fraction of inputs with |x| > 1/sqrt(a b) (SALU's width), where it saturates.

Capture (hooks), statistics (pure functions of the per-channel sums) and plotting are separate. Fused SALU ->
gate modules (:class:`~salunet.nn.SALUAct`, :class:`~salunet.nn.SALUAddAct`) run one kernel, so their two sites
are recomputed from the module's input in the hook (the SALU's output, plus the residual, is the gate's input).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..nn import GALU, SALU, SWALU, SALUAct, SALUAddAct
from ..nn import functional as F

__all__ = ["ChannelSums", "site_stats", "signal_report", "stage_summary", "STUCK_SIDE", "NORM_TYPES", "GATE_TYPES"]

STUCK_SIDE = 0.9  # a gate channel is stuck when more than this fraction of its inputs share a sign
NORM_TYPES = (SALU, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
GATE_TYPES = (SWALU, GALU, nn.ReLU, nn.SiLU, nn.GELU, nn.PReLU)


@dataclass
class ChannelSums:
    """Running per-channel sums of one site's input (float64), enough for every statistic above."""

    n: int = 0
    s1: Tensor | None = None  # sum x
    s2: Tensor | None = None  # sum x^2
    pos: Tensor | None = None  # count x > 0
    neg: Tensor | None = None  # count x < 0
    knee: Tensor | None = None  # count |x| > 1/sqrt(ab) (SALU sites)
    kind: str = ""
    extra: dict = field(default_factory=dict)

    def add(self, x: Tensor, dim: int, width: Tensor | None = None) -> None:
        """Add a batch ``x`` whose channels lie along ``dim``; ``width`` (per channel or scalar) = 1/sqrt(ab)."""
        x = x.detach().double().movedim(dim, -1).reshape(-1, x.shape[dim])  # (samples, C)
        sums = (x.sum(0), (x * x).sum(0), (x > 0).sum(0).double(), (x < 0).sum(0).double())
        if width is not None:
            w = width.detach().double().reshape(-1)
            sums += ((x.abs() > w).sum(0).double(),)
        if self.s1 is None:
            self.s1, self.s2, self.pos, self.neg = sums[:4]
            self.knee = sums[4] if width is not None else None
        else:
            self.s1, self.s2 = self.s1 + sums[0], self.s2 + sums[1]
            self.pos, self.neg = self.pos + sums[2], self.neg + sums[3]
            if width is not None:
                self.knee = self.knee + sums[4]
        self.n += x.shape[0]


def site_stats(s: ChannelSums, gate: bool) -> dict:
    """The statistics of one site from its sums (see the module docstring); ``gate`` adds ``stuck``."""
    n = s.n
    m = s.s1 / n
    v = (s.s2 / n - m * m).clamp_min(0.0)
    silent = (v == 0) & (m == 0)  # exactly 0 everywhere (e.g. a branch behind a zero gain): no shift, no signal
    ratio = torch.where(v > 0, m * m / v.clamp_min(1e-300), torch.full_like(m, math.inf))[~silent]
    out = {"kind": s.kind, "channels": int(m.numel()), "samples": n, "silent": float(silent.double().mean()),
           "mean2_var": float(ratio.mean()) if ratio.numel() else 0.0,
           "mean2_var_median": float(ratio.median()) if ratio.numel() else 0.0,
           "within_std": float(v.sqrt().mean()), "pooled_std": float((v.mean() + m.var(unbiased=False)).sqrt()),
           "abs_mean": float(m.abs().mean())}
    if gate:
        side = torch.maximum(s.pos, s.neg) / n
        out["stuck"] = float((side > STUCK_SIDE).double().mean())
    if s.knee is not None:
        out["past_knee"] = float(s.knee.sum() / (n * m.numel()))
    return out


def _width(m: SALU) -> Tensor:
    return m.width.detach()  # 1/sqrt(ab), per channel (or scalar)


def _channel_dim(m: nn.Module, x: Tensor) -> int:
    """Where ``m``'s channels lie in its input ``x``: the module's own ``dim`` if it has one (SALU family),
    channel-first for LayerNorm2d, last for token norms; for generic layers, the zoo's conventions: 3-D inputs
    are token tensors (B, N, D), others channel-first (N, C, ...)."""
    from ..models.layers import LayerNorm2d, TokenBatchNorm

    d = getattr(m, "dim", None)
    if isinstance(d, int) and not isinstance(d, bool):
        return d % x.dim()
    if isinstance(m, LayerNorm2d):
        return 1
    if isinstance(m, (nn.LayerNorm, TokenBatchNorm)) or x.dim() == 3:
        return x.dim() - 1
    return 1 if x.dim() > 1 else 0


def _hook(sites: dict[str, ChannelSums], name: str, module: nn.Module):
    """A forward hook that feeds the sums of the site(s) ``module`` holds."""

    def site(key: str, kind: str) -> ChannelSums:
        return sites.setdefault(key, ChannelSums(kind=kind))

    def hook(m, inputs, output):
        x = inputs[0]
        if isinstance(m, (SALUAct, SALUAddAct)):  # one fused kernel: recompute the SALU's output for the gate
            dim = m.norm.dim % x.dim()
            site(f"{name}.norm", "SALU").add(x, dim, _width(m.norm))
            a, b = m.norm.param_views(x)
            g = F.salu(x, a.exp(), b.exp())
            if isinstance(m, SALUAddAct):
                g = g + inputs[1]
            site(f"{name}.act", type(m.act).__name__).add(g, dim)
            return
        dim = _channel_dim(m, x)
        width = _width(m) if isinstance(m, SALU) else None
        site(name, type(m).__name__).add(x, dim, width)

    return hook


@torch.no_grad()
def signal_report(model: nn.Module, batches) -> dict[str, dict]:
    """Statistics of every norm and gate site of ``model`` over ``batches`` (an iterable of input tensors), in
    module order: ``{name: {"role": "norm"|"gate", ...site_stats}}``. The model runs in the mode it is in: pass
    a copy in train mode to see what training sees (a BatchNorm then uses batch statistics, and updates the
    copy's running ones); a SaluNet is the same in both modes."""
    sites: dict[str, ChannelSums] = {}
    handles, roles = [], {}
    fused_children = set()
    for name, m in model.named_modules():
        if isinstance(m, (SALUAct, SALUAddAct)):
            handles.append(m.register_forward_hook(_hook(sites, name, m)))
            roles[f"{name}.norm"], roles[f"{name}.act"] = "norm", "gate"
            fused_children |= {id(m.norm), id(m.act)}
        elif isinstance(m, NORM_TYPES + GATE_TYPES) and id(m) not in fused_children:
            handles.append(m.register_forward_hook(_hook(sites, name, m)))
            roles[name] = "norm" if isinstance(m, NORM_TYPES) else "gate"
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {k: {"role": roles[k], **site_stats(s, gate=roles[k] == "gate")} for k, s in sites.items()}


def stage_summary(sites: dict[str, dict], stage_of) -> dict[str, dict[str, dict]]:
    """Mean of each statistic over the sites of each stage and role: ``{stage: {"norm"|"gate": {stat: mean}}}``,
    stages in the order they first appear; ``stage_of(name)`` names a site's stage."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for name, st in sites.items():
        groups.setdefault(stage_of(name), {}).setdefault(st["role"], []).append(st)
    out: dict[str, dict[str, dict]] = {}
    for stage, roles in groups.items():
        out[stage] = {}
        for role, items in roles.items():
            keys = [k for k, v in items[0].items() if isinstance(v, float)]
            out[stage][role] = {k: sum(i[k] for i in items if k in i) / sum(k in i for i in items) for k in keys}
            out[stage][role]["sites"] = len(items)
    return out
