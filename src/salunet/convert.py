"""Make any model normalization-free in one call: ``salunet.convert(model, example_input=x)``.

Contract:
- Replaces, in place, every normalization module (BatchNorm1d/2d/3d, SyncBatchNorm, LayerNorm, RMSNorm, GroupNorm,
  InstanceNorm1d/2d/3d, their subclasses, and this project's LayerNorm2d / TokenBatchNorm) by a SALU of the right
  width on the dim it normalises; the ReLU family (ReLU, ReLU6, LeakyReLU, PReLU, RReLU, ELU, CELU, SELU), SiLU,
  Mish and Hardswish by SWALU; GELU by GALU. ``norm`` / ``act`` / ``gelu`` take any name or callable that
  :func:`salunet.create_model` accepts, or ``"keep"``. ``classes`` maps other module classes to a kind ("norm",
  "act", "gelu"); timm's own activation and norm classes are built in (:data:`KNOWN_CLASSES`, matched by name).
- Never guesses silently: what it cannot size or place is replaced by a choice that is right whatever the truth
  (a scalar SALU/SWALU) or left in place, and the returned :class:`ConvertReport` says so, as it lists every
  replacement, every module kept, every norm or activation called as a function in forward code, and notes.
- With ``example_input``: one traced forward sizes per-channel parameters and finds each norm's dim (a norm whose
  ``forward`` is not the library's is probed through its affine weight); then, by default, each new SALU is
  calibrated per channel so that its output has unit rms on the input it receives (amplitude
  :data:`CALIBRATION_AMPLITUDE`), i.e. it starts doing what the replaced norm did; a token SALU whose output is
  read only at some tokens (a ViT head's class token) is calibrated on those. Without it, gates are scalar and
  norms with a custom forward stay (reported).
- Atomic: if anything raises, every slot and attribute convert set is put back before the error propagates.
- Every submodule keeps its own train/eval mode; new modules take the device and dtype of what they replace.

Why each rule is as it is (dim detection, tag tracking through the traced pass, stored activation functions,
calibration by bisection, meta-device models): docs/SPEC.md, "convert: the decisions".
"""
from __future__ import annotations

import math
import re
import textwrap
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.overrides import TorchFunctionMode

from ._modes import eval_modes
from .models.layers import LayerNorm2d, TokenBatchNorm, get_act_layer, get_norm_layer
from .nn import SALU, SaluFamily

__all__ = ["convert", "ConvertReport", "CALIBRATION_AMPLITUDE", "KNOWN_CLASSES"]

CALIBRATION_AMPLITUDE = 4.0
_REPORT_WIDTH = 116

# ---- what convert knows -------------------------------------------------------------------------------------

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_IN = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_LN = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_NORM_BASES = _BN + _IN + (nn.GroupNorm,) + _LN
_OWN_NORMS = {LayerNorm2d: 1, TokenBatchNorm: -1}  # this project's norms whose forward moves the channel dim
# names of normalization classes convert does not know (reported, never silently kept): FrozenBatchNorm2d,
# LazyBatchNorm2d before its first forward, SomethingNorm, ...
_NORM_NAME = re.compile(r"norm(\d+d)?$", re.IGNORECASE)

_RELU_LIKE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.SiLU, nn.Mish,
              nn.Hardswish)
_GELU = (nn.GELU,)
# activation functions that a module may store as an attribute, and the module each one is equivalent to
_FUNC_MODULES: dict[Callable, type[nn.Module]] = {
    Fn.relu: nn.ReLU, torch.relu: nn.ReLU, Fn.relu6: nn.ReLU6, Fn.leaky_relu: nn.LeakyReLU, Fn.elu: nn.ELU,
    Fn.celu: nn.CELU, Fn.selu: nn.SELU, torch.selu: nn.SELU, Fn.silu: nn.SiLU, Fn.mish: nn.Mish,
    Fn.hardswish: nn.Hardswish, Fn.gelu: nn.GELU}
_TORCH_LEAF_MODULES = ("torch.nn.modules.activation", "torch.nn.modules.normalization")
_ACTIVATION_ATTRS = ("activation", "act", "act_fn", "activation_fn")  # where an unknown callable is reported
_KINDS = ("norm", "act", "gelu")

# Module classes of other libraries, by 'module.QualName' (no import needed: a name matches only when that library
# is installed and used): timm's own activation and norm classes that are not subclasses of torch's.
KNOWN_CLASSES: dict[str, str] = {
    **{f"timm.layers.activations.{n}": "gelu" for n in ("GELU", "GELUTanh", "QuickGELU")},
    **{f"timm.layers.activations.{n}": "act" for n in ("Swish", "Mish", "HardSwish", "HardMish")},
    **{f"timm.layers.activations_me.{n}": "act" for n in ("SwishMe", "MishMe", "HardSwishMe", "HardMishMe")},
    **{f"timm.layers.norm.{n}": "norm" for n in ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32",
                                                  "SimpleNorm", "SimpleNorm2d", "SimpleNormFp32", "SimpleNorm2dFp32")},
    "timm.layers.norm_act.FrozenBatchNormAct2d": "norm",
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _ClassKinds:
    """The kind ("norm", "act", "gelu") of a module's class: the user's ``classes`` first, then
    :data:`KNOWN_CLASSES`, then torch's classes; a mapping matches a class and its subclasses, given as the class
    object or as its 'module.QualName'."""

    def __init__(self, classes: dict | None) -> None:
        self.by_type: dict[type, str] = {}
        self.by_name: dict[str, str] = {}
        for k, kind in (classes or {}).items():
            if kind not in _KINDS:
                raise ValueError(f"convert: classes[{k!r}] = {kind!r}; the kind must be one of {', '.join(_KINDS)}")
            if isinstance(k, type) and issubclass(k, nn.Module):
                self.by_type[k] = kind
            elif isinstance(k, str) and "." in k:
                self.by_name[k] = kind
            else:
                raise ValueError(f"convert: classes key {k!r} is not an nn.Module class or a qualified class name "
                                 "such as 'timm.layers.activations.GELU'")

    def mapped(self, m: nn.Module) -> str | None:
        """The kind a mapping (the user's, then the built-in table) gives ``m``'s class, else None."""
        for table in (None, KNOWN_CLASSES):
            for cls in type(m).__mro__:
                kind = (self.by_type.get(cls) or self.by_name.get(_qualname(cls))) if table is None \
                    else table.get(_qualname(cls))
                if kind is not None:
                    return kind
        return None

    def act(self, m: nn.Module) -> str | None:
        """"act" or "gelu" for an activation module, else None."""
        kind = self.mapped(m)
        if kind is not None:
            return kind if kind != "norm" else None
        return "gelu" if isinstance(m, _GELU) else "act" if isinstance(m, _RELU_LIKE) else None

    def norm_spec(self, m: nn.Module) -> _NormSpec | None:
        kind = self.mapped(m)
        if kind is not None and kind != "norm":
            return None
        spec = _norm_spec(m)
        return spec if spec is not None or kind is None else _mapped_norm_spec(m)

