"""Make any model normalization-free in one call: ``salunet.convert(model)``.

Replaces, in place, every normalization module (BatchNorm1d/2d/3d, SyncBatchNorm, LayerNorm, GroupNorm,
InstanceNorm1d/2d/3d, RMSNorm) by a SALU of the right width on the right dimension, ReLU-family activations
(ReLU, ReLU6, LeakyReLU, PReLU, ELU, CELU, SELU), SiLU and Hardswish by SWALU, and GELU by GALU. Returns a
:class:`ConvertReport` saying what was replaced where, and what could not be.

How per-channel sizes are found (the decision DyT-style converters leave to the user):
- norms know their width: ``num_features`` / ``num_channels`` (channel dim 1) or ``normalized_shape``
  (last dim; a LayerNorm over several dims becomes a scalar-parameter SALU, reported as such);
- activation modules do not. With ``example_input``, one forward pass records the shape each activation
  sees: 4-D/5-D inputs are channel-first (dim 1), 2-D inputs (N, C) use dim 1, and 3-D inputs are taken as
  tokens (B, N, D) with dim -1 unless the model contains Conv1d layers (then (N, C, L), dim 1). Without
  ``example_input``, or for an activation the pass never reaches, or one called on inputs of different
  widths, the gate gets one scalar (a, b) pair, and the report says so.
- activations stored as *functions* on a module (``nn.TransformerEncoderLayer.activation`` is F.relu or
  F.gelu) are replaced by modules too (the layer's fused fast path is switched off, as it requires ReLU/GELU);
  activations or norms *called* as functions inside ``forward`` code cannot be swapped from outside: with
  ``example_input`` the same pass detects them and the report lists them.
Device and dtype of every new module follow the module it replaces (or the model's parameters).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.overrides import TorchFunctionMode

from .nn import GALU, SALU, SWALU, SaluFamily

__all__ = ["convert", "ConvertReport"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_IN = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_LN = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_RELU_LIKE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.SiLU, nn.Hardswish)
_GELU = (nn.GELU,)
_ACT_FUNCS = {Fn.relu: "relu", torch.relu: "relu", Fn.gelu: "gelu", Fn.silu: "silu", Fn.relu6: "relu6",
              Fn.hardswish: "hardswish", Fn.leaky_relu: "leaky_relu", Fn.elu: "elu"}
_NORM_FUNCS = {Fn.batch_norm: "batch_norm", Fn.layer_norm: "layer_norm", Fn.group_norm: "group_norm",
               Fn.instance_norm: "instance_norm"}
if hasattr(Fn, "rms_norm"):
    _NORM_FUNCS[Fn.rms_norm] = "rms_norm"


@dataclass
class ConvertReport:
    replaced: list[tuple[str, str, str]] = field(default_factory=list)  # (path, old, new)
    not_replaced: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    @property
    def ok(self) -> bool:
        return not self.not_replaced

    def __str__(self) -> str:
        lines = [f"salunet.convert: {len(self.replaced)} module(s) replaced, "
                 f"{len(self.not_replaced)} thing(s) not replaced"]
        w = max([len(p) for p, _, _ in self.replaced] + [4])
        for path, old, new in self.replaced:
            lines.append(f"  {path:<{w}}  {old}  ->  {new}")
        for where, why in self.not_replaced:
            lines.append(f"  NOT REPLACED {where}: {why}")
        return "\n".join(lines)


def _norm_spec(m: nn.Module) -> tuple[int | None, int, str] | None:
    """(num_features or None for scalar, dim, note) for a known normalization module, else None."""
    if isinstance(m, _BN + _IN):
        return m.num_features, 1, ""
    if isinstance(m, nn.GroupNorm):
        return m.num_channels, 1, ""
    if isinstance(m, _LN):
        shape = tuple(m.normalized_shape)
        if len(shape) == 1:
            return shape[0], -1, ""
        return None, -1, f" (scalar: normalized_shape {shape} spans several dims)"
    return None


def _like(new: nn.Module, old: nn.Module, fallback: torch.Tensor | None) -> nn.Module:
    ref = next(iter(old.parameters(recurse=False)), None)
    if ref is None:
        ref = next(iter(old.buffers(recurse=False)), None)
    ref = ref if ref is not None else fallback
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    return new


class _Spy(TorchFunctionMode):
    """Records activation/normalization *function* calls made outside any module that we replace."""

    def __init__(self, inside: list[int], stack: list[str]) -> None:
        super().__init__()
        self.inside, self.stack, self.calls = inside, stack, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.inside[0] == 0:
            name = _ACT_FUNCS.get(func) or _NORM_FUNCS.get(func)
            if name is not None:
                where = self.stack[-1] if self.stack else "<model>"
                self.calls[(where, name)] = self.calls.get((where, name), 0) + 1
        return func(*args, **(kwargs or {}))


def _trace(model: nn.Module, example_input, watch: dict[str, nn.Module]):
    """One forward of ``example_input``: input shapes seen by each watched module, and function calls
    of activations/norms made outside any SALU-family or watched module."""
    shapes: dict[str, set[tuple[int, ...]]] = {k: set() for k in watch}
    inside, stack = [0], []
    handles = []
    owned = {id(m) for m in watch.values()} | {id(m) for m in model.modules() if _norm_spec(m) is not None}
    for name, m in model.named_modules():
        def pre(mod, args, name=name):
            stack.append(name or "<model>")
            if id(mod) in owned or isinstance(mod, SaluFamily):
                inside[0] += 1
            if name in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name].add(tuple(args[0].shape))

        def post(mod, args, out):
            stack.pop()
            if id(mod) in owned or isinstance(mod, SaluFamily):
                inside[0] -= 1
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    spy = _Spy(inside, stack)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), spy:
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes, spy.calls


def _function_activations(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(owner, attribute, kind) for activations stored as functions on modules (TransformerEncoderLayer)."""
    found = []
    for m in model.modules():
        for attr, val in list(vars(m).items()):
            if callable(val) and not isinstance(val, nn.Module):
                try:
                    kind = _ACT_FUNCS.get(val)
                except TypeError:  # unhashable callable
                    kind = None
                if kind is not None:
                    found.append((m, attr, kind))
    return found


