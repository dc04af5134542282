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

Regularisers (off by default, so the registered models are the paper's): ``drop_rate``, dropout on the pooled
features before the classifier; ``drop_path_rate``, stochastic depth, each sample's residual branch dropped with a
probability that rises linearly from 0 at the first block to ``drop_path_rate`` at the last (the convention of
NFNets and timm). The branch is dropped after the norm that closes it, before the sum: ``act(norm(branch) * m +
shortcut)`` with m in {0, 1/keep} per sample. NFNets use both to stand in for BatchNorm's implicit regularisation,
which is why a normalization-free model may want them where its BN twin does not (docs/RESULTS.md).
"""
from __future__ import annotations

import torch
from torch import nn

from dataclasses import dataclass

from .init import InitRules, ResNetInit, init_model
from .layers import LayerFactory, norm_act, norm_add_act
from .nf import WS_MODES, NFConv2d

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "ResNetInit", "BLOCKS", "STEMS", "ConvSpec"]


@dataclass(frozen=True)
class ConvSpec:
    """How a ResNet builds its convs: the normalization-free toolkit's conv options (:mod:`.nf`).

    ``ws``: weight standardisation ("none", "center", "scaled", "scaled_fixed"); ``bias``: a per-channel conv bias (where a
    BatchNorm's beta used to be); ``res_gain``: init of a learnable scalar gain in each residual branch's last
    conv (None = no gain; 0 = SkipInit). The default builds plain bias-free ``nn.Conv2d`` (the paper's models)."""

    ws: str = "none"
    bias: bool = False
    res_gain: float | None = None

    @property
    def plain(self) -> bool:
        return self.ws == "none" and not self.bias

    def __call__(self, cin: int, cout: int, k: int, stride: int = 1, *, branch_end: bool = False) -> nn.Conv2d:
        gain = self.res_gain if branch_end else None
        if self.plain and gain is None:
            return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        return NFConv2d(cin, cout, k, stride, k // 2, bias=self.bias, ws=self.ws, res_gain=gain)


def _shortcut(cin: int, cout: int, stride: int, norm: LayerFactory, conv: ConvSpec) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(conv(cin, cout, 1, stride), norm(cout, dim=1))


def drop_path_scale(x: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample factors for stochastic depth on a batch ``x`` (dim 0 the samples): 0 with probability ``p``,
    1/(1-p) otherwise, shaped to broadcast against ``x``."""
    keep = 1.0 - p
    return x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)


class _Block(nn.Module):
    """What the init rules look for in a residual block (models/init.py): the norm closing the branch
    (``branch_end``), ``shortcut`` and the gate after the sum (``out_act``); both live in the block's ``tail``.
    ``drop_path``: the probability of dropping the branch of a training sample (stochastic depth)."""

    tail: nn.Module
    drop_path: float = 0.0

    def _tail(self, branch: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_path > 0:
            return self.tail(branch, shortcut, branch_scale=drop_path_scale(branch, self.drop_path))
        return self.tail(branch, shortcut)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path:g}" if self.drop_path else ""

    @property
    def branch_end(self) -> nn.Module:
        return self.tail.norm

    @property
    def out_act(self) -> nn.Module:
        return self.tail.act


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, cin: int, ch: int, stride: int, norm: LayerFactory, act: LayerFactory,
                 conv: ConvSpec = ConvSpec()) -> None:
        super().__init__()
        self.conv1 = conv(cin, ch, 3, stride)
        self.na1 = norm_act(norm, act, ch)
        self.conv2 = conv(ch, ch, 3, branch_end=True)
        self.shortcut = _shortcut(cin, ch, stride, norm, conv)
        self.tail = norm_add_act(norm, act, ch)  # act(norm(branch) + shortcut): one fused pass for SaluNets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tail(self.conv2(self.na1(self.conv1(x))), self.shortcut(x))


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, cin: int, ch: int, stride: int, norm: LayerFactory, act: LayerFactory,
                 conv: ConvSpec = ConvSpec()) -> None:
        super().__init__()
        self.conv1 = conv(cin, ch, 1)
        self.na1 = norm_act(norm, act, ch)
        self.conv2 = conv(ch, ch, 3, stride)
        self.na2 = norm_act(norm, act, ch)
        self.conv3 = conv(ch, ch * 4, 1, branch_end=True)
        self.shortcut = _shortcut(cin, ch * 4, stride, norm, conv)
        self.tail = norm_add_act(norm, act, ch * 4)  # act(norm(branch) + shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tail(self.conv3(self.na2(self.conv2(self.na1(self.conv1(x))))), self.shortcut(x))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _normalizes(norm: LayerFactory) -> bool:
    """Whether ``norm`` builds a layer that divides by a statistic of its input (a gain before it is lost)."""
    layer = norm(4, dim=1)
    return any(isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) for m in layer.modules())
STEMS = ("cifar", "imagenet")


class ResNet(nn.Module):
    """ResNet with a CIFAR (3x3, no pool) or ImageNet (7x7/2 + max-pool) stem; stages ``layer1..layer4``."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], *, num_classes: int,
                 in_chans: int = 3, width: int = 64, stem: str = "cifar", norm: LayerFactory,
                 act: LayerFactory, init: InitRules | None = None, conv: ConvSpec = ConvSpec(),
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        for name, p in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        if conv.ws not in WS_MODES:
            raise ValueError(f"conv_ws must be one of {', '.join(map(repr, WS_MODES))}, got {conv.ws!r}")
        if conv.res_gain is not None and _normalizes(norm):
            raise ValueError("res_gain needs branches that end in a SALU (or no norm): a normalizing layer after the "
                             "branch's last conv would divide the gain away; drop res_gain for normalized models")
        if stem == "cifar":
            self.stem = nn.Sequential(conv(in_chans, width, 3), norm_act(norm, act, width))
        elif stem == "imagenet":
            self.stem = nn.Sequential(conv(in_chans, width, 7, 2),
                                      norm_act(norm, act, width), nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
        cin, total, k = width, sum(layers), 0
        for i, n in enumerate(layers):
            ch = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, ch, (1 if i == 0 else 2) if j == 0 else 1, norm, act, conv))
                blocks[-1].drop_path = drop_path_rate * k / max(total - 1, 1)
                cin, k = ch * block.expansion, k + 1
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
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
        return self.fc(self.head_drop(self.forward_features(x)))