# functional calls that the traced pass reports (names as torch-function dispatch sees them, trailing "_" cut)
_ACT_CALLS = {"relu", "relu6", "hardtanh", "leaky_relu", "prelu", "rrelu", "elu", "celu", "selu", "silu", "mish",
              "hardswish"}
_GELU_CALLS = {"gelu"}
_NORM_CALLS = {"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"}
# ops through which a channel-dim tag follows a tensor: elementwise, layout-preserving (see module docstring)
_TAG_PRESERVING = _ACT_CALLS | _GELU_CALLS | _NORM_CALLS | {
    "add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "div", "truediv", "rtruediv", "itruediv",
    "true_divide", "neg", "clone", "contiguous", "detach", "dropout", "alpha_dropout", "feature_alpha_dropout",
    "dropout1d", "dropout2d", "dropout3d", "to", "float", "half", "bfloat16", "double", "type_as", "clamp", "clip",
    "abs", "sigmoid", "tanh", "softplus", "hardsigmoid", "logsigmoid", "pow", "sqrt", "exp", "where"}


@dataclass
class ConvertReport:
    """What :func:`convert` did, in model order.

    ``replaced``: (path, old type, new module); ``kept``: (path, why) for things left as they were on purpose
    (``"keep"``); ``not_replaced``: (path, why) for things convert could not or would not replace;
    ``notes``: (path, note) for side effects worth knowing (calibration, fast paths switched off)."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    not_replaced: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing convert was asked to replace was left behind."""
        return not self.not_replaced

    def __str__(self) -> str:
        lines = [f"salunet.convert: {len(self.replaced)} replaced, {len(self.kept)} kept, "
                 f"{len(self.not_replaced)} not replaced"]
        paths = [p for p, *_ in self.replaced + self.kept + self.not_replaced + self.notes]
        w = min(max([len(p) for p in paths] + [4]), 40)
        ow = min(max([len(o) for _, o, _ in self.replaced] + [4]), 24)
        sections = [("replaced", [(p, f"{o:<{ow}} -> {n}") for p, o, n in self.replaced]),
                    ("kept", self.kept), ("NOT replaced", self.not_replaced), ("notes", self.notes)]
        for title, rows in sections:
            if rows:
                lines.append(f"  {title}:")
                for p, text in rows:  # long reasons wrap under their own column, paths stay scannable
                    body = textwrap.wrap(text, max(40, _REPORT_WIDTH - w - 6)) or [""]
                    lines.append(f"    {p:<{w}}  {body[0]}")
                    lines += [f"    {'':<{w}}    {t}" for t in body[1:]]
        return "\n".join(lines)

    def sort(self, order: dict[str, int]) -> None:
        """Put every list in model order (``order``: module name -> position); convert calls it once, last."""
        def key(entry):
            p = entry[0]
            while p not in order and "." in p:  # function-call sites and new children sort with their module
                p = p.rsplit(".", 1)[0]
            return order.get(p, -1 if p == "<model>" else len(order))
        for lst in (self.replaced, self.kept, self.not_replaced, self.notes):
            lst.sort(key=key)


# ---- norm specs -------------------------------------------------------------------------------------------------

@dataclass
class _NormSpec:
    width: int | None  # None: scalar SALU (a LayerNorm over several dims)
    dim: int | None  # None: unknown until the traced forward tells
    trusted: bool  # forward is the library's own (or this project's): the class tells the dim
    note: str = ""
    unbatched_rank: int | None = None  # InstanceNorm: an input of this rank has no batch dim, channels at dim 0

    def trusted_dim(self, rank: int | None) -> int | None:
        """The dim a trusted norm normalises on an input of ``rank`` (``self.dim`` as given, possibly negative,
        unless the input is an InstanceNorm's unbatched one: then 0)."""
        return 0 if rank is not None and rank == self.unbatched_rank else self.dim


def _norm_base(m: nn.Module) -> type | None:
    for cls in type(m).__mro__:
        if cls in _NORM_BASES:
            return cls
    return None


def _norm_spec(m: nn.Module) -> _NormSpec | None:
    """How to replace ``m`` if it is a normalization module, else None (see the module docstring)."""
    for own, dim in _OWN_NORMS.items():
        if isinstance(m, own) and type(m).forward is own.forward:
            return _NormSpec(m.normalized_shape[0] if own is LayerNorm2d else m.num_features, dim, True)
    base = _norm_base(m)
    if base is None:
        return None
    trusted = type(m).forward is base.forward
    if issubclass(base, _LN):
        shape = tuple(m.normalized_shape)
        if len(shape) != 1:
            return _NormSpec(None, -1, trusted, f" (scalar: normalized_shape {shape} spans several dims)")
        width, dim = shape[0], -1
    else:
        width, dim = (m.num_channels if base is nn.GroupNorm else m.num_features), 1
    return _NormSpec(width, dim if trusted else None, trusted,
                     unbatched_rank=_RANK_OF[base] - 1 if base in _IN else None)


