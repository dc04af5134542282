"""How much a per-step pinned SALU model's test accuracy depends on the batch its last pin was taken on.

    python scripts/eval_pin.py [--data-path PATH] [--batches 4,16,32] [--singles 8] [--json FILE] [--plot PNG] RUN...
    python scripts/eval_pin.py --replot --json FILE --plot PNG LABEL...     # redraw from the JSON lines ("-": names)

RUN is the directory of a run trained with ``--salu-recalibrate K --salu-recalibrate-every 1``, or of a
BatchNorm model (for comparison). Its last checkpoint (raw weights) is evaluated on the run's own test images
(its subsets, its normalisation) as saved: pinned on the last step's batch (at ``--salu-recalibrate-rate`` 1 and
the extra-forward measure; otherwise on a running mean square, and with ``--salu-eval-pin N`` on an average:
each row records the run's rate, measure and eval pin), BatchNorm on its running statistics (an exponential
average over batches); then pinned again in two ways, each from the saved weights:

- on each one of the first ``--singles`` training batches of the run's last epoch (the seeded, augmented batches
  the run drew), one at a time: the spread that the choice of the last batch alone puts on the figure;
- on the average of the first N of those batches, for each N in ``--batches`` (``pin_to_average``, what
  ``--salu-eval-pin N`` does before every evaluation), as BatchNorm evaluates with running statistics.

For BatchNorm "pinned" means its running statistics recomputed in training mode, without gradient, with momentum
1 / (j + 1) for batch j (one batch: that batch's statistics; N: their plain average).

It prints one line per run and, with ``--json``, writes them as JSON lines (docs/RESULTS.md "The last batch's
pin"). ``--data-path`` replaces the data path the run recorded (relative paths are the run's working folder's).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from salunet.analysis.plots import plot_eval_pins
from salunet.train import distributed as D
from salunet.train.checkpoint import list_checkpoints
from salunet.train.evaluate import evaluate, model_from_checkpoint
from salunet.train.recalibrate import pin_to_average, salu_sites
from salunet.train.resume import checkpoint_config
from salunet.train.sources import MemorySource, load_source


def pin_spread(run: str | Path, batches: list[int], singles: int, data_path: str | None = None) -> dict:
    """The accuracies described in the module docstring, for one run directory."""
    run = Path(run)
    ckpts = list_checkpoints(run)
    if not ckpts:
        raise FileNotFoundError(f"{run}: no checkpoints; pass the directory of a finished run")
    model, meta, _ = model_from_checkpoint(ckpts[-1])
    cfg = checkpoint_config(ckpts[-1], meta, {"data_path": data_path} if data_path else None)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms and salu_sites(model):
        raise ValueError(f"{run}: has both BatchNorm and SALU layers; this measures one kind of pin at a time")
    if not norms and not (cfg.salu_recalibrate > 0 and cfg.salu_recalibrate_every == 1):
        raise ValueError(f"{run}: trained without a pin every step (--salu-recalibrate K --salu-recalibrate-every 1)"
                         " and without BatchNorm; this measures per-step pinned runs (or BatchNorm ones) only")
    source = load_source(cfg, D.DistInfo(device=torch.device("cpu")))
    if not isinstance(source, MemorySource):
        raise ValueError(f"{run}: {cfg.data} is read from folders; this script rebuilds in-memory data sets only")
    source.data.mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)  # normalised exactly as in training
    source.data.std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    need = max([singles, *batches])
    last_epoch = [b[0] for b in itertools.islice(source.train_batches(meta["epoch"] - 1), need)]
    if len(last_epoch) < need:
        raise ValueError(f"{run}: an epoch has {len(last_epoch)} batches; lower --batches / --singles to at most that")

    def acc() -> float:
        return evaluate(model, source.eval_batches())["acc"]

    def pin(xs: list[torch.Tensor]) -> None:
        model.load_state_dict(saved)
        if norms:
            _batchnorm_average(model, norms, xs)
        else:
            pin_to_average(model, xs, cfg.salu_recalibrate)  # (one batch: recalibrate_salu's pin)

    out = {"run": str(run), "epoch": meta["epoch"], "kind": "batchnorm" if norms else "salu",
           "target": cfg.salu_recalibrate, "rate": cfg.salu_recalibrate_rate,
           "measure": cfg.salu_recalibrate_measure, "eval_pin": cfg.salu_eval_pin, "as_saved": acc()}
    single = []
    for b in last_epoch[:singles]:
        pin([b])
        single.append(acc())
    out["single_batches"] = single
    for n in batches:
        pin(last_epoch[:n])
        out[f"average_{n}"] = acc()
    return out


@torch.no_grad()
def _batchnorm_average(model: nn.Module, norms: list[nn.Module], xs: list[torch.Tensor]) -> None:
    """Every BatchNorm's running statistics set to the plain average of those of ``xs`` (training-mode forwards,
    momentum 1 / (j + 1) for batch j); the model is left in eval mode with its momenta as they were."""
    momenta = [m.momentum for m in norms]
    model.train()
    try:
        for j, x in enumerate(xs):
            for m in norms:
                m.momentum = 1.0 / (j + 1)
            model(x)
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data-path", default=None, help="the data set file, if not where the run recorded it")
    ap.add_argument("--batches", default="4,16,32", help="comma-separated batch counts of the average pins")
    ap.add_argument("--singles", type=int, default=8, help="how many single batches to pin on, one at a time")
    ap.add_argument("--json", default=None, help="write the results as JSON lines to this file")
    ap.add_argument("--plot", default=None, help="draw them as a PNG (one column per run)")
    ap.add_argument("--replot", action="store_true", help="redraw --plot from the --json file, measuring nothing")
    args = ap.parse_args(argv)
    try:
        batches = [int(v) for v in args.batches.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--batches must be comma-separated whole numbers, got {args.batches!r}")
    if any(n < 1 for n in batches) or args.singles < 0:
        ap.error("--batches must be >= 1 each and --singles >= 0")
    if args.replot:
        if not (args.json and args.plot):
            ap.error("--replot redraws --plot from --json: pass both")
        try:
            rows = [json.loads(line) for line in Path(args.json).read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as exc:
            print(f"eval_pin: cannot read {args.json} ({exc}); pass the JSON lines file an earlier run wrote",
                  file=sys.stderr)
            return 2
        labels = None if args.runs == ["-"] else args.runs
        if not rows or (labels is not None and len(labels) != len(rows)):
            print(f"eval_pin: {args.json} holds {len(rows)} rows and {len(args.runs)} labels were given; pass one "
                  "label per row, or - for the run names", file=sys.stderr)
            return 2
        plot_eval_pins(rows, Path(args.plot), labels=labels)
        return 0
    torch.manual_seed(0)
    rows = []
    for run in args.runs:
        try:
            r = pin_spread(run, batches, args.singles, args.data_path)
        except (ValueError, FileNotFoundError) as exc:
            print(f"eval_pin: {exc}", file=sys.stderr)
            return 2
        rows.append(r)
        s = r["single_batches"]
        spread = (f"  single batches {100 * statistics.mean(s):.2f} ({100 * min(s):.2f}-{100 * max(s):.2f})"
                  if s else "")
        avg = "  ".join(f"average of {n}: {100 * r[f'average_{n}']:.2f}" for n in batches)
        print(f"{run}: as saved {100 * r['as_saved']:.2f}{spread}  {avg}", flush=True)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.plot:
        plot_eval_pins(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
