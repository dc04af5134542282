"""Pure statistics behind the paper's analyses (arXiv 2606.02927, figures 1 and 6-11).

Every function here takes tensors (or nested lists of numbers) and returns numbers or tensors: no hooks, no
models, no plotting, so results can be recomputed from saved JSON and tested against inputs with known answers.
Computations run in float64.

Definitions (**[decided]** where the paper gives only a name):

- *Effective rank* (Roy & Vetterli, 2007): for features ``F`` (N samples x D dims), centred over samples, with
  singular values s_i, p_i = s_i / sum(s): erank = exp(-sum p_i log p_i). 1 for rank-one features, D for D
  equal singular values.
- *Isotropy index* (fractional participation ratio): with eigenvalues l_i of the feature covariance,
  iso = (sum l)^2 / (D sum l^2). 1 when every direction carries the same variance, 1/D when one direction
  carries it all, so it tends to 0 for collapsed features of large D. Unlike lambda_min / lambda_max it does not
  collapse to 0 because of a single dead direction, and it is the normalised form of the participation ratio
  used for neural representations (Gao et al., 2017). Caveat: the sample covariance of N samples spreads the
  eigenvalues of even isotropic features (Marchenko-Pastur), so iso ~ 1 / (1 + D/N) for isotropic Gaussian
  features: 0.94 at D/N = 0.064, 0.66 at D/N = 0.5. Compare stages of different D only at N >> D, or at equal
  D/N (``spectrum_stats`` records ``dims / samples``).
- *Moments*: per channel (the statistic of each channel over every other axis), and pooled (over all elements);
  excess kurtosis is the fourth standardised moment minus 3 (0 for a Gaussian).
- *Dormant units*: SALU-family units are never exactly 0, so "ReLU outputs 0" cannot define dormancy. A unit
  whose output hardly varies across inputs is dead to learning whatever its mean, so a unit's score is the std
  of its output over samples divided by the mean of that std over the layer's units (the variance form of Sokar
  et al.'s 2023 normalised activation score); a unit is dormant when its score is <= tau (default 0.1).
- *Plasticity* of learnable activation parameters over epochs (``values[t, k]`` = parameter k after epoch t):
  spread = std over parameters at each epoch (collapse to a narrow range shows as a falling spread);
  drift = mean |change| between consecutive epochs (still adapting shows as drift > 0); total drift = mean
  |value_t - value_0|. Parameters of several layers: the *within-layer* spread (std over parameters after
  subtracting each layer's own mean, i.e. sqrt(sum_l n_l spread_l^2 / sum_l n_l)) is the collapse measure; the
  spread pooled over all layers also counts how far the layers' means are apart.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["effective_rank", "isotropy", "spectrum_stats", "moments", "dormant_scores", "dormant_fraction",
           "plasticity", "within_group_spread", "salu_geometry"]


def _features(f: Tensor) -> Tensor:
    f = torch.as_tensor(f).detach().to(torch.float64)
    if f.dim() != 2:
        raise ValueError(f"features must be a (samples, dims) matrix, got shape {tuple(f.shape)}; "
                         "pool or flatten maps first")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to measure a feature spectrum, got {f.shape[0]}")
    if not torch.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f - f.mean(0, keepdim=True)


def _erank(s: Tensor) -> float:
    total = s.sum()
    if total <= 0:
        return 1.0  # constant features: one (degenerate) direction, the minimum of the measure
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _iso(s: Tensor, n: int, d: int) -> float:
    lam = s**2 / (n - 1)  # the nonzero eigenvalues of the feature covariance
    sq = (lam * lam).sum()
    return float(lam.sum() ** 2 / (d * sq)) if sq > 0 else 1.0 / d


def effective_rank(f: Tensor) -> float:
    """Roy & Vetterli effective rank of the centred (N, D) feature matrix ``f`` (see the module docstring)."""
    return _erank(torch.linalg.svdvals(_features(f)))


def isotropy(f: Tensor) -> float:
    """Fractional participation ratio (sum l)^2 / (D sum l^2) of the feature covariance; in [1/D, 1]."""
    f = _features(f)
    return _iso(torch.linalg.svdvals(f), *f.shape)


def spectrum_stats(f: Tensor) -> dict:
    """Effective rank, isotropy and dimensions of one feature matrix, from one SVD."""
    f = _features(f)
    s = torch.linalg.svdvals(f)
    n, d = f.shape
    erank = _erank(s)
    # after centring, N samples span at most N - 1 dimensions
    return {"effective_rank": erank, "isotropy": _iso(s, n, d), "dims": d, "samples": n,
            "dims_per_sample": d / n, "effective_rank_fraction": erank / min(n - 1, d)}


def moments(x: Tensor, channel_dim: int | None = 1) -> dict:
    """Variance, skewness and excess kurtosis of ``x``: pooled over all elements, and per channel along
    ``channel_dim`` (averaged over channels; ``None`` skips the per-channel part)."""
    x = torch.as_tensor(x).detach().to(torch.float64)
    if x.numel() < 2:
        raise ValueError(f"need at least 2 values for moments, got {x.numel()}")

    def _m(v: Tensor, dims: int) -> tuple[Tensor, Tensor, Tensor]:
        # shifted by one of its own values first (moments do not change): a constant channel is then exactly 0,
        # so its variance is exactly 0 and not the ~1e-34 that rounding the mean of 0.1s would leave
        v = v - v.narrow(dims, 0, 1)
        mu = v.mean(dims, keepdim=True)
        c = v - mu
        var = (c * c).mean(dims, keepdim=True)
        std = var.sqrt().clamp_min(1e-300)
        skew = ((c / std) ** 3).mean(dims)
        kurt = ((c / std) ** 4).mean(dims) - 3.0
        # a constant channel has no shape: report 0 skew / kurtosis rather than 0/0
        const = var.squeeze() <= 0 if var.dim() else var <= 0
        return var.squeeze(), torch.where(const, 0.0, skew.squeeze()), torch.where(const, 0.0, kurt.squeeze())

    var, skew, kurt = _m(x.reshape(-1), 0)
    out = {"variance": float(var), "skewness": float(skew), "excess_kurtosis": float(kurt)}
    if channel_dim is not None and x.dim() > 1:
        cd = channel_dim % x.dim()
        xc = x.movedim(cd, 0).reshape(x.shape[cd], -1)
        v, s, k = _m(xc, 1)
        out.update(channel_variance_mean=float(v.mean()), channel_skewness_mean=float(s.mean()),
                   channel_excess_kurtosis_mean=float(k.mean()), channels=int(x.shape[cd]))
    return out


def dormant_scores(x: Tensor, channel_dim: int = 1) -> Tensor:
    """Per-unit score std_over_samples(unit) / mean over units of that std (see the module docstring).
    ``x`` holds one layer's outputs; every axis but ``channel_dim`` counts as a sample axis."""
    x = torch.as_tensor(x).detach().to(torch.float64)
    cd = channel_dim % x.dim()
    xc = x.movedim(cd, 0).reshape(x.shape[cd], -1)
    if xc.shape[1] < 2:
        raise ValueError("need at least 2 samples per unit to score dormancy")
    std = xc.std(1)
    mean = std.mean()
    if mean <= 0:
        return torch.zeros_like(std)
    return std / mean


