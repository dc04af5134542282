"""Plotting (matplotlib only, Agg backend): every figure is drawn from saved JSON, never during capture."""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curves"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: dict[str, list[dict]], out: Path, title: str = "") -> Path:
    """Training / test / EMA curves of one or more runs (``{label: metrics rows}``) on one figure."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, rows) in enumerate(runs.items()):
        ep = [r["epoch"] for r in rows]
        c = f"C{i % 10}"
        axes[0].plot(ep, [r["train_loss"] for r in rows], color=c, label=f"{label} train")
        axes[0].plot(ep, [r["test_loss"] for r in rows], color=c, ls="--", label=f"{label} test")
        axes[1].plot(ep, [100 * r["test_acc"] for r in rows], color=c, label=f"{label} raw")
        if rows and rows[0].get("ema_test_acc") is not None:
            axes[1].plot(ep, [100 * r["ema_test_acc"] for r in rows], color=c, ls=":", label=f"{label} EMA")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[1].set(xlabel="epoch", ylabel="test accuracy (%)", title="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
