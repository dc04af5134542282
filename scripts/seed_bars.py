"""Final test accuracy of run cells over seeds, as a table and as bars (mean ± std, every seed's run a dot).

    python scripts/seed_bars.py [--plot PNG] [--json FILE] [--title T] CELL...

CELL is ``[PANEL::]LABEL=GLOB``: the run folders matching GLOB (each with the ``metrics.jsonl`` that
``salunet train`` writes; its last row is the run's end) make one cell, LABEL names it, and cells with the same
PANEL share one panel of the figure (in the order given). It prints one markdown row per cell (mean ± std, each
run's accuracy in folder order, mean final training loss), and writes the same numbers as one JSON object per cell
with ``--json`` and the figure with ``--plot`` (docs/RESULTS.md "The whole recipe at small batches"). A GLOB that
matches no run folder, or a folder without metrics, stops it with exit status 2.
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path


def read_cell(pattern: str) -> dict:
    """The runs matching ``pattern``: their final test accuracies (%) and training losses, in folder order."""
    runs = sorted(p for p in glob.glob(pattern) if Path(p).is_dir())
    if not runs:
        raise FileNotFoundError(f"{pattern}: no run folder matches; check the glob (quote it in the shell)")
    acc, loss = [], []
    for run in runs:
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; pass folders of runs that finished at least one epoch")
        last = json.loads(path.read_text().strip().splitlines()[-1])
        acc.append(100 * last["test_acc"])
        loss.append(last["train_loss"])
    return {"runs": runs, "acc": acc, "train_loss": loss, "mean": statistics.mean(acc),
            "std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "mean_train_loss": statistics.mean(loss)}


def parse_cell(spec: str) -> tuple[str, str, str]:
    """``[PANEL::]LABEL=GLOB`` -> (panel, label, glob)."""
    head, sep, pattern = spec.partition("=")
    if not sep or not head or not pattern:
        raise ValueError(f"cell {spec!r}: write it as [PANEL::]LABEL=GLOB")
    panel, _, label = head.rpartition("::")
    return panel, label, pattern


def plot(cells: list[dict], path: str, title: str | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(c["panel"] for c in cells))
    # a label keeps its colour in every panel
    colors = {label: f"C{k}" for k, label in enumerate(dict.fromkeys(c["label"] for c in cells))}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [c for c in cells if c["panel"] == panel]
        for i, c in enumerate(mine):
            ax.bar(i, c["mean"], yerr=c["std"], color=colors[c["label"]], alpha=0.5, capsize=4)
            ax.plot([i] * len(c["acc"]), c["acc"], "k.", ms=5)
        ax.set_xticks(range(len(mine)), [c["label"] for c in mine], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(panel, fontsize=10)
        low = min(min(c["acc"]) for c in mine)
        ax.set_ylim(max(0.0, low - 10), min(100.0, max(max(c["acc"]) for c in mine) + 5))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cells", nargs="+", metavar="CELL", help="[PANEL::]LABEL=GLOB of run folders")
    ap.add_argument("--plot", help="write the figure here (PNG)")
    ap.add_argument("--json", help="write one JSON object per cell here")
    ap.add_argument("--title", help="the figure's title")
    args = ap.parse_args(argv)
    try:
        cells = []
        for spec in args.cells:
            panel, label, pattern = parse_cell(spec)
            cells.append({"panel": panel, "label": label, "glob": pattern, **read_cell(pattern)})
    except (ValueError, FileNotFoundError) as exc:
        print(f"seed_bars: error: {exc}", file=sys.stderr)
        return 2
    print("| panel | cell | test acc. | per run | train loss |\n|---|---|---|---|---|")
    for c in cells:
        print(f"| {c['panel']} | {c['label']} | {c['mean']:.1f} ± {c['std']:.1f} | "
              f"{', '.join(f'{a:.1f}' for a in c['acc'])} | {c['mean_train_loss']:.3f} |")
    if args.json:
        Path(args.json).write_text("".join(json.dumps(c) + "\n" for c in cells))
    if args.plot:
        plot(cells, args.plot, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