def _mapped_norm_spec(m: nn.Module) -> _NormSpec:
    """A norm class known only by name (``classes`` or :data:`KNOWN_CLASSES`): its width from the usual attribute
    names or its affine parameter; its dim always from the traced forward (its forward is not torch's)."""
    width = None
    for attr in ("num_features", "num_channels", "normalized_shape", "dim", "channels"):
        v = getattr(m, attr, None)
        v = v[0] if isinstance(v, (tuple, list, torch.Size)) and len(v) == 1 else v
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            width = v
            break
    if width is None and _affine(m) is not None:
        width = _affine(m).shape[0]
    note = "" if width is not None else " (scalar: its width is not one of its attributes)"
    return _NormSpec(width, None if width is not None else -1, False, note)


def _affine(m: nn.Module) -> torch.Tensor | None:
    for name in ("weight", "bias"):
        p = getattr(m, name, None)
        if isinstance(p, torch.Tensor) and p.dim() == 1 and p.numel() > 1:
            return p
    return None


# ---- the traced forward -----------------------------------------------------------------------------------------

class _Tracer(TorchFunctionMode):
    """One forward of ``example_input`` with hooks on every module and a torch-function mode that (a) tags each
    tensor with the dim holding its channels, (b) probes norms whose forward is not the library's, (c) records
    input shapes and tags of watched activations and (d) records activation/norm *function* calls made outside
    the modules that convert handles."""

    def __init__(self, norms: dict[int, _NormSpec], acts: set[int], owned: set[int], report_calls: set[str]) -> None:
        super().__init__()
        self.norms, self.acts, self.owned = norms, acts, owned
        self.report_calls = report_calls
        self.tags: dict[int, tuple[weakref.ref, tuple[int, int]]] = {}
        self.act_inputs: dict[int, list[tuple[tuple[int, ...], tuple[int, int] | None]]] = {}
        self.input_devices: dict[int, torch.device] = {}  # where each watched norm / activation ran
        self.norm_dims: dict[int, list[tuple[int, int | None, str]]] = {}  # id -> [(rank, abs dim or None, why)]
        self.calls: dict[tuple[str, str], int] = {}
        self.stack: list[str] = []
        self.inside = 0
        self.quiet = 0  # >0 while our own hooks or probes run: record nothing

    # -- tags --
    def tag(self, t, tag: tuple[int, int] | None) -> None:
        if isinstance(t, torch.Tensor) and tag is not None:
            self.tags[id(t)] = (weakref.ref(t), tag)

    def tag_of(self, t) -> tuple[int, int] | None:
        e = self.tags.get(id(t)) if isinstance(t, torch.Tensor) else None
        if e is None or e[0]() is not t:
            return None
        c, d = e[1]
        return (c, d) if d < t.dim() and t.shape[d] == c else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.quiet:
            return out
        name = getattr(func, "__name__", "").strip("_")
        name = name[:-1] if name.endswith("_") else name
        if self.inside == 0 and name in self.report_calls:
            key = (self.stack[-1] if self.stack else "<model>", name)
            self.calls[key] = self.calls.get(key, 0) + 1
        if name in _TAG_PRESERVING and isinstance(out, torch.Tensor):
            self.quiet += 1
            try:
                tags = {self.tag_of(a) for a in list(args) + list(kwargs.values())
                        if isinstance(a, torch.Tensor) and a.shape == out.shape}
                tags.discard(None)
                if len(tags) == 1:
                    self.tag(out, tags.pop())
            finally:
                self.quiet -= 1
        return out

    # -- hooks --
    def pre(self, name: str, mod: nn.Module, args, kwargs) -> None:
        if self.quiet:
            return
        self.stack.append(name or "<model>")
        if id(mod) in self.owned:
            self.inside += 1
        if (id(mod) in self.acts or id(mod) in self.norms) and args and isinstance(args[0], torch.Tensor):
            self.input_devices.setdefault(id(mod), args[0].device)
        if id(mod) in self.acts and args and isinstance(args[0], torch.Tensor):
            self.quiet += 1
            try:
                self.act_inputs.setdefault(id(mod), []).append((tuple(args[0].shape), self.tag_of(args[0])))
            finally:
                self.quiet -= 1

    def post(self, name: str, mod: nn.Module, args, kwargs, out) -> None:
        if self.quiet:
            return
        self.stack.pop()
        if id(mod) in self.owned:
            self.inside -= 1
        self.quiet += 1
        try:
            self._tag_output(mod, args, kwargs, out)
        finally:
            self.quiet -= 1

    def _tag_output(self, mod, args, kwargs, out) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if isinstance(mod, nn.modules.conv._ConvNd) and isinstance(out, torch.Tensor):
            self.tag(out, (mod.out_channels, out.dim() - len(mod.kernel_size) - 1))
        elif isinstance(mod, nn.Linear) and isinstance(out, torch.Tensor):
            self.tag(out, (mod.out_features, out.dim() - 1))
        elif isinstance(mod, nn.Embedding) and isinstance(out, torch.Tensor):
            self.tag(out, (mod.embedding_dim, out.dim() - 1))
        elif isinstance(mod, nn.MultiheadAttention) and isinstance(out, tuple):
            self.tag(out[0], (mod.embed_dim, out[0].dim() - 1))
        elif isinstance(mod, SaluFamily) and mod.num_features is not None and isinstance(out, torch.Tensor):
            self.tag(out, (mod.num_features, mod.dim % out.dim()))
        elif id(mod) in self.norms and x is not None and isinstance(out, torch.Tensor):
            spec = self.norms[id(mod)]
            d, why = (spec.trusted_dim(x.dim()) % x.dim(), "") if spec.trusted else self._norm_dim(mod, spec, x, args, kwargs, out)
            self.norm_dims.setdefault(id(mod), []).append((x.dim(), d, why))
            if d is not None and spec.width is not None:
                self.tag(out, (spec.width, d))

    def _norm_dim(self, mod, spec: _NormSpec, x, args, kwargs, out) -> tuple[int | None, str]:
        """The dim an untrusted norm normalises: probe its affine parameter, else tags/shapes (docstring)."""
        c = spec.width
        if c is None:
            return -1 % x.dim(), ""  # scalar SALU: any dim does
        cands = [d for d in range(x.dim()) if x.shape[d] == c]
        if out.shape != x.shape:
            return None, f"its output shape {tuple(out.shape)} differs from its input's {tuple(x.shape)}"
        if not cands:
            return None, f"no dim of its input {tuple(x.shape)} has its width {c}"
        if len(cands) == 1:
            return cands[0], ""
        p = _affine(mod)
        if p is not None and p.shape[0] == c and not x.is_meta:
            hits = self._probe(mod, p, cands, args, kwargs, out)
            if len(hits) == 1:
                return hits[0], ""
        tag = self.tag_of(x)
        if tag is not None and tag[1] in cands:
            return tag[1], ""
        dims = ", ".join(map(str, cands))
        probe = "the probe of its affine parameter was inconclusive" if p is not None else \
            "it has no affine parameter to probe"
        return None, (f"dims {dims} of its input {tuple(x.shape)} all have its width {c} and its forward is not "
                      f"the library's; {probe}, and no traced layer says which dim holds the channels")

    @torch.no_grad()
    def _probe(self, mod, p: torch.Tensor, cands: list[int], args, kwargs, out) -> list[int]:
        hits = set(cands)
        for k in sorted({0, p.shape[0] - 1}):
            old = p[k].clone()
            p[k] = old + 1.0 + old.abs()  # a change no rounding hides
            try:
                y = mod.forward(*args, **kwargs)
            finally:
                p[k] = old
            changed = (y.float() - out.float()).abs() > 1e-3 * (1.0 + out.float().abs())
            if not bool(changed.any()):
                return []
            for d in list(hits):
                mask = torch.ones(changed.shape[d], dtype=torch.bool, device=changed.device)
                mask[k] = False
                view = [1] * changed.dim()
                view[d] = -1
                if bool((changed & mask.view(view)).any()):
                    hits.discard(d)
        return sorted(hits)


