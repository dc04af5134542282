"""Model registry: a table of named configs plus ``create_model(name, **overrides)``.

Every architecture takes ``norm_layer`` / ``act_layer`` (names or callables, see :mod:`.layers`), so a
SaluNet and its normalized twin differ only in their table rows.
"""
from __future__ import annotations

import fnmatch
from dataclasses import fields

from torch import nn

from .layers import get_act_layer, get_norm_layer
from .resnet import BasicBlock, Bottleneck, ResNet, ResNetInit
from .vit import ViT

__all__ = ["MODEL_CONFIGS", "create_model", "list_models"]

_RESNET18 = dict(arch="resnet", block="basic", layers=(2, 2, 2, 2), stem="cifar", width=64)
_RESNET50 = dict(arch="resnet", block="bottleneck", layers=(3, 4, 6, 3), stem="imagenet", width=64)
_VIT = dict(arch="vit", img_size=32, patch=4, hidden=384, depth=7, heads=12, mlp_hidden=384, dropout=0.0)

MODEL_CONFIGS: dict[str, dict] = {
    "salunet_c18": {**_RESNET18, "norm_layer": "salu", "act_layer": "swalu"},
    "resnet18_bn": {**_RESNET18, "norm_layer": "batchnorm", "act_layer": "relu"},
    "salunet_c50": {**_RESNET50, "norm_layer": "salu", "act_layer": "swalu", "branch_a0": 0.7},
    "resnet50_bn": {**_RESNET50, "norm_layer": "batchnorm", "act_layer": "relu"},
    "salunet_t": {**_VIT, "norm_layer": "salu", "act_layer": "galu"},
    "vit_ln": {**_VIT, "norm_layer": "layernorm", "act_layer": "gelu"},
}

_RESNET_KEYS = {"layers", "stem", "init"} | {f.name for f in fields(ResNetInit)}
_VIT_KEYS = {"img_size", "patch", "depth", "heads", "mlp_hidden", "dropout", "salu_b0"}


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a glob pattern (e.g. ``"salunet_*"``)."""
    names = sorted(MODEL_CONFIGS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def create_model(name: str, *, num_classes: int, in_chans: int = 3, width: int | None = None,
                 norm_layer=None, act_layer=None, **overrides) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models`.
        num_classes: size of the classifier.
        in_chans: input channels.
        width: base channels (ResNets) or hidden size (ViT; MLP hidden follows it); None keeps the paper's.
        norm_layer / act_layer: override the config's norm / activation (names or callables).
        overrides: architecture fields (ResNet: ``layers``, ``stem`` and the :class:`ResNetInit` fields, or
            ``init=ResNetInit(...)``; ViT: ``img_size``, ``patch``, ``depth``, ``heads``, ``mlp_hidden``,
            ``dropout``, ``salu_b0``).
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    cfg = dict(MODEL_CONFIGS[name])
    _positive_int("num_classes", num_classes)
    _positive_int("in_chans", in_chans)
    norm = get_norm_layer(norm_layer if norm_layer is not None else cfg["norm_layer"])
    act = get_act_layer(act_layer if act_layer is not None else cfg["act_layer"])
    valid = _RESNET_KEYS if cfg["arch"] == "resnet" else _VIT_KEYS
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"{name}: unknown override(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    if cfg["arch"] == "resnet":
        init = overrides.pop("init", None) or ResNetInit()
        init_fields = {f.name for f in fields(ResNetInit)}
        table = {k: cfg.pop(k) for k in list(cfg) if k in init_fields}  # the config's own init rules
        init = ResNetInit(**{**init.__dict__, **table,
                             **{k: overrides.pop(k) for k in list(overrides) if k in init_fields}})
        cfg.update(overrides)
        w = _positive_int("width", width) if width is not None else cfg["width"]
        layers = tuple(cfg["layers"])
        if not layers or any(not isinstance(n, int) or n <= 0 for n in layers):
            raise ValueError(f"layers must be positive integers, got {cfg['layers']!r}")
        block = BasicBlock if cfg["block"] == "basic" else Bottleneck
        return ResNet(block, layers, num_classes=num_classes, in_chans=in_chans, width=w, stem=cfg["stem"],
                      norm=norm, act=act, init=init)
    cfg.update(overrides)
    hidden = _positive_int("width", width) if width is not None else cfg["hidden"]
    mlp_hidden = cfg["mlp_hidden"] if width is None or "mlp_hidden" in overrides else hidden
    for k in ("img_size", "patch", "depth", "heads", "mlp_hidden"):
        _positive_int(k, cfg[k])
    return ViT(num_classes=num_classes, in_chans=in_chans, img_size=cfg["img_size"], patch=cfg["patch"],
               hidden=hidden, depth=cfg["depth"], heads=cfg["heads"], mlp_hidden=mlp_hidden,
               dropout=float(cfg["dropout"]), norm=norm, act=act,
               **({"salu_b0": cfg["salu_b0"]} if "salu_b0" in cfg else {}))
