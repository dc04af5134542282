"""The weight-decay sweep of docs/RESULTS.md "The end gap, repeated over seeds" (and the sections after it): final test accuracy against
weight decay, mean +- std over seeds, one line per model family, from the runs' ``summary.json`` files.

    python scripts/wd_sweep.py docs/results/midrun docs/results/wd_sweep

writes ``<out>.json`` (every cell: weight decay, seeds, mean, std, per-seed accuracies, final training loss) and
``<out>.png``. Runs are found by name: ``<prefix>-s<seed>`` is the protocol's weight decay (5e-4) and
``<prefix>wd<wd>-s<seed>`` the others, as the commands in RESULTS name them.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

from salunet.analysis import plots

SERIES = {  # label -> run-name prefix
    "resnet18_bn (BN + ReLU)": "resnet18_bn",
    "salunet_c18_v2 (centred kernels)": "v2",
    "salunet_c18_v2 + scaled WS": "v2scaled",
    "salunet_c18_v2 + scaled WS, gain fixed": "v2fixed",
    "salunet_c18_v2 + SALU recalibrated, K = 0.25": "v2rc0.25",
    "salunet_c18_v2 + SALU recalibrated, K = 0.5": "v2rc0.5",
    "salunet_c18_v2 + SALU recalibrated, K = 1": "v2rc1",
}
PROTOCOL_WD = 5e-4


def collect(root: Path, prefix: str) -> list[dict]:
    cells: dict[float, list[tuple[int, dict]]] = {}
    pattern = re.compile(rf"{re.escape(prefix)}(?:wd([0-9.e-]+))?-s(\d+)")
    for d in sorted(root.iterdir()):
        m = pattern.fullmatch(d.name)
        if not m or not (d / "summary.json").is_file():
            continue
        wd = float(m.group(1)) if m.group(1) else PROTOCOL_WD
        cells.setdefault(wd, []).append((int(m.group(2)), json.loads((d / "summary.json").read_text())["final"]))
    rows = []
    for wd, runs in sorted(cells.items()):
        runs.sort(key=lambda r: r[0])
        acc = [r["test_acc"] for _, r in runs]
        rows.append({"weight_decay": wd, "seeds": [s for s, _ in runs], "per_seed": acc,
                     "mean": statistics.fmean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else None,
                     "train_loss": statistics.fmean(r["train_loss"] for _, r in runs)})
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    root, out = Path(argv[0]), Path(argv[1])
    if not root.is_dir():
        print(f"{root}: no such directory of runs", file=sys.stderr)
        return 2
    summary = {label: rows for label, prefix in SERIES.items() if (rows := collect(root, prefix))}
    result = {"summary": summary, "x_key": "weight_decay", "x_label": "weight decay",
              "title": "12 epochs on 10,240 CIFAR-10 images, width 16", "chance": 0.1}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    plots.plot_batch_sweep(result, out.with_suffix(".png"))
    for label, rows in summary.items():
        print(label)
        for r in rows:
            std = f"{100 * r['std']:.1f}" if r["std"] is not None else "-"
            print(f"  wd {r['weight_decay']:g}: {100 * r['mean']:.1f} +- {std} ({len(r['seeds'])} seeds)  "
                  f"train loss {r['train_loss']:.3f}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