def _run(model: nn.Module, example_input) -> None:
    if isinstance(example_input, (tuple, list)):
        model(*example_input)
    elif isinstance(example_input, dict):
        model(**example_input)
    else:
        model(example_input)


class _NoFastPaths:
    """Switch off the native fast paths of nn.TransformerEncoder(Layer) for a traced pass: they run the whole
    layer in one kernel, so no hook inside it would fire."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [(m, a, getattr(m, a)) for m in model.modules()
                      for a in ("activation_relu_or_gelu", "use_nested_tensor") if hasattr(m, a)]

    def __enter__(self):
        for m, a, _ in self.saved:
            setattr(m, a, False)

    def __exit__(self, *exc):
        for m, a, v in self.saved:
            setattr(m, a, v)


def _trace(model: nn.Module, example_input, tracer: _Tracer) -> None:
    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(
            lambda mod, a, kw, name=name: tracer.pre(name, mod, a, kw), with_kwargs=True))
        handles.append(m.register_forward_hook(
            lambda mod, a, kw, o, name=name: tracer.post(name, mod, a, kw, o), with_kwargs=True))
    try:
        # eval: no running-statistics updates, no dropout
        with eval_modes(model), torch.no_grad(), _NoFastPaths(model), tracer:
            _run(model, example_input)
    finally:
        for h in handles:
            h.remove()


# ---- sizing ---------------------------------------------------------------------------------------------------

def _salu_dim(d: int, rank: int) -> int:
    """Absolute dim -> the ``dim`` a SALU gets: 1 (channel-first, any rank) or -1 (last, any leading shape)."""
    return 1 if d == 1 else (-1 if d == rank - 1 else d)


def _act_size(seen: list | None, traced: bool) -> tuple[int | None, int, str]:
    """(width or None for scalar, dim, note) for an activation from the inputs it saw (module docstring)."""
    if not traced:
        return None, 1, " (scalar: pass example_input for per-channel)"
    if not seen:
        return None, 1, " (scalar: not reached by the example forward)"
    found = set()
    for shape, tag in seen:
        if tag is not None:
            found.add((tag[0], _salu_dim(tag[1], len(shape))))
        elif len(shape) == 2:
            found.add((shape[1], 1))
        else:
            return None, 1, (f" (scalar: could not trace which dim of its {len(shape)}-d input holds the "
                             "channels)")
    if len(found) != 1:
        return None, 1, " (scalar: called on inputs of different widths or layouts)"
    c, d = found.pop()
    return c, d, ""


def _norm_size(spec: _NormSpec, seen: list | None, traced: bool, on_meta: bool) -> tuple[int | None, int | None,
                                                                                             int | None, str]:
    """(width, dim, rank or None, note), dim None = do not replace and ``note`` says why."""
    ranks = {r for r, _, _ in seen or []}
    rank = ranks.pop() if len(ranks) == 1 else None
    if spec.trusted:
        return spec.width, spec.trusted_dim(rank), rank, spec.note
    if not traced:
        return spec.width, None, rank, ("its forward is not the library's, so its class does not say which dim "
                                         "it normalises; pass example_input to find out")
    if not seen:
        return spec.width, None, rank, "its forward is overridden and the example forward never reached it"
    dims = {(_salu_dim(d, r) if d is not None else None) for r, d, _ in seen}
    if None in dims or len(dims) != 1:
        why = next((w for _, d, w in seen if d is None and w), "it normalised different dims in different calls")
        if on_meta:
            why += " (meta tensors carry no values to probe)"
        return spec.width, None, rank, why
    return spec.width, dims.pop(), rank, spec.note


_BN_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_RANK_OF = {nn.BatchNorm1d: 3, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5, nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4,
            nn.InstanceNorm3d: 5}


def _fit_rank(new: nn.Module, rank: int | None) -> nn.Module:
    """The factory's ``batchnorm`` is an exact nn.BatchNorm2d (deployment tools match that type); for a 2-D, 3-D
    or 5-D input give it the class of that rank. BatchNorm1d/2d/3d differ only in their input-rank check, so
    this changes no parameter, buffer or value."""
    if rank in _BN_BY_RANK:
        for m in new.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = _BN_BY_RANK[rank]
    return new


def _like(new: nn.Module, old: nn.Module, fallback: torch.Tensor | None, ran_on: torch.device | None = None
          ) -> nn.Module:
    """``new`` on the device and dtype of ``old``'s own parameters or buffers; for a module without any (ReLU,
    an affine-free norm), on the device its input had in the traced forward (``ran_on``: in a model split over
    devices, not the first parameter's) with the model's parameter dtype (``fallback``)."""
    ref = next(iter(old.parameters(recurse=False)), None)
    if ref is None:
        ref = next((b for b in old.buffers(recurse=False) if b.is_floating_point()), None)
    if ref is None and ran_on is not None:
        ref = torch.empty(0, device=ran_on, dtype=fallback.dtype if fallback is not None else torch.float32)
    ref = ref if ref is not None else fallback
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    return new.train(old.training)  # the mode of the module it replaces, not nn.Module's default


def _children(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (name, child) slot, repeats included (named_children() skips a module's second slot)."""
    return [(k, v) for k, v in m._modules.items() if v is not None]


def _describe(m: nn.Module) -> str:
    if isinstance(m, nn.Sequential):
        return "Sequential(" + ", ".join(_describe(x) for x in m) + ")"
    if isinstance(m, SaluFamily):
        return f"{type(m).__name__}({'scalar' if m.num_features is None else f'{m.num_features}, dim={m.dim}'})"
    return type(m).__name__


# ---- calibration --------------------------------------------------------------------------------------------

def _unit_rms_log_gain(xc: torch.Tensor, amplitude: float, iters: int = 24, samples: int = 4096) -> torch.Tensor:
    """Per row of ``xc`` (C, M): log a such that SALU(x; a, a/A^2) has rms 1 over the row, by bisection (the rms
    grows monotonically with a; 24 halvings of the bracket leave a relative error < 1e-6). Rows without signal
    get a = 1; rows whose rms cannot reach 1 (mostly zeros) get the largest gain tried. At most ``samples``
    values per row are used, at fixed random positions (a stride would alias with the image width: with a batch
    of 128 at 32x32 every 32nd value is one pixel column, the zero-padded border): an rms needs no more, and a
    large example batch stays cheap."""
    if xc.shape[1] > samples:
        pick = torch.randperm(xc.shape[1], generator=torch.Generator().manual_seed(0))[:samples]
        xc = xc[:, pick.to(xc.device)]
    rms = xc.square().mean(1).sqrt()
    alive = rms > 1e-12
    lo = torch.where(alive, -rms.clamp_min(1e-12).log(), torch.zeros_like(rms))  # a = 1/rms: output rms < 1
    hi = lo + math.log(4.0 * amplitude)
    inv_a2 = 1.0 / amplitude**2
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        u = xc * mid.exp()[:, None]
        out_ms = (u.square() / (1.0 + inv_a2 * u.square())).mean(1)
        up = out_ms < 1.0
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    return torch.where(alive, 0.5 * (lo + hi), torch.zeros_like(rms))


class _TokenUse(TorchFunctionMode):
    """Which token positions (dim 1 of a (B, N, D) output) of each watched SALU the rest of a forward reads: None
    for all of them, or the set an index such as ``x[:, 0]`` / ``x[:, :k]`` selects. A ViT's final norm runs on
    every token but its head reads the class token alone, whose scale differs from the patch tokens' (at init in
    timm's ViT-Tiny it is ~16x smaller), so the calibration must match *that* token's scale, not the mean over all.
    The tensor is followed through ops that return it unchanged in layout (dropout, to, contiguous, clone)."""

    _ALIASES = {"dropout", "contiguous", "clone", "to", "float", "detach", "type_as"}

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, tuple[weakref.ref, int]] = {}  # id(tensor) -> (ref, id(salu))
        self.used: dict[int, set[int] | None] = {}

    def watch(self, salu: nn.Module, out) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == 3 and salu.num_features is not None \
                and salu.dim % 3 == 2:
            self.watched[id(out)] = (weakref.ref(out), id(salu))
            self.used.setdefault(id(salu), set())

    def _owner(self, t) -> int | None:
        e = self.watched.get(id(t)) if isinstance(t, torch.Tensor) else None
        return e[1] if e is not None and e[0]() is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, (torch.Tensor, tuple, list)):
            return out  # .shape, .dim(), ...: reads no values
        name = getattr(func, "__name__", "").strip("_")
        for a in list(args) + list(kwargs.values()):
            sid = self._owner(a)
            if sid is None or self.used.get(sid, set()) is None:
                continue
            if name == "getitem" and a is args[0] and len(args) > 1:
                pos = _token_positions(args[1], a.shape[1])
                if pos is not None:
                    self.used[sid] |= pos
                    continue
            if name in self._ALIASES and isinstance(out, torch.Tensor) and out.shape == a.shape:
                self.watched[id(out)] = (weakref.ref(out), sid)
                continue
            self.used[sid] = None  # read in any other way: every token counts
        return out


