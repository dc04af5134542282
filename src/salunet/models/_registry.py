"""Model registry: a table of named configs, one-line registered constructors, ``create_model(name, **kw)``.

Every architecture takes ``norm_layer`` / ``act_layer`` (names or callables, see :mod:`.layers`), so a
SaluNet and its normalized twin differ only in their table rows. Each architecture has one config
dataclass (:class:`ResNetConfig`, :class:`ViTConfig`) that is the single source of its defaults and of the
validation of every field: ``create_model`` only routes overrides into it, so the valid override keys are
the dataclass fields (plus the :class:`~.init.InitRules` fields, as a shortcut) and a bad value fails with
a ``ValueError`` naming the key and its valid choices or range.

Precedence of init values, lowest first: :class:`~.init.InitRules` defaults < the table row's ``init`` <
a user's ``init=InitRules(...)`` (it replaces the row's object as a whole: what the user wrote is what the
model gets) < single-field overrides such as ``salu_b0=0.3``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields, replace
from typing import Callable, ClassVar

from torch import nn

from .cnn import PlasticityCNN
from .init import InitRules
from .layers import LayerFactory, get_act_layer, get_norm_layer
from .nf import WS_MODES
from .resnet import BLOCKS, STEMS, ConvSpec, ResNet
from .vit import VIT_INIT, ViT

__all__ = ["MODEL_CONFIGS", "MODEL_TRAIN_DEFAULTS", "model_train_defaults", "create_model", "describe_model",
           "list_models", "register_model", "ResNetConfig", "ViTConfig", "CNNConfig"]


# ---- field validators (each names the key and what is valid) ----

def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def _choice(name: str, v, choices) -> str:
    if v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def _stage_blocks(name: str, v) -> tuple[int, ...]:
    ok = isinstance(v, (tuple, list)) and len(v) > 0 and all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v)
    if not ok:
        raise ValueError(f"{name} must be a non-empty tuple of positive integers (blocks per stage), "
                         f"e.g. (2, 2, 2, 2); got {v!r}")
    return tuple(v)


def _init_rules(name: str, v) -> InitRules:
    if not isinstance(v, InitRules):
        raise ValueError(f"{name} must be a salunet.models.InitRules (alias ResNetInit), got {v!r}; "
                         f"or pass its fields directly: {', '.join(f.name for f in fields(InitRules))}")
    return v


def _res_gain(name: str, v) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v < 1e3):
        raise ValueError(f"{name} must be None (no gain) or a number >= 0 (its init; 0 = SkipInit), got {v!r}")
    return float(v)


def _bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {v!r}")
    return v


def _dropout(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
    return float(v)


class _Config:
    """Shared behaviour of the config dataclasses: validation from each field's ``check`` metadata."""

    width_field: ClassVar[str]

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            if check is not None:
                setattr(self, f.name, check(f.name, getattr(self, f.name)))
        get_norm_layer(self.norm_layer)  # unknown names fail here, listing the valid ones
        get_act_layer(self.act_layer)

    def width_fields(self, width: int, overrides: dict) -> dict:
        """The field changes that ``create_model(width=...)`` means (applied with the other overrides in one
        ``replace``, so that validation sees the final combination, e.g. a width valid only with new heads)."""
        return {self.width_field: _positive_int("width", width)}


def _f(default, check: Callable | None = None, **kw):
    return field(default=default, metadata={"check": check} if check else {}, **kw)


@dataclass
class ResNetConfig(_Config):
    block: str = _f("basic", lambda n, v: _choice(n, v, tuple(BLOCKS)))
    layers: tuple[int, ...] = _f((2, 2, 2, 2), _stage_blocks)
    stem: str = _f("cifar", lambda n, v: _choice(n, v, STEMS))
    width: int = _f(64, _positive_int)
    norm_layer: str | LayerFactory = "salu"
    act_layer: str | LayerFactory = "swalu"
    init: InitRules = field(default_factory=InitRules, metadata={"check": _init_rules})
    # the normalization-free toolkit (models/nf.py); the defaults build the paper's plain convs
    conv_ws: str = _f("none", lambda n, v: _choice(n, v, WS_MODES))
    conv_bias: bool = _f(False, _bool)
    res_gain: float | None = _f(None, _res_gain)
    # regularisers (models/resnet.py): dropout before the classifier, stochastic depth's largest rate
    drop_rate: float = _f(0.0, _dropout)
    drop_path_rate: float = _f(0.0, _dropout)
    width_field: ClassVar[str] = "width"

    def build(self, *, num_classes: int, in_chans: int) -> ResNet:
        return ResNet(BLOCKS[self.block], self.layers, num_classes=num_classes, in_chans=in_chans,
                      width=self.width, stem=self.stem, norm=get_norm_layer(self.norm_layer),
                      act=get_act_layer(self.act_layer), init=self.init,
                      conv=ConvSpec(ws=self.conv_ws, bias=self.conv_bias, res_gain=self.res_gain),
                      drop_rate=self.drop_rate, drop_path_rate=self.drop_path_rate)


