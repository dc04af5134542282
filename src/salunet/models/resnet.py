"""ResNets with pluggable norm/activation: SaluNet-C-18, SaluNet-C-50 and their BatchNorm twins.

Paper: arXiv 2606.02927, section "models" as summarised in SPEC.md section 2.
- CIFAR ResNet-18: 3x3 stem, no max-pool, BasicBlock x[2, 2, 2, 2], widths 64-128-256-512, 1x1-conv
  shortcut (+ norm) on downsampling. ``resnet18_bn`` has the standard 11,173,962 parameters (10 classes).
- ImageNet ResNet-50: 7x7/2 stem + 3x3/2 max-pool, Bottleneck x[3, 4, 6, 3] (stride on the 3x3, "v1.5",
  as torchvision), 25,557,032 parameters for 1000 classes.
SaluNet swaps every norm for SALU (the shortcut's too) and every ReLU for SWALU; SALU -> SWALU pairs run as
one fused kernel (:class:`salunet.nn.SALUAct`).

Initialisation (**[decided]**, SPEC.md "Trainability at initialisation"): without batch statistics nothing
re-normalises the signal, so init must keep it alive. :class:`ResNetInit` holds the rules; their reasons:
- convs: Kaiming-normal, fan-in, ReLU gain: keeps the variance of a conv's output equal to the second moment
  of its input (PyTorch's default init shrinks it about 3x per conv; 17 convs lose the signal).
- SALU a0 = 1.5 before each SWALU: SWALU (~SiLU at init) keeps only about 0.36 of the second moment of a
  unit-variance input (std x0.6 per layer, 0.6^17 over ResNet-18); a gain of 1.5 in the SALU before it
  brings the pair back to std ~0.9.
- SALU b0 = 0.1 (width w ~ 2.6 at a0 = 1.5): near-linear for unit-scale input but still bounded; b0 = 1
  would saturate and compress the signal.
- the residual branch's last SALU starts with gain ``branch_a0`` (1.0 for BasicBlocks, 0.7 for Bottlenecks,
  whose branch holds two amplifying SALU -> SWALU pairs) and the shortcut SALU with ``shortcut_a0`` = 1:
  with them the sum entering each block's final SWALU carries about twice the block input's variance, which
  that SWALU brings back to ~1, so stage stds stay in [0.65, 1.55] from stem to layer4 (measured at widths
  16 and 64) instead of decaying 0.6x per block.
- SWALU b0 = 0.01 (SWALU ~ SiLU at init), the operator default.
The defaults are checked by ``tests/test_models.py`` (every stage's activation std within [0.5, 2] at init
on unit-variance input); ``salunet experiment init-study`` compares alternatives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn import SALU, SWALU, GALU, SaluFamily
from .layers import LayerFactory, norm_act

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "ResNetInit", "init_resnet"]


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, 0, bias=False)


def _shortcut(cin: int, cout: int, stride: int, norm: LayerFactory) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(conv1x1(cin, cout, stride), norm(cout, dim=1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, ch: int, stride: int, norm: LayerFactory, act: LayerFactory) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, ch, stride)
        self.na1 = norm_act(norm, act, ch)
        self.conv2 = conv3x3(ch, ch)
        self.norm2 = norm(ch, dim=1)  # end of the residual branch
        self.shortcut = _shortcut(cin, ch, stride, norm)
        self.act = act(ch, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.na1(self.conv1(x))))
        return self.act(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, ch: int, stride: int, norm: LayerFactory, act: LayerFactory) -> None:
        super().__init__()
        self.conv1 = conv1x1(cin, ch)
        self.na1 = norm_act(norm, act, ch)
        self.conv2 = conv3x3(ch, ch, stride)
        self.na2 = norm_act(norm, act, ch)
        self.conv3 = conv1x1(ch, ch * 4)
        self.norm3 = norm(ch * 4, dim=1)  # end of the residual branch
        self.shortcut = _shortcut(cin, ch * 4, stride, norm)
        self.act = act(ch * 4, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm3(self.conv3(self.na2(self.conv2(self.na1(self.conv1(x))))))
        return self.act(out + self.shortcut(x))


@dataclass
class ResNetInit:
    """Init rules for the SALU-family layers of a ResNet (see the module docstring for the reasons)."""

    conv: str = "kaiming_normal"  # or "default" (PyTorch's kaiming_uniform(a=sqrt(5)))
    salu_a0: float = 1.5
    salu_b0: float = 0.1
    branch_a0: float = 1.0
    shortcut_a0: float = 1.0
    swalu_b0: float = 0.01


class ResNet(nn.Module):
    """ResNet with a CIFAR (3x3, no pool) or ImageNet (7x7/2 + max-pool) stem; stages ``layer1..layer4``."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], *, num_classes: int,
                 in_chans: int = 3, width: int = 64, stem: str = "cifar", norm: LayerFactory,
                 act: LayerFactory, init: ResNetInit | None = None) -> None:
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(conv3x3(in_chans, width), norm_act(norm, act, width))
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 7, 2, 3, bias=False),
                                      norm_act(norm, act, width), nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"unknown stem {stem!r}; use 'cifar' or 'imagenet'")
        cin = width
        for i, n in enumerate(layers):
            ch = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, ch, (1 if i == 0 else 2) if j == 0 else 1, norm, act))
                cin = ch * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        init_resnet(self, init or ResNetInit())

    def stages(self) -> dict[str, nn.Module]:
        """Named stages, in order, for analysis hooks."""
        return {"stem": self.stem, **{f"layer{i}": getattr(self, f"layer{i}") for i in range(1, self.num_stages + 1)}}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, w, H, W)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return torch.flatten(self.pool(x), 1)  # (N, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _set(m: SaluFamily, a0: float | None = None, b0: float | None = None) -> None:
    if a0 is not None:
        m.a_init = float(a0)
    if b0 is not None:
        m.b_init = float(b0)
    m.reset_parameters()


def init_resnet(model: ResNet, rules: ResNetInit) -> None:
    """Apply ``rules`` to the convs and SALU-family layers of ``model`` (BatchNorm keeps weight 1, bias 0)."""
    if rules.conv not in ("kaiming_normal", "default"):
        raise ValueError(f"unknown conv init {rules.conv!r}; use 'kaiming_normal' or 'default'")
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and rules.conv == "kaiming_normal":
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, SALU):
            _set(m, rules.salu_a0, rules.salu_b0)
        elif isinstance(m, (SWALU, GALU)):
            _set(m, None, rules.swalu_b0)
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            end = m.norm2 if isinstance(m, BasicBlock) else m.norm3
            for s in end.modules():
                if isinstance(s, SALU):
                    _set(s, rules.branch_a0)
            for s in m.shortcut.modules():
                if isinstance(s, SALU):
                    _set(s, rules.shortcut_a0)