def _token_positions(index, n: int) -> set[int] | None:
    """The dim-1 positions ``x[index]`` reads for ``x`` of shape (B, n, D), when the index is (":", int or
    slice[, ...]); else None."""
    if not (isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None)):
        return None
    if any(i not in (slice(None), Ellipsis) for i in index[2:]):
        return None
    i = index[1]
    if isinstance(i, int) and not isinstance(i, bool) and -n <= i < n:
        return {i % n}
    if isinstance(i, slice):
        return set(range(n)[i])
    return None


@torch.no_grad()
def _calibrate(model: nn.Module, example_input, salus: list[SALU], amplitude: float) -> int:
    """Set each SALU in ``salus`` from the input it receives in one forward (module docstring). A token SALU
    whose output is read only at some positions (:class:`_TokenUse`, found by a first pass) is calibrated on
    those positions."""
    done: set[int] = set()
    use = _TokenUse()
    if any(s.num_features is not None and s.dim == -1 for s in salus):  # token SALUs: which tokens count
        handles = [s.register_forward_hook(lambda mod, a, out: use.watch(mod, out)) for s in salus]
        try:
            with eval_modes(model), use:
                _run(model, example_input)
        finally:
            for h in handles:
                h.remove()

    def pre(mod: SALU, args):
        if id(mod) in done or not args or not isinstance(args[0], torch.Tensor):
            return
        done.add(id(mod))
        x = args[0].detach().float()
        pos = use.used.get(id(mod))
        if pos and x.dim() == 3:  # only the tokens the model goes on to read
            x = x[:, sorted(pos)]
        xc = x.reshape(1, -1) if mod.num_features is None else \
            x.movedim(mod.dim % x.dim(), 0).reshape(mod.num_features, -1)
        log_a = _unit_rms_log_gain(xc, amplitude)
        log_a = log_a.reshape(()) if mod.num_features is None else log_a
        mod.log_a.copy_(log_a.to(mod.log_a.dtype))
        mod.log_b.copy_((log_a - 2.0 * math.log(amplitude)).to(mod.log_b.dtype))

    handles = [s.register_forward_pre_hook(pre) for s in salus]
    try:
        with eval_modes(model):
            _run(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return len(done)


# ---- convert --------------------------------------------------------------------------------------------------

def _resolve(kind: str, spec, getter) -> Callable | None:
    if isinstance(spec, str) and spec == "keep":
        return None
    try:
        return getter(spec)
    except ValueError as e:
        raise ValueError(f"convert: {e} (or 'keep')".replace(f"{kind}_layer", kind)) from None


def _stored_functions(model: nn.Module) -> list[tuple[str, nn.Module, str, Callable, type[nn.Module] | None]]:
    """(path, owner, attribute, function, equivalent module type or None) for activations stored as functions."""
    found = []
    for path, m in model.named_modules():
        for attr, val in list(vars(m).items()):
            if isinstance(val, nn.Module) or not callable(val) or isinstance(val, type):
                continue
            try:
                cls = _FUNC_MODULES.get(val)
            except TypeError:  # unhashable callable
                cls = None
            if cls is not None or attr in _ACTIVATION_ATTRS:
                found.append((f"{path}.{attr}" if path else attr, m, attr, val, cls))
    return found


def convert(model: nn.Module, *, norm: str | Callable = "salu", act: str | Callable = "swalu",
            gelu: str | Callable = "galu", example_input=None, calibrate: bool | None = None,
            classes: dict | None = None) -> ConvertReport:
    """Replace the norms and activations of ``model`` in place; the module docstring explains every decision.

    Args:
        norm: replacement of normalization modules: a name of ``salunet.models.NORMS`` ("salu", "identity",
            "batchnorm+salu", ...), "keep", or a callable ``(num_features, *, dim) -> nn.Module``, the
            signature ``create_model`` uses; ``num_features`` is None when the width is unknown (a scalar SALU
            is then right), and a factory that cannot work without it raises ValueError, which is reported.
        act: replacement of the ReLU family / SiLU / Mish / Hardswish: a name of ``salunet.models.ACTS``
            ("swalu", "galu", "relu", ...), "keep", or a callable like ``norm``.
        gelu: replacement of GELU, like ``act``.
        example_input: a tensor, tuple of positional inputs or dict of keyword inputs for one forward pass that
            sizes the per-channel parameters, finds the dim each norm normalises, and finds activations and norms
            called as functions. Without it, gates are scalar and norms whose forward is not the library's are
            left in place (both reported).
        calibrate: set each new SALU's a0, b0 from the input it receives in a forward of ``example_input``
            (per channel, unit-rms output, amplitude :data:`CALIBRATION_AMPLITUDE`), so that the converted model is
            trainable at init. Default: True when ``example_input`` is given; True without it is an error.
        classes: extra module classes to replace, ``{class or 'module.QualName': 'norm' | 'act' | 'gelu'}`` (a
            class and its subclasses; e.g. ``{MyGELU: "gelu"}``). Mapped norms are sized from their attributes and
            placed by the traced forward (their forward is not torch's); mapped activations are sized like any other.
            Built in (:data:`KNOWN_CLASSES`): timm's GELU / GELUTanh / QuickGELU, Swish / Mish / HardSwish /
            HardMish (and their ``*Me`` variants), RmsNorm / SimpleNorm (1-D and 2-D) and FrozenBatchNormAct2d;
            timm's other norms subclass torch's and are recognised as such.

    Returns:
        A :class:`ConvertReport` (``print`` it), entries in model order.

    Atomic: if anything raises (a forward of ``example_input`` that fails, a factory error), every module slot
    and attribute convert changed is put back before the error propagates, so the model is as it was (lazy modules
    that the first forward initialised stay initialised, as after any forward).
    """
    norm_fn = _resolve("norm", norm, get_norm_layer)
    act_fn = _resolve("act", act, get_act_layer)
    gelu_fn = _resolve("gelu", gelu, get_act_layer)
    kinds = _ClassKinds(classes)
    traced = example_input is not None
    if calibrate is None:
        calibrate = traced
    if calibrate and not traced:
        raise ValueError("convert: calibrate=True needs example_input")
    edits = _Edits()
    try:
        fns = {"norm": norm_fn, "act": act_fn, "gelu": gelu_fn}
        return _Conversion(model, fns, example_input, calibrate, edits, kinds).run()
    except BaseException:
        edits.undo()
        raise


class _Edits:
    """Every slot and attribute convert sets, with the value it replaced, so that a failure can undo them all."""

    _ABSENT = object()

    def __init__(self) -> None:
        self.log: list[tuple[object, str, bool, object]] = []

    def set(self, obj, name: str, value) -> None:
        was_module = isinstance(obj, nn.Module) and name in obj._modules
        old = obj._modules[name] if was_module else obj.__dict__.get(name, self._ABSENT)
        self.log.append((obj, name, was_module, old))
        setattr(obj, name, value)

    def undo(self) -> None:
        for obj, name, was_module, old in reversed(self.log):
            if was_module:
                obj._modules[name] = old
                continue
            if isinstance(obj, nn.Module):
                obj._modules.pop(name, None)  # a function that had become a module slot
            if old is self._ABSENT:
                obj.__dict__.pop(name, None)
            else:
                object.__setattr__(obj, name, old)
        self.log.clear()


class _Conversion:
    """One call of :func:`convert`, phase by phase: :meth:`run` calls each phase in order; every slot and
    attribute it sets goes through ``edits`` (so a failure can undo them), every decision into ``report``."""

    def __init__(self, model: nn.Module, fns: dict, example_input, calibrate: bool, edits: _Edits,
                 kinds: _ClassKinds | None = None) -> None:
        self.model, self.edits, self.example_input, self.calibrate = model, edits, example_input, calibrate
        self.kinds = kinds or _ClassKinds(None)
        self.norm_fn, self.act_fn, self.gelu_fn = fns["norm"], fns["act"], fns["gelu"]
        self.traced = example_input is not None
        self.report = ConvertReport()
        self.fallback = next(iter(model.parameters()), None)
        self.from_function: dict[int, tuple[str, nn.Module, str, Callable]] = {}
        self.done: dict[int, nn.Module] = {}  # id(old module) -> its replacement (itself if kept)
        self.new_salus: list[SALU] = []
        self.changed_owners: set[int] = set()
        self.on_meta = False

    def run(self) -> ConvertReport:
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        self.functions_to_modules()
        self.find_and_trace()
        self.swap_activations()
        self.swap_norms()
        self.fast_paths_off()
        self.calibrate_new_salus()
        self.report.sort(order)
        return self.report

    def _set(self, owner: nn.Module, name: str, new: nn.Module) -> None:
        self.edits.set(owner, name, new)
        self.changed_owners.add(id(owner))

    def functions_to_modules(self) -> None:
        """Activations stored as functions: the kinds asked for become modules (swapped like any other in
        :meth:`swap_activations`); the others stay exactly as they are."""
        for path, owner, attr, fn, cls in _stored_functions(self.model):
            fname = getattr(fn, "__name__", type(fn).__name__)
            if cls is None:
                self.report.not_replaced.append((path, f"activation function {fname!r} stored on the module is not "
                                                       "one convert knows; pass a module instead"))
                continue
            kind = "gelu" if issubclass(cls, _GELU) else "act"
            if (self.gelu_fn if kind == "gelu" else self.act_fn) is None:
                self.report.kept.append((path, f"{fname} (a function), as asked ({kind}='keep')"))
                continue
            self.edits.set(owner, attr, cls().train(owner.training))
            self.from_function[id(getattr(owner, attr))] = (f"{fname} (function)", owner, attr, fn)

    def find_and_trace(self) -> None:
        """What to replace, and one traced forward (lazy modules take their final class in a first forward)."""
        model = self.model
        lazy = [m for m in model.modules() if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
        if lazy and self.traced:
            with eval_modes(model), torch.no_grad():
                _run(model, self.example_input)
            self.report.notes.append(("<model>", f"initialised {len(lazy)} lazy module(s) with a forward of "
                                                 "example_input"))
        self.norms = {id(m): s for m in model.modules() if (s := self.kinds.norm_spec(m)) is not None}
        self.acts = {id(m) for m in model.modules() if (k := self.kinds.act(m)) is not None
                     and (self.gelu_fn if k == "gelu" else self.act_fn) is not None}
        # calls made inside these are the library's business, not forward code the user could change
        owned = set(self.norms) | {id(m) for m in model.modules() if isinstance(m, SaluFamily)
                                   or self.kinds.act(m) is not None or type(m).__module__ in _TORCH_LEAF_MODULES}
        calls = (_ACT_CALLS if self.act_fn is not None else set()) | (
            _GELU_CALLS if self.gelu_fn is not None else set()) | (_NORM_CALLS if self.norm_fn is not None else set())
        self.tracer = _Tracer(self.norms, self.acts, owned, calls)
        if self.traced:
            ex = self.example_input
            ex = ex if isinstance(ex, (tuple, list)) else (list(ex.values()) if isinstance(ex, dict) else [ex])
            self.on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in ex)
            _trace(model, self.example_input, self.tracer)

    def swap_activations(self) -> None:
        """Activations first (a norm with children, like timm's BatchNormAct2d, then keeps its converted
        children); a module shared by several parents gets one replacement, still shared."""
        for name, m in list(self.model.named_modules()):
            for child_name, child in _children(m):
                path = f"{name}.{child_name}" if name else child_name
                if id(child) not in self.acts:
                    if self.kinds.act(child) is not None and id(child) not in self.done:
                        self.done[id(child)] = child
                        self.report.kept.append((path, f"{type(child).__name__}, as asked "
                                                       f"({self.kinds.act(child)}='keep')"))
                    continue
                if id(child) not in self.done:
                    self.done[id(child)] = self._new_activation(path, child)
                if self.done[id(child)] is not child:
                    self._set(m, child_name, self.done[id(child)])

    def _new_activation(self, path: str, child: nn.Module) -> nn.Module:
        fn = self.gelu_fn if self.kinds.act(child) == "gelu" else self.act_fn
        c, d, note = _act_size(self.tracer.act_inputs.get(id(child)), self.traced)
        old = self.from_function[id(child)][0] if id(child) in self.from_function else type(child).__name__
        try:
            new = _like(fn(c, dim=d), child, self.fallback, self.tracer.input_devices.get(id(child)))
        except ValueError as e:
            self.report.not_replaced.append((path, f"{old}: the act factory refused (num_features={c}, dim={d}): {e}"))
            if id(child) in self.from_function:  # put the original function back, exactly as it was
                _, owner, attr, fn = self.from_function[id(child)]
                del owner._modules[attr]  # a registered child slot refuses a plain function
                self.edits.set(owner, attr, fn)
            return child
        self.report.replaced.append((path, old, _describe(new) + note))
        return new

    def swap_norms(self) -> None:
        """Every norm the spec table recognised, at the width and dim found; unknown ``*Norm`` classes reported."""
        if self.norm_fn is None:
            self.report.kept += [(n, f"{type(m).__name__}, as asked (norm='keep')")
                                 for n, m in self.model.named_modules() if id(m) in self.norms]
        else:
            for name, m in list(self.model.named_modules()):
                for child_name, child in _children(m):
                    path = f"{name}.{child_name}" if name else child_name
                    if id(child) not in self.norms:
                        self._report_unknown_norm(path, child)
                        continue
                    if id(child) not in self.done:
                        self.done[id(child)] = self._new_norm(path, child, self.norms[id(child)])
                    if self.done[id(child)] is not child:
                        self._set(m, child_name, self.done[id(child)])
        for (where, fname), n in self.tracer.calls.items():
            self.report.not_replaced.append((where, self._call_note(where, fname, n)))

    def _call_note(self, where: str, fname: str, n: int) -> str:
        """Why a function call seen in the traced pass stays: a leaf module of an unknown class that calls it is
        an activation or norm *module* convert could replace if told its kind; other calls are forward code."""
        m = None
        if where != "<model>":
            try:
                m = self.model.get_submodule(where)
            except AttributeError:
                pass
        if m is not None and next(m.children(), None) is None:
            kind = "gelu" if fname in _GELU_CALLS else "norm" if fname in _NORM_CALLS else "act"
            return (f"{type(m).__name__}: a module class convert does not know, whose forward calls {fname} "
                    f"({n} call(s)); pass classes={{'{_qualname(type(m))}': '{kind}'}} to replace it")
        return f"{fname} called as a function in forward code ({n} call(s)); replace it by a module to convert it"

    def _report_unknown_norm(self, path: str, child: nn.Module) -> None:
        if _NORM_NAME.search(type(child).__name__) and not isinstance(child, SaluFamily) \
                and not any(True for _ in child.children()):
            cls = type(child).__name__
            why = (f"{cls}: a lazy module not initialised yet; pass example_input (or run one forward first)"
                   if isinstance(child, LazyModuleMixin) and child.has_uninitialized_params()
                   else f"unknown normalization type {cls}")
            self.report.not_replaced.append((path, why))

    def _new_norm(self, path: str, child: nn.Module, spec: _NormSpec) -> nn.Module:
        c, d, rank, note = _norm_size(spec, self.tracer.norm_dims.get(id(child)), self.traced, self.on_meta)
        if d is None:
            self.report.not_replaced.append((path, f"{type(child).__name__}: {note}"))
            return child
        try:
            new = self.norm_fn(c, dim=d)
        except ValueError as e:
            self.report.not_replaced.append((path, f"{type(child).__name__}: the norm factory refused "
                                                   f"(num_features={c}, dim={d}): {e}"))
            return child
        new = _like(_fit_rank(new, rank if rank is not None else _RANK_OF.get(type(child))), child, self.fallback,
                    self.tracer.input_devices.get(id(child)))
        if not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in new.modules()):
            # a SALU behind a new BatchNorm (norm="batchnorm+salu") sees batch-normalised input in training, which
            # an eval-mode calibration pass cannot show it: it keeps its init
            self.new_salus += [s for s in new.modules() if isinstance(s, SALU)]
        inner = list(child.children())
        if inner:
            note += f" (+ its own children: {', '.join(type(x).__name__ for x in inner)})"
            new = nn.Sequential(new, *inner)
        self.report.replaced.append((path, type(child).__name__, _describe(new) + note))
        return new

    def fast_paths_off(self) -> None:
        """PyTorch's transformer fast path runs its own ReLU/GELU and LayerNorm kernels: off wherever we swapped."""
        for name, m in self.model.named_modules():
            if hasattr(m, "activation_relu_or_gelu") and id(m) in self.changed_owners and m.activation_relu_or_gelu:
                self.edits.set(m, "activation_relu_or_gelu", 0)
                self.report.notes.append((name or "<model>", "native fast path switched off (it would bypass the "
                                                             "new modules)"))
            if getattr(m, "use_nested_tensor", False) and any(id(x) in self.changed_owners for x in m.modules()):
                self.edits.set(m, "use_nested_tensor", False)

    def calibrate_new_salus(self) -> None:
        if not (self.calibrate and self.new_salus):
            return
        if self.on_meta:
            self.report.notes.append(("<model>", "not calibrated: meta tensors carry no values"))
            return
        n = _calibrate(self.model, self.example_input, self.new_salus, CALIBRATION_AMPLITUDE)
        self.report.notes.append(("<model>", f"calibrated {n} of {len(self.new_salus)} new SALU(s) from "
                                             f"example_input (unit-rms output, amplitude {CALIBRATION_AMPLITUDE:g})"))