def dormant_fraction(x: Tensor, channel_dim: int = 1, tau: float = 0.1) -> float:
    """Fraction of units whose :func:`dormant_scores` is <= ``tau``."""
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    return float((dormant_scores(x, channel_dim) <= tau).double().mean())


def plasticity(values) -> dict:
    """Spread and drift of learnable parameters over time; ``values`` is (epochs+1, params): row 0 the initial
    values, row t the values after epoch t (see the module docstring)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.dim() != 2 or v.shape[0] < 2:
        raise ValueError(f"values must be (time >= 2, params), got shape {tuple(v.shape)}")
    spread = v.std(1, unbiased=False) if v.shape[1] > 1 else torch.zeros(v.shape[0], dtype=torch.float64)
    step = (v[1:] - v[:-1]).abs().mean(1)
    total = (v - v[:1]).abs().mean(1)
    q = torch.quantile(v, torch.tensor([0.1, 0.9], dtype=torch.float64), dim=1)
    return {"spread": spread.tolist(), "drift": step.tolist(), "total_drift": total.tolist(),
            "p10": q[0].tolist(), "p90": q[1].tolist(), "mean": v.mean(1).tolist()}


def within_group_spread(spreads: list, sizes: list[int]) -> list[float]:
    """Std over all parameters after subtracting each group's own mean, per time step, from the groups' own
    (population) spreads ``spreads[g][t]`` and sizes ``sizes[g]``: sqrt(sum_g n_g s_g(t)^2 / sum_g n_g)."""
    s = torch.as_tensor(spreads, dtype=torch.float64)
    n = torch.as_tensor(sizes, dtype=torch.float64)
    if s.dim() != 2 or s.shape[0] != n.numel() or (n <= 0).any():
        raise ValueError(f"need one spread series per group and a positive size per group, got spreads of shape "
                         f"{tuple(s.shape)} and {n.numel()} sizes")
    return ((n[:, None] * s.square()).sum(0) / n.sum()).sqrt().tolist()


def salu_geometry(model: torch.nn.Module) -> list[dict]:
    """One record per SALU / SWALU / GALU module in ``model`` (in module order): its name, kind, and per-channel
    amplitude sqrt(a/b) and width 1/sqrt(ab) summarised by geometric mean, min and max."""
    from ..nn import SaluFamily

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, SaluFamily):
            amp, wid = m.amplitude.double().flatten(), m.width.double().flatten()
            rows.append({"name": name, "kind": type(m).__name__, "channels": amp.numel(),
                         "amplitude_gmean": float(amp.log().mean().exp()), "amplitude_min": float(amp.min()),
                         "amplitude_max": float(amp.max()), "width_gmean": float(wid.log().mean().exp()),
                         "width_min": float(wid.min()), "width_max": float(wid.max()),
                         "a_gmean": float(m.a.double().log().mean().exp()),
                         "b_gmean": float(m.b.double().log().mean().exp())})
    return rows