@dataclass
class ViTConfig(_Config):
    img_size: int = _f(32, _positive_int)
    patch: int = _f(4, _positive_int)
    hidden: int = _f(384, _positive_int)
    depth: int = _f(7, _positive_int)
    heads: int = _f(12, _positive_int)
    mlp_hidden: int = _f(384, _positive_int)
    dropout: float = _f(0.0, _dropout)
    norm_layer: str | LayerFactory = "salu"
    act_layer: str | LayerFactory = "galu"
    init: InitRules = field(default_factory=lambda: replace(VIT_INIT), metadata={"check": _init_rules})
    width_field: ClassVar[str] = "hidden"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden % self.heads:
            lo = max(self.heads, self.hidden - self.hidden % self.heads)
            raise ValueError(f"width (hidden size) {self.hidden} is not divisible by heads={self.heads}; valid "
                             f"widths are multiples of {self.heads} (e.g. {lo} or {lo + self.heads})")
        if self.img_size % self.patch:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch {self.patch}")

    def width_fields(self, width: int, overrides: dict) -> dict:
        # the baseline's MLP hidden equals its hidden size: a narrower ViT keeps that ratio unless told
        mlp = {} if "mlp_hidden" in overrides else {"mlp_hidden": _positive_int("width", width)}
        return {"hidden": _positive_int("width", width), **mlp}

    def build(self, *, num_classes: int, in_chans: int) -> ViT:
        return ViT(num_classes=num_classes, in_chans=in_chans, img_size=self.img_size, patch=self.patch,
                   hidden=self.hidden, depth=self.depth, heads=self.heads, mlp_hidden=self.mlp_hidden,
                   dropout=self.dropout, norm=get_norm_layer(self.norm_layer), act=get_act_layer(self.act_layer),
                   init=self.init)


@dataclass
class CNNConfig(_Config):
    img_size: int = _f(32, _positive_int)
    width: int = _f(32, _positive_int)
    norm_layer: str | LayerFactory = "salu"
    act_layer: str | LayerFactory = "prelu"
    init: InitRules = field(default_factory=InitRules, metadata={"check": _init_rules})
    width_field: ClassVar[str] = "width"

    def build(self, *, num_classes: int, in_chans: int) -> PlasticityCNN:
        return PlasticityCNN(num_classes=num_classes, in_chans=in_chans, img_size=self.img_size, width=self.width,
                             norm=get_norm_layer(self.norm_layer), act=get_act_layer(self.act_layer), init=self.init)


_RESNET18 = ResNetConfig(block="basic", layers=(2, 2, 2, 2), stem="cifar")
_RESNET50 = ResNetConfig(block="bottleneck", layers=(3, 4, 6, 3), stem="imagenet")

# branch_a0 is the gain of a one-block stage (divided by sqrt(blocks), see models/init.py); a Bottleneck's
# branch holds two amplifying SALU -> SWALU pairs, so it needs less than a BasicBlock's 1.2.
MODEL_CONFIGS: dict[str, _Config] = {
    "salunet_c18": replace(_RESNET18, norm_layer="salu", act_layer="swalu"),
    "resnet18_bn": replace(_RESNET18, norm_layer="batchnorm", act_layer="relu"),
    "salunet_c50": replace(_RESNET50, norm_layer="salu", act_layer="swalu", init=InitRules(branch_a0=0.8)),
    "resnet50_bn": replace(_RESNET50, norm_layer="batchnorm", act_layer="relu"),
    "salunet_t": ViTConfig(norm_layer="salu", act_layer="galu"),
    "vit_ln": ViTConfig(norm_layer="layernorm", act_layer="gelu"),
    # the plasticity CNN (figure 1) in its SALU-stabilised variant; `salunet experiment plasticity` also builds
    # it with norm_layer="batchnorm" and "identity" (appendix A's two other variants)
    "cnn4": CNNConfig(norm_layer="salu", act_layer="prelu"),
    # SaluNet-C-18 v2: the paper's model plus the normalization-free toolkit's winners (docstring of salunet_c18_v2)
    "salunet_c18_v2": replace(_RESNET18, norm_layer="salu", act_layer="swalu", conv_ws="center"),
    # SaluNet-C-50 v2: centred kernels and the BasicBlock's branch gain (why: docstring of salunet_c50_v2)
    "salunet_c50_v2": replace(_RESNET50, norm_layer="salu", act_layer="swalu", conv_ws="center",
                              init=InitRules(branch_a0=1.2)),
    # v3: v2 with scaled weight standardisation and SALU started at the pinned scale; trained pinned (the trainer
    # settings below; docstring of salunet_c18_v3)
    "salunet_c18_v3": replace(_RESNET18, norm_layer="salu", act_layer="swalu", conv_ws="scaled",
                              init=InitRules(salu_b0=0.012)),
    "salunet_c50_v3": replace(_RESNET50, norm_layer="salu", act_layer="swalu", conv_ws="scaled",
                              init=InitRules(branch_a0=1.2, salu_b0=0.012)),
}

