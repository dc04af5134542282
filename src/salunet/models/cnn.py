"""The 4-layer PReLU CNN of the paper's plasticity analysis (arXiv 2606.02927, figure 1 and appendix A).

Appendix A names Conv(32) - Conv(64) - FC(128) - FC(10) with PReLU activations and three variants: BatchNorm
before each PReLU, no normalisation, and SALU-based stabilisation. **[decided]** where it is silent: 3x3 convs
(padding 1) each followed by 2x2 max-pooling, per-channel PReLU (one slope per conv channel / hidden unit, so
that the distribution of slopes can be tracked: 32 + 64 + 128 slopes), the norm layer between each conv / hidden
FC and its PReLU, and the classifier FC without norm or activation. ``width`` scales every layer (32 -> width,
64 -> 2 width, 128 -> 4 width).
"""
from __future__ import annotations

import torch
from torch import nn

from .init import InitRules, init_model
from .layers import LayerFactory

__all__ = ["PlasticityCNN"]


class PlasticityCNN(nn.Module):
    def __init__(self, *, num_classes: int, in_chans: int = 3, img_size: int = 32, width: int = 32,
                 norm: LayerFactory, act: LayerFactory, init: InitRules | None = None) -> None:
        super().__init__()
        c1, c2, h = width, 2 * width, 4 * width
        self.conv1 = nn.Conv2d(in_chans, c1, 3, padding=1)
        self.norm1, self.act1 = norm(c1, dim=1), act(c1, dim=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.norm2, self.act2 = norm(c2, dim=1), act(c2, dim=1)
        self.pool = nn.MaxPool2d(2)
        side = img_size // 4
        if side < 1:
            raise ValueError(f"img_size {img_size} is too small for two 2x2 poolings; use >= 4")
        self.fc1 = nn.Linear(c2 * side * side, h)
        self.norm3, self.act3 = norm(h, dim=-1), act(h, dim=-1)  # (N, h): the feature dim is last
        self.fc = nn.Linear(h, num_classes)
        self.num_features = h
        init_model(self, init or InitRules())

    def stages(self) -> dict[str, nn.Module]:
        """Named stages for analysis hooks: each PReLU's output."""
        return {"act1": self.act1, "act2": self.act2, "act3": self.act3}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act1(self.norm1(self.conv1(x))))  # (N, c1, H/2, W/2)
        x = self.pool(self.act2(self.norm2(self.conv2(x))))  # (N, c2, H/4, W/4)
        return self.act3(self.norm3(self.fc1(torch.flatten(x, 1))))  # (N, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
