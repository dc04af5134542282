"""Batched, per-sample augmentation as tensor ops on the training device (airbench-style): random crop with
padding, horizontal flip, mixup and cutmix. Every random draw comes from an explicit ``torch.Generator`` so
that a run is reproducible and resumable, and so that all DDP ranks can draw the *global* batch's randomness
identically and each keep its slice (see ``salunet.train.loop``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["random_crop", "random_flip", "mix_batch", "mixed_cross_entropy"]


def _to(t: Tensor, device) -> Tensor:
    """``t`` (drawn from the CPU generator) on ``device``. To a GPU through pinned memory without blocking: a
    plain copy from pageable memory would make the host wait for all queued GPU work, several times per batch."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _rand(n: int, gen: torch.Generator, device) -> Tensor:
    return _to(torch.rand(n, generator=gen, device=gen.device), device)


def random_crop(x: Tensor, padding: int, gen: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and crop back to the input size at a random offset per sample. x: (N, C, H, W)."""
    if padding <= 0:
        return x
    N, C, H, W = x.shape
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    oy = _to(torch.randint(0, 2 * padding + 1, (N,), generator=gen, device=gen.device), x.device)
    ox = _to(torch.randint(0, 2 * padding + 1, (N,), generator=gen, device=gen.device), x.device)
    rows = (oy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    n = torch.arange(N, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return xp[n, c, rows, cols]  # (N, C, H, W)


def random_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    flip = _rand(x.shape[0], gen, x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def mix_batch(x: Tensor, y: Tensor, mixup: float, cutmix: float, gen: torch.Generator):
    """Mixup (alpha ``mixup``) or cutmix (alpha ``cutmix``); with both > 0 one is chosen per batch at random.
    Returns (x, y_a, y_b, lam) with loss = lam * CE(y_a) + (1 - lam) * CE(y_b)."""
    if mixup <= 0 and cutmix <= 0:
        return x, y, y, 1.0
    use_cutmix = cutmix > 0 and (mixup <= 0 or _rand(1, gen, "cpu").item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = _beta(alpha, gen)
    perm = _to(torch.randperm(x.shape[0], generator=gen, device=gen.device), x.device)
    if not use_cutmix:
        return x * lam + x[perm] * (1 - lam), y, y[perm], lam
    H, W = x.shape[-2:]
    cut = (1 - lam) ** 0.5
    ch, cw = int(H * cut), int(W * cut)
    cy, cx = (int(v) for v in (_rand(2, gen, "cpu") * torch.tensor([H, W])).long())
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually pasted
    return x, y, y[perm], lam


_MAX_TRIES = 10_000  # rejection samplers below accept with probability >= 1/2 (Johnk, alpha <= 1) or > 0.95


def _beta(alpha: float, gen: torch.Generator) -> float:
    """Beta(alpha, alpha) from uniforms drawn with ``gen`` (torch.distributions.Beta takes no generator, and the
    draw must be reproducible and identical on every rank). alpha <= 1: Johnk's algorithm, in logarithms so that a
    tiny alpha (1e-300: u ** (1 / alpha) underflows to 0 for every u, and the plain form never accepts) still
    gives its 0-or-1 draws; alpha > 1 (where Johnk's acceptance falls as 1 / C(2 alpha, alpha)): the ratio of two
    Gamma(alpha) draws. Both loops are bounded."""
    if alpha > 1:
        g1, g2 = _gamma(alpha, gen), _gamma(alpha, gen)
        return g1 / (g1 + g2)
    for _ in range(_MAX_TRIES):
        u, v = _rand(2, gen, "cpu").tolist()
        la, lb = math.log1p(-u) / alpha, math.log1p(-v) / alpha  # log of (1 - u) ** (1 / alpha); 1 - u in (0, 1]
        top = max(la, lb)
        if top == -math.inf:
            continue
        if top + math.log(math.exp(la - top) + math.exp(lb - top)) <= 0:  # a + b <= 1
            d = lb - la
            return 0.0 if d > 700 else 1.0 / (1.0 + math.exp(d))  # a / (a + b)
    raise RuntimeError(f"Beta({alpha}, {alpha}) sampler did not accept in {_MAX_TRIES} tries")


def _gamma(alpha: float, gen: torch.Generator) -> float:
    """Gamma(alpha, 1) for alpha >= 1 by Marsaglia and Tsang's method (normals by Box-Muller from ``gen``)."""
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    for _ in range(_MAX_TRIES):
        u1, u2, u3 = _rand(3, gen, "cpu").tolist()
        z = math.sqrt(-2.0 * math.log1p(-u1)) * math.cos(2.0 * math.pi * u2)
        v = (1.0 + c * z) ** 3
        if v > 0 and math.log1p(-u3) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v
    raise RuntimeError(f"Gamma({alpha}) sampler did not accept in {_MAX_TRIES} tries")


def mixed_cross_entropy(logits: Tensor, y_a: Tensor, y_b: Tensor, lam: float, smoothing: float) -> Tensor:
    ce = torch.nn.functional.cross_entropy
    loss = ce(logits, y_a, label_smoothing=smoothing)
    if lam < 1.0:
        loss = lam * loss + (1 - lam) * ce(logits, y_b, label_smoothing=smoothing)
    return loss