# The per-step pin on fixed images with the projected gradient (train/pin.py): what the v3 models were measured
# with. K 0.15 goes with salu_b0 0.012 (the init's sqrt(a0 b0) rms near the pinned operating point).
_PINNED = {"salu_recalibrate": 0.15, "salu_recalibrate_every": 1, "salu_recalibrate_measure": "reference",
           "salu_project_grad": True}

# Trainer settings a model declares (docs/SPEC.md "Models that declare trainer defaults"): applied by
# salunet.train.resolve_config below every value given explicitly (recipe, config file, flags), so a model trained
# by name gets what it was tuned with, and any flag still overrides it. Keys are TrainConfig fields.
MODEL_TRAIN_DEFAULTS: dict[str, dict] = {
    # the trainer's default width (16, CPU-scale ResNets) is not a multiple of the ViTs' 12 heads: a plain
    # `salunet train --model salunet_t` gets 96 (8 dims per head, 1/4 of the paper's 384), the CPU-scale ViT
    "salunet_t": {"width": 96},
    "vit_ln": {"width": 96},
    # the C-18 pinned as well on 32 reference images as on 128 (docs/RESULTS.md "How many fixed images the pin
    # needs"); the C-50 was measured on 128 only
    "salunet_c18_v3": {**_PINNED, "salu_reference_images": 32},
    "salunet_c50_v3": {**_PINNED, "salu_reference_images": 128},
}

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name (timm's pattern); the name must have a row in MODEL_CONFIGS."""
    if fn.__name__ not in MODEL_CONFIGS:
        raise ValueError(f"register_model: no MODEL_CONFIGS row named {fn.__name__!r}")
    _MODELS[fn.__name__] = fn
    return fn


def _build(name: str, *, num_classes: int, in_chans: int = 3, width: int | None = None, norm_layer=None,
           act_layer=None, **overrides) -> nn.Module:
    cfg = MODEL_CONFIGS[name]
    _positive_int("num_classes", num_classes)
    _positive_int("in_chans", in_chans)
    init_keys = {f.name for f in fields(InitRules)}
    cfg_keys = {f.name for f in fields(cfg)} - {cfg.width_field}
    unknown = sorted(set(overrides) - cfg_keys - init_keys)
    if unknown:
        raise ValueError(f"{name}: unknown override(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(sorted(cfg_keys | init_keys | {'width'}))}")
    init = _init_rules("init", overrides.pop("init", cfg.init))
    init = replace(init, **{k: overrides.pop(k) for k in list(overrides) if k in init_keys})  # validates
    layers = {k: v for k, v in (("norm_layer", norm_layer), ("act_layer", act_layer)) if v is not None}
    widths = cfg.width_fields(width, overrides) if width is not None else {}
    cfg = replace(cfg, init=init, **layers, **widths, **overrides)  # __post_init__ validates every field
    return cfg.build(num_classes=num_classes, in_chans=in_chans)


@register_model
def salunet_c18(**kw) -> ResNet:
    """SaluNet-C-18, the paper's model as reconstructed (docs/SPEC.md section 2): CIFAR ResNet-18, SALU for every
    BatchNorm, SWALU for every ReLU, plain convs."""
    return _build("salunet_c18", **kw)


@register_model
def salunet_c18_v2(**kw) -> ResNet:
    """SaluNet-C-18 v2: ``salunet_c18`` with every conv kernel centred per output channel (``conv_ws="center"``,
    models/nf.py), so that no channel entering a SALU carries a mean the SALU cannot remove.

    Evidence (docs/RESULTS.md "Closing the gap", the ablation protocol: width 16, 5 epochs, 5,120 images, seeds
    0-2): 46.9 +- 0.8% against the BN twin's 47.7 +- 1.3% and the paper's SaluNet's 36.5 +- 5.1%; at init the
    SALU inputs' channel mean^2/variance falls from 1.4-1.9 to <= 0.02 and stuck gate channels from 35-40% to 0
    (``salunet experiment signal``). Longer (12 epochs, 10,240 images) the twin ends ahead, and with weight decay
    tuned for each by 5 points (RESULTS "What the twin has that v2 lacks"). No batch statistic anywhere: train ==
    eval, batch size 1 works. For inference, :func:`~salunet.models.fold_nf_convs` turns the centred convs into
    plain ones."""
    return _build("salunet_c18_v2", **kw)


@register_model
def salunet_c18_v3(**kw) -> ResNet:
    """SaluNet-C-18 v3: ``salunet_c18_v2`` with scaled weight standardisation (``conv_ws="scaled"``: centred,
    unit-norm kernels with a learned gain, models/nf.py) and every SALU started at ``salu_b0=0.012``, made to be
    **trained pinned**: before each optimizer step every SALU's a and b are set so that each channel's sqrt(ab) *
    rms(input) = 0.15 on 32 fixed training images, and each SALU input's gradient loses its per-channel radial part
    (train/pin.py). ``salunet train --model salunet_c18_v3`` does that by name (``MODEL_TRAIN_DEFAULTS``; any flag
    still overrides it); in a loop of your own, :class:`salunet.SaluPin` ``(model, x_ref, target=0.15)``. Trained
    without the pin it is scaled-WS v2, which trails the twin (docs/RESULTS.md "What the twin has that v2 lacks").

    Evidence (docs/RESULTS.md, CIFAR-10 at the CPU budget: width 16, 10,240 images, batch 128, lr 0.05, weight
    decay 8e-3, each model's best): level with the BN twin ``resnet18_bn``, 76.0 +- 0.6% against 75.5 +- 0.5 at 12
    epochs (3 seeds; "How many fixed images the pin needs") and 81.2 +- 0.6 against 81.5 +- 0.5 at 24 (7 seeds,
    the twin 0.2 ahead paired by seed, s.e. 0.2; "The C-18 at 24 epochs on one machine"). No batch statistic in any
    forward: train == eval at any batch size (at batch size 1 the projection wants running sums,
    ``--salu-project-grad-rate 0.1``: measured on digits with v2 at K 0.1, "The whole recipe at small batches"; and
    with 32 or fewer images per backward, as DDP ranks or accumulated micro-batches see: on CIFAR-10 1.3-2.1
    points ahead at 32, 16 and 4, level at 128, "Small per-device batches on CIFAR-10"; the trainer warns there).
    A step costs one more forward, on the 32 images (1.2x an unpinned step at batch 128, docs/BENCHMARKS.md)."""
    return _build("salunet_c18_v3", **kw)


@register_model
def resnet18_bn(**kw) -> ResNet:
    """The BN twin of the C-18s: the same CIFAR ResNet-18 with BatchNorm and ReLU."""
    return _build("resnet18_bn", **kw)


@register_model
def salunet_c50(**kw) -> ResNet:
    """SaluNet-C-50, the paper's model as reconstructed: ResNet-50 (Bottleneck blocks, ImageNet stem; ``stem="cifar"``
    for 32 px images), SALU and SWALU, the residual branch's closing SALU at gain 0.8."""
    return _build("salunet_c50", **kw)


@register_model
def salunet_c50_v2(**kw) -> ResNet:
    """SaluNet-C-50 v2: ``salunet_c50`` with every conv kernel centred per output channel (``conv_ws="center"``), as
    ``salunet_c18_v2``, and the residual branch's closing SALU at the BasicBlock's gain (``branch_a0=1.2``, against
    the paper's C-50 row's 0.8).

    Why the gain: the C-50's SALU inputs carry the same per-channel mean shift as the C-18's (mean^2/variance 0.65
    -> 2.25 from layer1 to layer4 at init, 15-42% of gate channels stuck; none of either with centred kernels), and
    that shift was part of what the 0.8 compensated for: centred at 0.8, the stages' std decays to 0.36-0.49 by
    layer4 at init, outside the init rule's [0.5, 2] (models/init.py); at 1.2 it stays within 0.64-0.92 (CIFAR and
    ImageNet stems, tests/test_models.py). Evidence: docs/RESULTS.md "C-50: the same cause, the same fix". For
    inference, :func:`~salunet.models.fold_nf_convs` turns the centred convs into plain ones."""
    return _build("salunet_c50_v2", **kw)


@register_model
def salunet_c50_v3(**kw) -> ResNet:
    """SaluNet-C-50 v3: ``salunet_c50_v2`` (with its branch gain 1.2) made as ``salunet_c18_v3`` is: scaled weight
    standardisation, ``salu_b0=0.012``, trained pinned at K 0.15 with the projected gradient, here on 128 fixed
    images (the number it was measured with). Evidence (docs/RESULTS.md, CIFAR-10 with ``stem="cifar"`` at the
    C-18's CPU budget, weight decay 8e-3, the twin's best): ahead of ``resnet50_bn``, 74.2 +- 1.6% against
    70.4 +- 1.1 at 12 epochs and 80.6 +- 0.5 against 79.5 +- 0.5 at 24 (3 seeds; "The C-50 at each model's best
    weight decay", "The C-50 pinned cell at 24 epochs")."""
    return _build("salunet_c50_v3", **kw)


@register_model
def resnet50_bn(**kw) -> ResNet:
    """The BN twin of the C-50s: the same ResNet-50 with BatchNorm and ReLU."""
    return _build("resnet50_bn", **kw)


@register_model
def salunet_t(**kw) -> ViT:
    """SaluNet-T, the paper's ViT for CIFAR: SALU for every LayerNorm, GALU for every GELU (4 px patches)."""
    return _build("salunet_t", **kw)


@register_model
def vit_ln(**kw) -> ViT:
    """The LayerNorm twin of SaluNet-T: the same ViT with LayerNorm and GELU."""
    return _build("vit_ln", **kw)


@register_model
def cnn4(**kw) -> PlasticityCNN:
    """The plasticity CNN of the paper's figure 1 in its SALU-stabilised variant (four convs, PReLU gates)."""
    return _build("cnn4", **kw)


def model_train_defaults(name: str) -> dict:
    """The trainer settings model ``name`` declares (empty for most models and for unknown names)."""
    return dict(MODEL_TRAIN_DEFAULTS.get(name, {}))


def describe_model(name: str) -> dict:
    """What ``salunet models`` shows of a registered model: its architecture, norm and activation, the first
    sentence of its constructor's docstring (markup dropped) and the trainer settings it declares."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    cfg = MODEL_CONFIGS[name]
    text = " ".join((_MODELS[name].__doc__ or "").split("\n\n")[0].split()).replace("``", "").replace("**", "")
    end = text.find(". ")
    return {"name": name, "architecture": type(cfg).__name__.removesuffix("Config"), "norm_layer": cfg.norm_layer,
            "act_layer": cfg.act_layer, "summary": text if end < 0 else text[:end + 1],
            "declares": model_train_defaults(name)}


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a glob pattern (e.g. ``"salunet_*"``)."""
    return [n for n in sorted(_MODELS) if pattern is None or fnmatch.fnmatch(n, pattern)]


def create_model(name: str, *, num_classes: int, in_chans: int = 3, width: int | None = None,
                 norm_layer=None, act_layer=None, **overrides) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models`.
        num_classes: size of the classifier.
        in_chans: input channels.
        width: base channels (ResNets) or hidden size (ViT; MLP hidden follows it); None keeps the paper's.
        norm_layer / act_layer: override the config's norm / activation (names or callables
            ``(num_features, *, dim) -> nn.Module``).
        overrides: fields of the model's config dataclass (ResNet: ``block``, ``layers``, ``stem``, ``init``,
            ``conv_ws``, ``conv_bias``, ``res_gain``, ``drop_rate``, ``drop_path_rate``;
            ViT: ``img_size``, ``patch``, ``depth``, ``heads``, ``mlp_hidden``, ``dropout``, ``init``) and
            the :class:`~.init.InitRules` fields (``conv``, ``salu_a0``, ``salu_b0``, ``branch_a0``, ...).

    Raises:
        ValueError: unknown name or override key, or a bad value (the message names the key and what is valid).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return _MODELS[name](num_classes=num_classes, in_chans=in_chans, width=width, norm_layer=norm_layer,
                         act_layer=act_layer, **overrides)
