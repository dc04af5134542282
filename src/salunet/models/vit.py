"""The small CIFAR ViT (SaluNet-T) and its LayerNorm + GELU twin, matched to the ViT-CIFAR baseline that the
paper compares against (docs/SPEC.md section 2):

32x32 image -> 8x8 grid of 4x4 patches, each flattened to 48 values and embedded by Linear(48, hidden);
a learned cls token and a learned positional embedding (65 x hidden), both N(0, 1); 7 pre-norm encoder
layers ``x + MSA(norm(x))``, ``x + MLP(norm(x))``; MSA with separate q, k, v, o Linear layers (with bias),
12 heads, scores divided by sqrt(hidden) (the baseline's choice, not sqrt(head_dim)); MLP =
Linear-act-Dropout-Linear-act-Dropout (an activation after *both* linears, as in that repository);
head = norm + Linear on the cls token. ``vit_ln`` has 6,268,810 parameters for 10 classes.
SaluNet-T: every LayerNorm -> SALU(hidden, dim=-1), every GELU -> GALU(hidden, dim=-1).

Init: PyTorch's default Linear init, as the baseline. The residual stream starts at std ~1 (the N(0, 1)
cls/pos embeddings dominate) and each branch adds a fraction of it, so no residual scaling is needed to
keep every layer's std within [0.5, 2] (checked by tests/test_models.py). SALU-family layers are set by the
same :class:`~.init.InitRules` mechanism as the ResNets (:data:`VIT_INIT`: SALU a0 = 1, b0 = 0.1,
near-linear on the unit-scale stream; GALU b0 = 0.01, ~GELU); the encoder layers expose no ``branch_end``
(their branches end in a Linear), so the branch rules do not apply.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .init import InitRules, init_model
from .layers import LayerFactory

__all__ = ["ViT", "VIT_INIT"]

VIT_INIT = InitRules(salu_a0=1.0, salu_b0=0.1, gate_b0=0.01)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            lo = max(heads, dim - dim % heads)
            raise ValueError(f"hidden size (width) {dim} is not divisible by heads={heads}; valid widths are "
                             f"multiples of {heads} (e.g. {lo} or {lo + heads}), or change heads")
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim)  # baseline divides by sqrt(hidden), not sqrt(head_dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.heads
        q = self.q(x).view(B, N, h, D // h).transpose(1, 2)  # (B, h, N, d)
        k = self.k(x).view(B, N, h, D // h).transpose(1, 2)
        v = self.v(x).view(B, N, h, D // h).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)  # (B, h, N, N)
        out = (self.drop(attn) @ v).transpose(1, 2).reshape(B, N, D)
        return self.drop(self.o(out))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int, dropout: float, norm: LayerFactory,
                 act: LayerFactory) -> None:
        super().__init__()
        self.norm1 = norm(dim, dim=-1)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = norm(dim, dim=-1)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), act(mlp_hidden, dim=-1), nn.Dropout(dropout),
                                 nn.Linear(mlp_hidden, dim), act(dim, dim=-1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenEmbed(nn.Module):
    """Image -> tokens: flattened patches through a Linear, a learned cls token, a learned position table."""

    def __init__(self, in_chans: int, img_size: int, patch: int, hidden: int) -> None:
        super().__init__()
        self.patch, self.grid = patch, img_size // patch
        self.proj = nn.Linear(in_chans * patch * patch, hidden)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid**2 + 1, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p, size = self.patch, self.grid * self.patch
        if H != size or W != size:
            raise ValueError(f"this ViT expects {size}x{size} images, got {H}x{W}")
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
        t = self.proj(x.reshape(B, self.grid**2, C * p * p))  # (B, 64, hidden)
        return torch.cat([self.cls_token.expand(B, -1, -1), t], dim=1) + self.pos_embed  # (B, 65, hidden)


class ViT(nn.Module):
    def __init__(self, *, num_classes: int, in_chans: int = 3, img_size: int = 32, patch: int = 4,
                 hidden: int = 384, depth: int = 7, heads: int = 12, mlp_hidden: int = 384,
                 dropout: float = 0.0, norm: LayerFactory, act: LayerFactory, init: InitRules | None = None) -> None:
        super().__init__()
        if img_size % patch:
            raise ValueError(f"img_size {img_size} is not divisible by patch {patch}")
        self.embed = TokenEmbed(in_chans, img_size, patch, hidden)
        self.layers = nn.Sequential(*[EncoderLayer(hidden, heads, mlp_hidden, dropout, norm, act)
                                      for _ in range(depth)])
        self.head_norm = norm(hidden, dim=-1)
        self.fc = nn.Linear(hidden, num_classes)
        self.num_features = hidden
        self.depth = depth
        init_model(self, init or VIT_INIT)

    def stages(self) -> dict[str, nn.Module]:
        return {"embed": self.embed, **{f"layer{i + 1}": m for i, m in enumerate(self.layers)}}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        t = self.layers(self.embed(x))  # (B, 65, hidden)
        return self.head_norm(t[:, 0])  # (B, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