def convert(model: nn.Module, *, norm: str | Callable = "salu", act: str | Callable = "swalu",
            gelu: str | Callable = "galu", example_input=None) -> ConvertReport:
    """Replace norms and activations of ``model`` in place; see the module docstring.

    Args:
        norm: "salu", "identity" (drop normalization), or a callable ``(num_features, dim) -> nn.Module``.
        act: replacement of ReLU-family / SiLU / Hardswish: "swalu", "galu", "keep", or a callable
            ``(num_features or None, dim) -> nn.Module``.
        gelu: replacement of GELU: "galu", "swalu", "keep", or a callable like ``act``.
        example_input: a tensor (or tuple of positional inputs) for one forward pass that sizes the
            per-channel activation parameters and finds activations called as functions.
    """
    norm_fn = _factory("norm", norm, {"salu": lambda c, d: SALU(c, dim=d), "identity": lambda c, d: nn.Identity()})
    gates = {"swalu": lambda c, d: SWALU(c, dim=d), "galu": lambda c, d: GALU(c, dim=d), "keep": None}
    act_fn = _factory("act", act, gates)
    gelu_fn = _factory("gelu", gelu, gates)
    report = ConvertReport()
    fallback = next(iter(model.parameters()), None)

    # 1. activations stored as functions -> equivalent modules, so that step 3 can swap them like others
    for owner, attr, kind in _function_activations(model):
        setattr(owner, attr, nn.GELU() if kind == "gelu" else nn.ReLU())
        if hasattr(owner, "activation_relu_or_gelu"):  # TransformerEncoderLayer's fused path needs relu/gelu
            owner.activation_relu_or_gelu = 0

    # 2. size activations with one traced forward
    acts = {n: m for n, m in model.named_modules() if isinstance(m, _RELU_LIKE + _GELU)}
    has_conv1d = any(isinstance(m, nn.Conv1d) for m in model.modules())
    shapes, calls = (_trace(model, example_input, acts) if example_input is not None else ({}, {}))

    # 3. swap activations first, then norms (a norm with children, like timm's BatchNormAct2d, keeps its
    #    already-converted children after the SALU: Sequential(SALU, *children))
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, _RELU_LIKE + _GELU):
                path = f"{name}.{child_name}" if name else child_name
                fn = gelu_fn if isinstance(child, _GELU) else act_fn
                if fn is None:
                    continue
                c, d, note = _act_size(shapes.get(path), has_conv1d, example_input is not None)
                new = _like(fn(c, d), child, fallback)
                setattr(m, child_name, new)
                report.replaced.append((path, type(child).__name__, _describe(new) + note))
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            spec = _norm_spec(child)
            if spec is not None:
                c, d, note = spec
                new = _like(norm_fn(c, d), child, fallback)
                inner = list(child.children())
                if inner:
                    note += f" (+ its own children: {', '.join(type(x).__name__ for x in inner)})"
                    new = nn.Sequential(new, *inner)
                setattr(m, child_name, new)
                report.replaced.append((path, type(child).__name__, _describe(new) + note))
            elif type(child).__name__.lower().endswith("norm") and not isinstance(child, SaluFamily) \
                    and not any(True for _ in child.children()):
                report.not_replaced.append((path, f"unknown normalization type {type(child).__name__}"))
    for (where, fname), n in sorted(calls.items()):
        report.not_replaced.append((where, f"{fname} called as a function in forward code ({n} call(s)); "
                                           "replace it by a module to convert it"))
    return report


def _act_size(seen: set | None, has_conv1d: bool, traced: bool) -> tuple[int | None, int, str]:
    if not seen:
        return None, 1, " (scalar: pass example_input for per-channel)" if not traced else \
            " (scalar: not reached by the example forward)"
    dims = set()
    for shp in seen:
        if len(shp) <= 1:
            return None, 1, " (scalar: 0-d/1-d input)"
        d = -1 if (len(shp) == 3 and not has_conv1d) else 1
        dims.add((shp[d], d))
    if len(dims) != 1:
        return None, 1, " (scalar: called on inputs of different widths)"
    c, d = dims.pop()
    return c, d, ""


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.Sequential):
        return "Sequential(" + ", ".join(_describe(x) for x in m) + ")"
    if isinstance(m, SaluFamily):
        return f"{type(m).__name__}({'scalar' if m.num_features is None else m.num_features}, dim={m.dim})"
    return type(m).__name__


def _factory(kind: str, spec, table: dict):
    if callable(spec) and not isinstance(spec, str):
        return spec
    if isinstance(spec, str) and spec in table:
        return table[spec]
    raise ValueError(f"convert: unknown {kind}={spec!r}; use one of {', '.join(table)} or a callable")
