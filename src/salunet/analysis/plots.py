"""Every figure of the project (matplotlib only, Agg backend): training curves and the analyses. Each function
takes the JSON-ready rows / result dict that a run or an experiment wrote and a path; nothing here computes
statistics, so figures can be redrawn from saved JSON."""
from __future__ import annotations

import math
from pathlib import Path

__all__ = ["plot_curves", "plot_plasticity", "plot_batch_sweep", "plot_grid_bars", "plot_geometry", "plot_representation",
           "plot_variance", "plot_signal", "plot_dynamics", "plot_eval_pins", "draw_run_curves"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def _color(i: int) -> str:
    """The i-th series' colour; the palette repeats, so any number of series can be drawn."""
    return _COLORS[i % len(_COLORS)]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_curves(runs: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Figure 5 and every run's ``curves.png``: train / test loss and raw / EMA test accuracy per epoch of one
    or more runs (``{label: metrics.jsonl rows}``); rows with ``test_acc_std`` (seed means) get a +-1 std band."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, rows) in enumerate(runs.items()):
        ep = [r["epoch"] for r in rows]
        c = _color(i)
        axes[0].plot(ep, [r["train_loss"] for r in rows], color=c, label=f"{label} train")
        axes[0].plot(ep, [r["test_loss"] for r in rows], color=c, ls="--", label=f"{label} test")
        axes[1].plot(ep, [100 * r["test_acc"] for r in rows], color=c, label=f"{label} raw")
        if rows and rows[0].get("test_acc_std") is not None:  # several seeds averaged: +-1 std band
            lo = [100 * (r["test_acc"] - r["test_acc_std"]) for r in rows]
            hi = [100 * (r["test_acc"] + r["test_acc_std"]) for r in rows]
            axes[1].fill_between(ep, lo, hi, color=c, alpha=0.15, lw=0)
        if rows and rows[0].get("ema_test_acc") is not None:
            axes[1].plot(ep, [100 * r["ema_test_acc"] for r in rows], color=c, ls=":", label=f"{label} EMA")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[1].set(xlabel="epoch", ylabel="test accuracy (%)", title="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_plasticity(result: dict, path: Path) -> Path:
    """Figure 1: PReLU slopes per epoch (10th-90th percentile band and mean) for each variant, and their
    spread per epoch: within layers (solid; around each layer's own mean) and pooled over layers (dashed)."""
    plt = _plt()
    variants = list(result["variants"])
    fig, axes = plt.subplots(1, len(variants) + 1, figsize=(4 * (len(variants) + 1), 3.4))
    for ax, (i, v) in zip(axes, enumerate(variants)):
        p = result["variants"][v]["pooled"]
        ep = list(range(len(p["mean"])))
        ax.fill_between(ep, p["p10"], p["p90"], color=_color(i), alpha=0.25, label="10-90th pct")
        ax.plot(ep, p["mean"], color=_color(i), label="mean")
        ax.set_title(f"{v}: PReLU slopes")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        spread_ax = axes[-1]
        within = result["variants"][v].get("within_spread")
        if within:
            spread_ax.plot(ep, within, color=_color(i), label=f"{v}: within layers")
        spread_ax.plot(ep, p["spread"], color=_color(i), linestyle="--" if within else "-",
                       label=f"{v}: pooled over layers" if within else v)
    axes[-1].set_title("spread of slopes (std over units)")
    axes[-1].set_xlabel("epoch")
    axes[-1].legend(fontsize=8)
    return _save(fig, path)


def plot_batch_sweep(result: dict, path: Path) -> Path:
    """Figure 10, and any sweep of one setting: final accuracy vs the swept value (mean +- std over seeds), one
    line per model; diverged runs are drawn as crosses at chance level. The x values are ``result["x_key"]``
    of the summary rows (default ``batch_size``), on a log2 axis labelled ``result["x_label"]``."""
    plt = _plt()
    key = result.get("x_key", "batch_size")
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = set()
    for i, (model, rows) in enumerate(result["summary"].items()):
        bs = [r[key] for r in rows]
        xs.update(bs)
        mean = [r["mean"] if r["mean"] is not None else math.nan for r in rows]
        std = [r["std"] or 0.0 for r in rows]
        ax.errorbar(bs, [100 * m for m in mean], yerr=[100 * s for s in std], marker="o", capsize=3,
                    color=_color(i), label=model)
        div = [r[key] for r in rows if r.get("diverged")]
        if div:
            ax.scatter(div, [100 * result["chance"]] * len(div), marker="x", color=_color(i), s=60,
                       label=f"{model} diverged (some seeds)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(xs))
    ax.set_xticklabels([f"{x:g}" for x in sorted(xs)], fontsize=8)
    ax.set_xlabel(result.get("x_label", "batch size"))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(result.get("title", "batch-size resilience"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_grid_bars(rows: list[dict], path: Path, *, title: str, key: str = "label") -> Path:
    """Bar chart of mean +- std accuracy per grid cell (ablation, init study)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    labels = [r[key] for r in rows]
    means = [100 * (r["mean"] if r["mean"] is not None else 0.0) for r in rows]
    stds = [100 * (r["std"] or 0.0) for r in rows]
    ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color=[_color(i) for i in range(len(rows))])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_eval_pins(rows: list[dict], path: Path, labels: list[str] | None = None) -> Path:
    """scripts/eval_pin.py: per run, the test accuracy pinned on each single batch (dots), as saved (a cross) and
    on the average of N batches (a bar per N, the largest N darkest)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows) + 2), 4))
    averages = sorted({int(k.split("_")[1]) for r in rows for k in r if k.startswith("average_")})
    for i, r in enumerate(rows):
        s = r["single_batches"]
        ax.scatter([i] * len(s), [100 * v for v in s], s=14, color="#7f7f7f", alpha=0.7,
                   label="one batch" if i == 0 else None)
        ax.scatter([i], [100 * r["as_saved"]], marker="x", s=60, color="#d62728", zorder=3,
                   label="as saved" if i == 0 else None)
        for j, n in enumerate(averages):
            if f"average_{n}" in r:
                shade = 0.35 + 0.65 * (j + 1) / len(averages)
                ax.hlines(100 * r[f"average_{n}"], i - 0.3, i + 0.3, colors=[(0.12, 0.47, 0.71, shade)], lw=2,
                          label=f"average of {n}" if i == 0 else None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels or [Path(r["run"]).name for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("pinned on one batch (dots), as saved (x), on an average of N (bars)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save_with_legend(fig, ax, path)


def plot_geometry(result: dict, path: Path) -> Path:
    """Figures 6-7: per-layer saturation amplitude sqrt(a/b) and width 1/sqrt(ab) (geometric mean over
    channels, log scale), coloured by stage, downsampling layers marked."""
    plt = _plt()
    ckpts = result["checkpoints"]
    fig, axes = plt.subplots(len(ckpts), 2, figsize=(11, 3.4 * len(ckpts)), squeeze=False)
    for row, ck in zip(axes, ckpts):
        layers = ck["layers"]
        stages = sorted({l["stage"] for l in layers}, key=[l["stage"] for l in layers].index)
        for ax, key, label in ((row[0], "amplitude_gmean", "amplitude sqrt(a/b)"),
                               (row[1], "width_gmean", "width 1/sqrt(ab)")):
            for kind, marker in (("SALU", "o"), ("SWALU", "^"), ("GALU", "s")):
                for si, st in enumerate(stages):
                    pts = [(i, l[key]) for i, l in enumerate(layers) if l["stage"] == st and l["kind"] == kind]
                    if pts:
                        ax.scatter(*zip(*pts), color=_color(si), marker=marker, s=18,
                                   label=f"{st} {kind}")
            down = [(i, l[key]) for i, l in enumerate(layers) if l["downsample"]]
            if down:
                ax.scatter(*zip(*down), facecolors="none", edgecolors="k", s=80, label="downsampling")
            ax.set_yscale("log")
            ax.set_xlabel("layer (module order)")
            ax.set_title(f"{ck['label']}: {label}")
        row[1].legend(fontsize=6, ncol=2, loc="best")
    return _save(fig, path)


def plot_representation(result: dict, path: Path) -> Path:
    """Figures 8-9: effective rank and isotropy per stage, and variance (log), skewness and excess kurtosis
    (per channel, averaged over channels) per stage, one line per checkpoint."""
    plt = _plt()
    # shape per channel (each unit over the images, then averaged): pooled moments would mostly measure how far
    # apart the channels' means and scales are
    keys = [("effective_rank", "effective rank", False), ("isotropy", "isotropy index", False),
            ("variance", "variance", True), ("channel_skewness_mean", "skewness (per channel)", False),
            ("channel_excess_kurtosis_mean", "excess kurtosis (per channel)", False)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    for i, ck in enumerate(result["checkpoints"]):
        stages = ck.get("stage_order") or list(ck["stages"])  # saved JSON has its keys sorted
        for ax, (k, label, log) in zip(axes, keys):
            ax.plot(range(len(stages)), [ck["stages"][s][k] for s in stages], marker="o", color=_color(i),
                    label=ck["label"])
            ax.set_xticks(range(len(stages)))
            ax.set_xticklabels(stages, rotation=30, fontsize=8)
            ax.set_title(label)
            if log:
                ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_variance(result: dict, path: Path) -> Path:
    """Figure 11: activation variance vs depth through stacked (linear -> layer) blocks, log scale."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, var) in enumerate(result["curves"].items()):
        ax.plot(range(len(var)), var, color=_color(i), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("activation variance")
    ax.set_title(result.get("title", "variance propagation"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_signal(result: dict, path: Path) -> Path:
    """Signal health per stage, one line per model (solid: at init, dashed: trained checkpoints): channel
    mean^2/variance at norm inputs, within-channel std (dotted: pooled std), stuck gate channels, SALU inputs past
    the knee. One legend for the figure (a BN model has no SALU, so it is absent from the last panel)."""
    plt = _plt()
    order = result["stage_order"]
    panels = [("norm", "mean2_var", "norm inputs: channel mean^2 / variance"),
              ("norm", "within_std", "norm inputs: within-channel std (dotted: pooled)"),
              ("gate", "stuck", "gate inputs: stuck channels (fraction)"),
              ("norm", "past_knee", "SALU inputs past the knee (fraction)")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    markers = "osD^v<>p*h"
    for i, m in enumerate(result["models"]):
        style = dict(color=_color(i), marker=markers[(i // len(_COLORS)) % len(markers)],
                     ls="-" if m["source"] == "init" else "--", label=m["label"])
        for ax, (role, key, title) in zip(axes, panels):
            pts = [(j, m["stages"][st][role][key]) for j, st in enumerate(order)
                   if role in m["stages"].get(st, {}) and key in m["stages"][st][role]]
            if pts:
                ax.plot(*zip(*pts), **style)
            if key == "within_std":
                pooled = [(j, m["stages"][st][role]["pooled_std"]) for j, st in enumerate(order)
                          if role in m["stages"].get(st, {})]
                if pooled:
                    ax.plot(*zip(*pooled), ls=":", color=_color(i))
            ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=0.1)
    axes[1].set_yscale("log")
    return _save_with_legend(fig, axes[0], path)


def _save_with_legend(fig, ax, path: Path) -> Path:
    """Save a row of stage panels with one legend below them, from ``ax``'s lines (room left for its rows)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 6), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


_DRIFT_KINDS = {"SALU.a": "-", "SALU.b": ":", "BatchNorm2d.weight": "-", "WS.gain": "-."}


def plot_dynamics(result: dict, path: Path) -> Path:
    """Training dynamics per stage, one colour per model (solid: at init, dashed: trained checkpoints): kernel
    norm, relative step |g|/|W| per unit lr, radial share of the gradient, and the drift of the per-channel gains
    from init (line style by gain: SALU a solid, SALU b dotted, BatchNorm weight solid, WS gain dash-dot)."""
    plt = _plt()
    order = result["stage_order"]
    panels = [("kernel_norm", "kernel norm |W| (per output channel)"),
              ("grad_ratio", "relative step |g|/|W| per unit lr"),
              ("radial", "radial share of the gradient (0: scale-invariant)")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for i, m in enumerate(result["models"]):
        ls = "-" if m["source"] == "init" else "--"
        for ax, (key, title) in zip(axes, panels):
            pts = [(j, m["stages"][st]["kernels"][key]) for j, st in enumerate(order)
                   if m["stages"].get(st, {}).get("kernels")]
            if pts:
                ax.plot(*zip(*pts), color=_color(i), marker="o", ls=ls, label=m["label"])
            ax.set_title(title, fontsize=9)
        for kind, kls in _DRIFT_KINDS.items():
            pts = [(j, m["stages"][st]["gains"][kind]["drift"]) for j, st in enumerate(order)
                   if kind in m["stages"].get(st, {}).get("gains", {})]
            if pts and m["source"] != "init":  # at init every drift is 0
                axes[3].plot(*zip(*pts), color=_color(i), marker="s", ls=kls, label=f"{m['label']}: {kind}")
    axes[3].set_title("per-channel gains: median |log(v / v_init)|", fontsize=9)
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, fontsize=8)
        ax.grid(alpha=0.3)
    if axes[3].get_legend_handles_labels()[0]:
        axes[3].legend(fontsize=6)
    return _save_with_legend(fig, axes[0], path)


def draw_run_curves(run_dir: Path, rows: list[dict], cfg) -> Path:
    """A run's ``curves.png`` from its metrics rows: the hook ``salunet train`` and the experiments pass to
    :func:`salunet.train.train` as ``on_finish`` (training itself never imports plotting)."""
    from ..train.rundir import RunDir

    return plot_curves({cfg.model: rows}, RunDir(run_dir).curves, title=f"{cfg.model} on {cfg.data}")
