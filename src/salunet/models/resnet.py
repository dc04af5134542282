"""ResNets with pluggable norm/activation: SaluNet-C-18, SaluNet-C-50 and their BatchNorm twins.

Paper: arXiv 2606.02927, section "models" as summarised in docs/SPEC.md section 2.
- CIFAR ResNet-18: 3x3 stem, no max-pool, BasicBlock x[2, 2, 2, 2], widths 64-128-256-512, 1x1-conv
  shortcut (+ norm) on downsampling. ``resnet18_bn`` has the standard 11,173,962 parameters (10 classes).
- ImageNet ResNet-50: 7x7/2 stem + 3x3/2 max-pool, Bottleneck x[3, 4, 6, 3] (stride on the 3x3, "v1.5",
  as torchvision), 25,557,032 parameters for 1000 classes.
SaluNet swaps every norm for SALU (the shortcut's too) and every ReLU for SWALU; SALU -> SWALU pairs run as
one fused kernel (:class:`salunet.nn.SALUAct`), and so does each block's tail, act(norm(branch) + shortcut)
(:class:`salunet.nn.SALUAddAct`); the BN twin has the same modules (``tail.norm``, ``tail.act``) unfused.

Initialisation (**[decided]**, docs/SPEC.md "Trainability at initialisation"): :class:`~.init.InitRules`, applied by
:func:`~.init.init_model`, the same mechanism as the ViT's; :mod:`salunet.models.init` gives the reason for
every rule. Blocks expose ``branch_end`` (the norm closing the residual branch), ``shortcut`` and ``out_act``
(the gate after the sum) so that the init can find them without knowing the block type.
"""
from __future__ import annotations

import torch
from torch import nn

from .init import InitRules, ResNetInit, init_model
from .layers import LayerFactory, norm_act, norm_add_act

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "ResNetInit", "BLOCKS", "STEMS"]


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, 0, bias=False)


def _shortcut(cin: int, cout: int, stride: int, norm: LayerFactory) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(conv1x1(cin, cout, stride), norm(cout, dim=1))


class _Block(nn.Module):
    """What the init rules look for in a residual block (models/init.py): the norm closing the branch
    (``branch_end``), ``shortcut`` and the gate after the sum (``out_act``); both live in the block's ``tail``."""

    tail: nn.Module

    @property
    def branch_end(self) -> nn.Module:
        return self.tail.norm

    @property
    def out_act(self) -> nn.Module:
        return self.tail.act


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, cin: int, ch: int, stride: int, norm: LayerFactory, act: LayerFactory) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, ch, stride)
        self.na1 = norm_act(norm, act, ch)
        self.conv2 = conv3x3(ch, ch)
        self.shortcut = _shortcut(cin, ch, stride, norm)
        self.tail = norm_add_act(norm, act, ch)  # act(norm(branch) + shortcut): one fused pass for SaluNets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv2(self.na1(self.conv1(x))), self.shortcut(x))


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, cin: int, ch: int, stride: int, norm: LayerFactory, act: LayerFactory) -> None:
        super().__init__()
        self.conv1 = conv1x1(cin, ch)
        self.na1 = norm_act(norm, act, ch)
        self.conv2 = conv3x3(ch, ch, stride)
        self.na2 = norm_act(norm, act, ch)
        self.conv3 = conv1x1(ch, ch * 4)
        self.shortcut = _shortcut(cin, ch * 4, stride, norm)
        self.tail = norm_add_act(norm, act, ch * 4)  # act(norm(branch) + shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv3(self.na2(self.conv2(self.na1(self.conv1(x))))), self.shortcut(x))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
STEMS = ("cifar", "imagenet")


class ResNet(nn.Module):
    """ResNet with a CIFAR (3x3, no pool) or ImageNet (7x7/2 + max-pool) stem; stages ``layer1..layer4``."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], *, num_classes: int,
                 in_chans: int = 3, width: int = 64, stem: str = "cifar", norm: LayerFactory,
                 act: LayerFactory, init: InitRules | None = None) -> None:
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(conv3x3(in_chans, width), norm_act(norm, act, width))
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 7, 2, 3, bias=False),
                                      norm_act(norm, act, width), nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
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
        init_model(self, init or InitRules())

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
