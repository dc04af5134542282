"""``salunet experiment NAME``: each of the paper's analyses as one command, plus the controlled ablation and the
init study that the paper never ran (arXiv 2606.02927; docs/SPEC.md section 5).

Every experiment writes into its own run directory: ``results.json`` (everything measured), ``runs.jsonl`` (one
line per training run it made, for experiments that train), PNG figures, and the training runs themselves in
``runs/``. Defaults are CPU scale (each finishes in about 15 minutes or less on 2 cores); ``--full`` switches to the
paper's scale (GPU hours). Accuracies are reported as mean +- std over seeds; every training run of a grid uses
the same seeds, hence the same data order, crops and mixes (``salunet.train``: the order of epoch e is drawn from
a generator seeded with (seed, e)), the same optimiser and augmentation, so a grid changes only what it names.

**[decided]** choices where the paper is silent, kept configurable:
- learning rate across batch sizes (``batch-sweep``): square-root scaling from a reference batch of 128,
  lr(B) = base_lr * sqrt(B / 128) (Krizhevsky 2014; Hoffer et al. 2017), with ``warmup_epochs`` of warm-up at
  every size; ``--lr-rule linear`` gives Goyal et al.'s linear rule instead. ``--global-batch N`` sweeps the
  per-device batch instead: every run takes optimizer steps of N images at ``base_lr``, accumulated over N / size
  micro-batches, which is what DDP over N / size ranks of ``size`` images computes without SyncBatchNorm (each
  BatchNorm normalises with its micro-batch's statistics, each SALU projection uses its own; a per-step SALU pin on
  fixed images is taken once per step, as ranks all-reducing the reference images' sums would).
- the plasticity CNN (appendix A names only Conv(32)-Conv(64)-FC(128)-FC(10) with PReLU): 3x3 convs with 2x2
  max-pooling, per-channel PReLU (one slope per unit: 32 + 64 + 128 slopes), the norm before each PReLU.
- representation statistics use the test images: each stage's output is global-average-pooled to one vector per
  image for effective rank and isotropy; moments pool every element of the stage output (and per channel).
"""
from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import plots
from . import stats as S
from .capture import capture_batches

__all__ = ["EXPERIMENTS", "run_experiment", "ExperimentArgs"]


# ---- shared machinery ---------------------------------------------------------------------------------------

@dataclass
class ExperimentArgs:
    """Options every experiment has."""

    out: str = "runs/experiments"
    name: str | None = None  # run directory name (default: <experiment>-<time>)
    device: str = "auto"
    full: bool = False  # the paper's scale instead of the CPU defaults


@dataclass
class TrainingArgs(ExperimentArgs):
    """Options of the experiments that train."""

    data: str = "cifar10"
    data_path: str | None = None  # an .npz, the official archive or its folder
    seeds: int = 2
    progress: bool = False  # progress bars of the inner training runs (a line per epoch is always printed)


FULL: dict[str, dict] = {}  # experiment name -> overrides applied by --full
EXPERIMENTS: dict[str, tuple[type, Callable]] = {}


def experiment(name: str, args_cls: type, full: dict | None = None):
    """Register ``fn(args, run_dir) -> dict`` as experiment ``name`` with its args dataclass."""
    def deco(fn):
        EXPERIMENTS[name] = (args_cls, fn)
        FULL[name] = full or {}
        return fn
    return deco


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std over the runs that finished (None/NaN are diverged runs, counted separately by
    callers); the std is None with fewer than two finished runs, never a misleading 0."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _fmt(mean, std, n_ok: int | None = None, n: int | None = None) -> str:
    if mean is None:
        return "diverged" if n is None else f"diverged ({n}/{n})"
    txt = f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
    if n is not None and n_ok != n:
        txt += f" ({n - n_ok}/{n} diverged)"
    return txt


class _Runs:
    """Runs training jobs into ``run_dir/runs/<name>`` and logs one JSON line per job to ``runs.jsonl``."""

    def __init__(self, run_dir: Path, base: dict, total: int, label: str) -> None:
        self.dir, self.base, self.total, self.done, self.label = run_dir, base, total, 0, label
        self.log = run_dir / "runs.jsonl"

    def run(self, name: str, **over) -> dict:
        from ..train import TrainingDiverged, train
        from ..train.checkpoint import append_jsonl
        from ..train.rundir import RunDir

        self.done += 1
        cfg = {**self.base, **over, "out": str(self.dir / "runs"), "name": name}
        print(f"[{self.label} {self.done}/{self.total}] {name}", flush=True)
        t0 = time.time()
        row = {"run": name, "config": {k: v for k, v in cfg.items() if k not in ("out", "name")}}
        try:
            summary = train(cfg, on_finish=plots.draw_run_curves)
            final = summary["final"]
            row.update(diverged=False, test_acc=final.get("test_acc"), ema_test_acc=final.get("ema_test_acc"),
                       train_loss=final.get("train_loss"), epochs=summary["epochs"], run_dir=summary["run_dir"],
                       metrics=RunDir(summary["run_dir"]).read_metrics())
        except TrainingDiverged as exc:
            row.update(diverged=True, test_acc=None, ema_test_acc=None, error=str(exc),
                       run_dir=str(self.dir / "runs" / name))
        row["seconds"] = round(time.time() - t0, 1)
        append_jsonl(self.log, {k: v for k, v in row.items() if k != "metrics"})
        return row


def _grid(runs: _Runs, cells: list[tuple[str, float, dict]], seeds: int) -> tuple[list[dict], list[dict]]:
    """Train every (name, lr, config overrides) cell with seeds 0..seeds-1; returns the table (one row per cell:
    mean, std, per-seed accuracies, diverged runs counted) and the runs (one row per training run)."""
    table, rows = [], []
    for name, lr, over in cells:
        accs = []
        for seed in range(seeds):
            r = runs.run(f"{name}-lr{lr}-s{seed}", lr=lr, seed=seed, **over)
            rows.append({"config": name, "lr": lr, "seed": seed, "test_acc": r["test_acc"], "diverged": r["diverged"],
                         "run_dir": r["run_dir"], "seconds": r["seconds"]})
            accs.append(r["test_acc"])
        m, s = _mean_std(accs)
        n_div = sum(a is None for a in accs)
        table.append({"label": f"{name} @ lr {lr}", "config": name, "lr": lr, "overrides": over, "mean": m, "std": s,
                      "per_seed": accs, "diverged": n_div, "seeds": len(accs), "finished": len(accs) - n_div})
    return table, rows


def _train_base(args, **extra) -> dict:
    """Config keys shared by every training run of an experiment. Everything that shapes the result is set
    here or by the experiment, never inherited from TrainConfig's defaults (which suit the embedded digits)."""
    base = {"data": args.data, "data_path": args.data_path, "device": args.device, "progress": args.progress,
            "keep_checkpoints": 1, "optimizer": "sgd", "momentum": 0.9, "ema_decay": 0.0, "crop_padding": 4,
            "flip": True, "label_smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0, "min_lr": 0.0, "grad_clip": 0.0,
            "amp": "none", "accum_steps": 1}
    base.update(extra)
    return base


def _write(run_dir: Path, result: dict) -> Path:
    from ..train.checkpoint import write_json_atomic

    path = run_dir / "results.json"
    write_json_atomic(path, result)
    return path


def _draw(result: dict, plot, data, path: Path, **kw) -> None:
    """Draw figure ``path`` with ``plot(data, path, **kw)`` after saving ``result`` beside it: a plotting error
    then costs the PNG, never the measurements (``run_experiment`` rewrites the file with its metadata at the
    end)."""
    _write(path.parent, result)
    plot(data, path, **kw)


# ---- plasticity (figure 1, appendix A) ----------------------------------------------------------------------

@dataclass
class PlasticityArgs(TrainingArgs):
    variants: str = "batchnorm,identity,salu"  # the norm before each PReLU
    width: int = 32  # conv1 channels (appendix A: 32; conv2 and the hidden FC scale with it)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05
    train_subset: int = 10000
    test_subset: int = 2000
    seeds: int = 1


def _prelu_slopes(state: dict) -> dict[str, list[float]]:
    """PReLU slopes of a cnn4 state dict (its activations are ``act1`` .. ``act3``), by layer."""
    found = {k[:-len(".weight")]: v.flatten().tolist() for k, v in state.items()
             if re.fullmatch(r"act\d+\.weight", k)}
    if not found:
        raise ValueError("no PReLU slopes in the checkpoint (keys act<N>.weight); is act_layer 'prelu'?")
    return found


def add_within_layer_spread(variant: dict) -> None:
    """Add the within-layer slope spread (:func:`stats.within_group_spread`) to one variant of a plasticity
    result, per seed and averaged over seeds: the collapse measure, unlike the spread pooled over layers, which
    also counts how far apart the layers' mean slopes are. Uses only the per-layer series already in the result."""
    ok = [p for p in variant["seeds"] if not p["diverged"]]
    for p in ok:
        p["within_spread"] = S.within_group_spread([p["layers"][k]["spread"] for k in p["layers"]],
                                                   [p["layers"][k]["units"] for k in p["layers"]])
    variant["within_spread"] = ([statistics.fmean(x) for x in zip(*(p["within_spread"] for p in ok))]
                                if ok else None)
    variant["final_within_spread_mean"] = _mean_std([p["within_spread"][-1] for p in ok])[0]


@experiment("plasticity", PlasticityArgs, full={"epochs": 100, "train_subset": 0, "test_subset": 0, "seeds": 3})
def plasticity_experiment(args: PlasticityArgs, run_dir: Path) -> dict:
    """Appendix A: the 4-layer PReLU CNN with BN, without BN, and with SALU before each PReLU; every PReLU
    slope after every epoch (read from the per-epoch checkpoints), then spread and drift per variant."""
    from ..train.checkpoint import list_checkpoints, load_checkpoint

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    base = _train_base(args, model="cnn4", width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       train_subset=args.train_subset, test_subset=args.test_subset, warmup_epochs=1,
                       weight_decay=5e-4, keep_checkpoints=args.epochs + 1, crop_padding=4, flip=True)
    runs = _Runs(run_dir, base, len(variants) * args.seeds, "plasticity")
    out: dict = {"experiment": "plasticity", "variants": {}, "args": asdict(args)}
    for v in variants:
        per_seed = []
        for seed in range(args.seeds):
            row = runs.run(f"{v}-s{seed}", norm_layer=v, seed=seed)
            if row["diverged"]:
                per_seed.append({"diverged": True})
                continue
            # slopes at init: PReLU's 0.25 for every unit; then after each epoch
            ckpts = list_checkpoints(Path(row["run_dir"]))
            if len(ckpts) != args.epochs:
                raise RuntimeError(f"{row['run_dir']}: {len(ckpts)} checkpoints for {args.epochs} epochs; the slope "
                                   "series needs one per epoch")
            series = [_prelu_slopes(load_checkpoint(p)[0]["model"]) for p in ckpts]
            init = {k: [0.25] * len(vals) for k, vals in series[0].items()}
            series = [init] + series
            layers = {k: S.plasticity([s[k] for s in series]) for k in init}
            for k in layers:
                layers[k]["units"] = len(init[k])
            values = [[x for k in init for x in s[k]] for s in series]
            per_seed.append({"diverged": False, "layers": layers, "pooled": S.plasticity(values),
                             "test_acc": row["test_acc"], "final_slopes": series[-1], "pooled_values": values})
        ok = [p for p in per_seed if not p["diverged"]]
        mean_acc, std_acc = _mean_std([p["test_acc"] for p in ok])
        # the figure pools every seed's slopes at each epoch (seeds x units)
        pooled_all = S.plasticity([[x for p in ok for x in p["pooled_values"][t]] for t in range(args.epochs + 1)]) \
            if ok else None
        for p in ok:
            del p["pooled_values"]
        out["variants"][v] = {"seeds": per_seed, "pooled": pooled_all,
                              "test_acc_mean": mean_acc, "test_acc_std": std_acc,
                              "final_spread_mean": _mean_std([p["pooled"]["spread"][-1] for p in ok])[0],
                              "late_drift_mean": _mean_std([statistics.fmean(p["pooled"]["drift"][-3:]) for p in ok])[0]}
        add_within_layer_spread(out["variants"][v])
    if all(out["variants"][v]["pooled"] for v in variants):
        _draw(out, plots.plot_plasticity, out, run_dir / "plasticity.png")
    for v in variants:
        r = out["variants"][v]
        print(f"  {v:10s} acc {_fmt(r['test_acc_mean'], r['test_acc_std'])}%  final slope spread within layers "
              f"{r['final_within_spread_mean']} (pooled {r['final_spread_mean']})  late drift/epoch "
              f"{r['late_drift_mean']}")
    return out


# ---- batch-size resilience (figure 10) ----------------------------------------------------------------------

@dataclass
class BatchSweepArgs(TrainingArgs):
    models: str = "salunet_c18,resnet18_bn"
    width: int = 16
    batch_sizes: str = "1,2,4,8,16,32,64,128,256"
    epochs: int = 2
    base_lr: float = 0.05  # at batch 128
    lr_rule: str = "sqrt"  # sqrt | linear
    global_batch: int = 0  # 0: each size is the optimizer's batch; N: each is the per-device batch of N (see above)
    weight_decay: float = 5e-4
    train_subset: int = 2560
    test_subset: int = 1000


@experiment("batch-sweep", BatchSweepArgs,
            full={"width": 0, "epochs": 200, "train_subset": 0, "test_subset": 0, "seeds": 3, "base_lr": 0.1,
                  "batch_sizes": "1,2,4,8,16,32,64,128,256,512"})
def batch_sweep_experiment(args: BatchSweepArgs, run_dir: Path) -> dict:
    """Final accuracy vs batch size at equal epochs for a SaluNet and its BN twin; with ``global_batch`` N, vs the
    per-device batch at a fixed optimizer batch N (equal steps and learning rate)."""
    if args.lr_rule not in ("sqrt", "linear"):
        raise ValueError(f"lr_rule must be 'sqrt' or 'linear', got {args.lr_rule!r}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"batch_sizes {args.batch_sizes!r}: not a comma-separated list of whole numbers; write e.g. "
                         "1,8,128") from None
    if any(b <= 0 for b in sizes):
        raise ValueError(f"batch sizes must be positive, got {sizes}")
    g = args.global_batch
    if g < 0 or any(g % b for b in sizes if g):
        raise ValueError(f"global_batch {g}: each per-device batch size must divide it (got {sizes}); give sizes "
                         f"that divide {g}, or --global-batch 0 to sweep the optimizer's batch itself")
    base = _train_base(args, width=args.width or None, epochs=args.epochs, train_subset=args.train_subset,
                       test_subset=args.test_subset, warmup_epochs=min(1.0, args.epochs / 2),
                       weight_decay=args.weight_decay, eval_batch_size=500)
    runs = _Runs(run_dir, base, len(models) * len(sizes) * args.seeds, "batch-sweep")
    rows = []
    for model in models:
        for b in sizes:
            if g:  # b images per micro-batch (device), g per optimizer step, one learning rate
                lr, step = args.base_lr, {"batch_size": g, "accum_steps": g // b}
            else:
                lr = args.base_lr * (b / 128 if args.lr_rule == "linear" else math.sqrt(b / 128))
                step = {"batch_size": b}
            for seed in range(args.seeds):
                r = runs.run(f"{model}-{'mb' if g else 'b'}{b}-s{seed}", model=model, lr=lr, seed=seed, **step)
                rows.append({"model": model, "batch_size": b, "seed": seed, "lr": lr,
                             "accum_steps": step.get("accum_steps", 1), "test_acc": r["test_acc"],
                             "diverged": r["diverged"], "seconds": r["seconds"]})
    summary = {}
    for model in models:
        summary[model] = []
        for b in sizes:
            rs = [r for r in rows if r["model"] == model and r["batch_size"] == b]
            m, s = _mean_std([r["test_acc"] for r in rs])
            summary[model].append({"batch_size": b, "mean": m, "std": s, "diverged": sum(r["diverged"] for r in rs),
                                   "seeds": len(rs), "finished": len(rs) - sum(r["diverged"] for r in rs),
                                   "lr": rs[0]["lr"]})
    num_classes = 100 if args.data == "cifar100" else 10
    out = {"experiment": "batch-sweep", "args": asdict(args), "runs": rows, "summary": summary,
           "chance": 1 / num_classes, "title": f"batch-size resilience ({args.data}, {args.epochs} epochs)"}
    if g:
        out.update(x_label=f"per-device batch (optimizer batch {g}, accumulated)",
                   title=f"per-device batch at an optimizer batch of {g} ({args.data}, {args.epochs} epochs)")
    _draw(out, plots.plot_batch_sweep, out, run_dir / "batch_sweep.png")
    for model, srows in summary.items():
        print(f"  {model}: " + "  ".join(f"b{r['batch_size']} {_fmt(r['mean'], r['std'], r['finished'], r['seeds'])}"
                                         for r in srows))
    return out


# ---- the controlled ablation ----------------------------------------------------------------------------

DEFAULT_PAIRS = "salu:swalu,batchnorm:relu,batchnorm:swalu,batchnorm+salu:swalu,identity:swalu,identity:relu"


@dataclass
class AblationArgs(TrainingArgs):
    model: str = "salunet_c18"  # the architecture; only norm/act change
    pairs: str = DEFAULT_PAIRS  # norm:act pairs
    width: int = 16
    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.05
    train_subset: int = 5000
    test_subset: int = 2000
    ema_decay: float = 0.0


@experiment("ablation", AblationArgs,
            full={"width": 0, "epochs": 300, "train_subset": 0, "test_subset": 0, "seeds": 3, "lr": 0.1,
                  "ema_decay": 0.9997})
def ablation_experiment(args: AblationArgs, run_dir: Path) -> dict:
    """Same architecture, seeds, data order, optimiser and augmentation; only the (norm, act) pair changes."""
    pairs = []
    for p in args.pairs.split(","):
        if p.count(":") != 1:
            raise ValueError(f"pairs are norm:act items separated by commas, got {p!r} in {args.pairs!r}")
        pairs.append(tuple(s.strip() for s in p.split(":")))
    base = _train_base(args, model=args.model, width=args.width or None, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, train_subset=args.train_subset,
                       test_subset=args.test_subset, warmup_epochs=1, weight_decay=5e-4, ema_decay=args.ema_decay)
    runs = _Runs(run_dir, base, len(pairs) * args.seeds, "ablation")
    rows, table = [], []
    for norm, act in pairs:
        accs, emas = [], []
        for seed in range(args.seeds):
            r = runs.run(f"{norm}-{act}-s{seed}", norm_layer=norm, act_layer=act, seed=seed)
            rows.append({"norm": norm, "act": act, "seed": seed, "test_acc": r["test_acc"],
                         "ema_test_acc": r["ema_test_acc"], "diverged": r["diverged"], "run_dir": r["run_dir"]})
            accs.append(r["test_acc"])
            emas.append(r["ema_test_acc"])
        m, s = _mean_std(accs)
        em, es = _mean_std(emas)
        n_div = sum(a is None for a in accs)
        table.append({"label": f"{norm} + {act}", "norm": norm, "act": act, "mean": m, "std": s, "ema_mean": em,
                      "ema_std": es, "diverged": n_div, "seeds": len(accs), "finished": len(accs) - n_div})
    out = {"experiment": "ablation", "args": asdict(args), "runs": rows, "table": table}
    _draw(out, plots.plot_grid_bars, table, run_dir / "ablation.png",
          title=f"controlled ablation: {args.model} w{args.width or 'paper'}, {args.epochs} epochs")
    for t in table:
        print(f"  {t['label']:24s} {_fmt(t['mean'], t['std'], t['finished'], t['seeds'])}%")
    return out


# ---- init study -----------------------------------------------------------------------------------------

INIT_GRID = {  # name -> model overrides (InitRules fields); "default" = the registered rules
    "default": {},
    "naive": {"conv": "default", "salu_a0": 1.0, "salu_b0": 1.0, "branch_a0": 1.0, "shortcut_a0": 1.0,
              "block_gate_a0": 1.0, "branch_scaling": "none"},  # docs/SPEC.md's naive reconstruction
    "torch-conv-init": {"conv": "default"},
    "salu-b0=1": {"salu_b0": 1.0},
    "salu-a0=1": {"salu_a0": 1.0},
    "block-gate-a0=1": {"block_gate_a0": 1.0},
    "gate-b0=0.1": {"gate_b0": 0.1},  # SWALU's b0: a narrower gate (A = sqrt(a0/b0) ~ 3 instead of 10)
    "no-branch-scaling": {"branch_scaling": "none"},
}


@dataclass
class InitStudyArgs(TrainingArgs):
    model: str = "salunet_c18"
    width: int = 16
    configs: str = "default,naive,torch-conv-init,salu-b0=1,salu-a0=1,block-gate-a0=1,no-branch-scaling"
    lrs: str = "0.05,0.1"
    epochs: int = 1
    batch_size: int = 128
    train_subset: int = 5000
    test_subset: int = 2000
    seeds: int = 1


@experiment("init-study", InitStudyArgs,
            full={"width": 0, "epochs": 5, "train_subset": 0, "test_subset": 0, "seeds": 3})
def init_study_experiment(args: InitStudyArgs, run_dir: Path) -> dict:
    """First-epochs accuracy of a SaluNet over init choices (each default rule reverted one at a time, and all
    of them: the naive reconstruction of docs/SPEC.md) and learning rates."""
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in INIT_GRID]
    if unknown:
        raise ValueError(f"unknown init config(s) {unknown}; choose from {', '.join(INIT_GRID)}")
    lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    base = _train_base(args, model=args.model, width=args.width or None, epochs=args.epochs,
                       batch_size=args.batch_size, train_subset=args.train_subset, test_subset=args.test_subset,
                       warmup_epochs=0.2, weight_decay=5e-4)
    runs = _Runs(run_dir, base, len(names) * len(lrs) * args.seeds, "init-study")
    table, _ = _grid(runs, [(n, lr, {"model_overrides": INIT_GRID[n]}) for n in names for lr in lrs], args.seeds)
    for t in table:
        t["overrides"] = t["overrides"]["model_overrides"]
    best = max((t for t in table if t["mean"] is not None), key=lambda t: t["mean"], default=None)
    out = {"experiment": "init-study", "args": asdict(args), "table": table, "best": best}
    _draw(out, plots.plot_grid_bars, table, run_dir / "init_study.png",
          title=f"init study: {args.model} w{args.width}, {args.epochs} epoch(s)")
    for t in table:
        print(f"  {t['label']:36s} {_fmt(t['mean'], t['std'], t['finished'], t['seeds'])}%")
    if best:
        print(f"  best: {best['label']}")
    return out


# ---- the normalization-free study (docs/RESULTS.md "Closing the gap") ----------------------------------------

NF_GRID: dict[str, dict] = {  # name -> training-config overrides (model, model_overrides, trainer keys)
    "salunet": {"model": "salunet_c18"},
    "bn": {"model": "resnet18_bn"},
    "ws-scaled": {"model": "salunet_c18", "model_overrides": {"conv_ws": "scaled"}},
    "ws-center": {"model": "salunet_c18", "model_overrides": {"conv_ws": "center"}},
    "bias": {"model": "salunet_c18", "model_overrides": {"conv_bias": True}},
    "skipinit": {"model": "salunet_c18", "model_overrides": {"res_gain": 0.0}},
    "agc": {"model": "salunet_c18", "agc": 0.04},
    "salu-lr0.1": {"model": "salunet_c18", "salu_lr_scale": 0.1},
    "salu-lr3": {"model": "salunet_c18", "salu_lr_scale": 3.0},
    # combinations (docs/RESULTS.md "Closing the gap")
    "ws+bias": {"model": "salunet_c18", "model_overrides": {"conv_ws": "scaled", "conv_bias": True}},
    "ws+agc": {"model": "salunet_c18", "model_overrides": {"conv_ws": "scaled"}, "agc": 0.04},
    "ws+bias+skipinit": {"model": "salunet_c18",
                         "model_overrides": {"conv_ws": "scaled", "conv_bias": True, "res_gain": 0.0}},
    "center+agc": {"model": "salunet_c18", "model_overrides": {"conv_ws": "center"}, "agc": 0.04},
    "center+bias": {"model": "salunet_c18", "model_overrides": {"conv_ws": "center", "conv_bias": True}},
    "center+agc+bias": {"model": "salunet_c18", "model_overrides": {"conv_ws": "center", "conv_bias": True},
                        "agc": 0.04},
    "center+a0=2": {"model": "salunet_c18", "model_overrides": {"conv_ws": "center", "salu_a0": 2.0}},
    "center+agc0.01": {"model": "salunet_c18", "model_overrides": {"conv_ws": "center"}, "agc": 0.01},
    "center+agc0.16": {"model": "salunet_c18", "model_overrides": {"conv_ws": "center"}, "agc": 0.16},
    "v2": {"model": "salunet_c18_v2"},  # the registered result, trained by name (with what it declares)
    "v3": {"model": "salunet_c18_v3"},  # ... trained pinned by name (salu_recalibrate 0.15 & co., declared)
    # the C-50 on CIFAR (its 3x3 stem; docs/RESULTS.md "C-50: the same cause, the same fix")
    "c50": {"model": "salunet_c50", "model_overrides": {"stem": "cifar"}},
    "c50-bn": {"model": "resnet50_bn", "model_overrides": {"stem": "cifar"}},
    "c50-center": {"model": "salunet_c50", "model_overrides": {"stem": "cifar", "conv_ws": "center"}},
    "c50-v2": {"model": "salunet_c50_v2", "model_overrides": {"stem": "cifar"}},
    "c50-v3": {"model": "salunet_c50_v3", "model_overrides": {"stem": "cifar"}},
}


@dataclass
class NFStudyArgs(TrainingArgs):
    configs: str = "bn,salunet,ws-scaled,ws-center,bias,skipinit,agc,salu-lr0.1"
    grid_json: str | None = None  # a JSON file of extra name -> overrides cells (added to NF_GRID)
    lrs: str = "0.05"
    width: int = 16
    epochs: int = 5
    batch_size: int = 128
    train_subset: int = 5120
    test_subset: int = 2000
    seeds: int = 3


@experiment("nf-study", NFStudyArgs, full={"width": 0, "epochs": 300, "train_subset": 0, "test_subset": 0})
def nf_study_experiment(args: NFStudyArgs, run_dir: Path) -> dict:
    """The ablation protocol (warm-up 1 epoch, cosine, weight decay 5e-4, crop + flip, no EMA) over named
    configurations of the normalization-free toolkit and learning rates, the BN twin in the same grid."""
    import json

    grid = dict(NF_GRID)
    if args.grid_json:
        extra = json.loads(Path(args.grid_json).read_text())
        if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
            raise ValueError(f"{args.grid_json}: must hold a JSON object of name -> config-overrides objects")
        grid.update(extra)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in grid]
    if unknown:
        raise ValueError(f"unknown nf-study config(s) {unknown}; choose from {', '.join(grid)} or add them with "
                         "--grid-json")
    lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    base = _train_base(args, width=args.width or None, epochs=args.epochs, batch_size=args.batch_size,
                       train_subset=args.train_subset, test_subset=args.test_subset, warmup_epochs=1,
                       weight_decay=5e-4)
    runs = _Runs(run_dir, base, len(names) * len(lrs) * args.seeds, "nf-study")
    table, rows = _grid(runs, [(n, lr, grid[n]) for n in names for lr in lrs], args.seeds)
    out = {"experiment": "nf-study", "args": asdict(args), "runs": rows, "table": table}
    _draw(out, plots.plot_grid_bars, table, run_dir / "nf_study.png",
          title=f"normalization-free study: w{args.width}, {args.epochs} epochs")
    for t in table:
        print(f"  {t['label']:36s} {_fmt(t['mean'], t['std'], t['finished'], t['seeds'])}%")
    return out


# ---- signal health at the norm and gate inputs --------------------------------------------------------------

@dataclass
class SignalArgs(ExperimentArgs):
    configs: str = "bn,salunet,ws-scaled,ws-center,bias,skipinit"  # nf-study cells, measured at init
    checkpoints: str = ""  # comma-separated run directories or checkpoint files, measured as trained
    labels: str = ""  # comma-separated labels of the checkpoints (default: model and run name)
    data: str = "cifar10"
    data_path: str | None = None
    width: int = 16
    images: int = 512  # training images (un-augmented), in batches of 128
    seed: int = 0


def _probe_setup(args: "SignalArgs"):
    """The data (``args.images`` training images, un-augmented) and the models an analysis probes: each of
    ``args.configs`` (nf-study cells) fresh at init (seeded with ``args.seed``; a cell trained pinned, as the v3s
    declare, after its first pin, which comes before any update: on its reference count of the first images), then
    each of ``args.checkpoints`` as trained; models as ``(label, source, model)``."""
    from ..data import load_arrays, to_memory
    from ..models import create_model
    from ..train.config import resolve_config
    from ..train.pin import SaluPin
    from ..train.evaluate import model_from_checkpoint
    from ..train.rundir import RunDir

    if args.images < 2:
        raise ValueError(f"images must be >= 2, got {args.images}")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in NF_GRID]
    if unknown:
        raise ValueError(f"unknown config(s) {unknown}; choose from {', '.join(NF_GRID)}")
    ckpts = _checkpoint_list(CheckpointArgs(checkpoints=args.checkpoints, labels=args.labels)) \
        if args.checkpoints.strip() else []
    data = to_memory(load_arrays(args.data, args.data_path), "cpu", train_subset=args.images)
    models: list[tuple[str, str, torch.nn.Module]] = []
    for n in names:
        cell = NF_GRID[n]
        torch.manual_seed(args.seed)
        model = create_model(cell["model"], num_classes=data.num_classes, in_chans=data.in_chans,
                             width=args.width or None, **cell.get("model_overrides", {}))
        cfg = resolve_config(None, cell)  # the cell as a run trains it, with what its model declares
        if cfg.salu_recalibrate and cfg.salu_recalibrate_every:
            images = data.normalize(data.x_train[:min(args.images, cfg.salu_reference_images)])
            SaluPin(model, images, cfg.salu_recalibrate, project_grad=False).step()
            models.append((n, "init, pinned", model))
        else:
            models.append((n, "init", model))
    for path, label in ckpts:
        model, meta, _ = model_from_checkpoint(path)
        run = RunDir.of_checkpoint(path)
        models.append((label or f"{meta['config']['model']} ({run.path.name if run else Path(path).name})",
                       f"{path} (epoch {meta['epoch']})", model))
    return data, models


@experiment("signal", SignalArgs, full={"width": 0, "images": 1024})
def signal_experiment(args: SignalArgs, run_dir: Path) -> dict:
    """Per norm / gate site and per stage: channel mean^2 / variance, within-channel vs pooled std, stuck gate
    channels, SALU inputs past the knee (analysis/signal.py), at init for ``configs`` and for ``checkpoints``.
    Every model runs as training sees it: a copy in train mode (BatchNorm on batch statistics)."""
    from .signal import signal_report, stage_summary

    def measure(model, batches):
        sites = signal_report(model, batches)
        return {"sites": sites, "stages": stage_summary(sites, _stage_of)}

    def line(roles):
        nrm, gate = roles.get("norm", {}), roles.get("gate", {})
        return (f"norm in: mean^2/var {nrm.get('mean2_var', math.nan):6.2f}  within-std "
                f"{nrm.get('within_std', math.nan):5.2f} (pooled {nrm.get('pooled_std', math.nan):5.2f})  past knee "
                f"{100 * nrm.get('past_knee', math.nan):5.1f}%   gate in: stuck {100 * gate.get('stuck', math.nan):5.1f}%")

    return _probe_models(args, run_dir, "signal", lambda x, y: x, measure, line, plots.plot_signal)


def _probe_models(args: "SignalArgs", run_dir: Path, name: str, batch_of: Callable, measure: Callable,
                  line: Callable, plot: Callable) -> dict:
    """The loop the per-site probes share: each model of :func:`_probe_setup`, a copy in train mode, measured by
    ``measure(model, batches)`` (a dict with ``stages``) on batches of 128 un-augmented training images
    (``batch_of(x, y)`` each); one printed ``line(stage)`` per stage (None: not printed); the figure ``name``.png
    drawn by ``plot``."""
    import copy

    data, models = _probe_setup(args)
    x, y = data.normalize(data.x_train[:args.images]), data.y_train[:args.images]
    batches = [batch_of(x[i:i + 128], y[i:i + 128]) for i in range(0, len(x), 128)]
    results = []
    for label, source, model in models:
        entry = measure(copy.deepcopy(model).train(), batches)
        results.append({"label": label, "source": source, **entry})
        print(f"  {label} ({source})")
        for st, v in entry["stages"].items():
            text = line(v)
            if text is not None:
                print(f"    {st:7s} {text}")
    out = {"experiment": name, "args": asdict(args), "models": results,
           "stage_order": list(dict.fromkeys(st for r in results for st in r["stages"]))}
    _draw(out, plot, out, run_dir / f"{name}.png")
    return out


# ---- training dynamics: relative steps of the kernels, drift of the gains ---------------------------------

@dataclass
class DynamicsArgs(SignalArgs):
    configs: str = "bn,ws-center,ws-scaled"  # nf-study cells, measured at init


@experiment("dynamics", DynamicsArgs, full={"width": 0, "images": 1024})
def dynamics_experiment(args: DynamicsArgs, run_dir: Path) -> dict:
    """Per conv kernel and per stage: kernel norm, relative step |g|/|W| per unit lr and the radial share of the
    gradient (0 = scale-invariant); per-channel gains' drift from init (analysis/dynamics.py). At init for
    ``configs`` and for ``checkpoints``, each a copy in train mode, on ``images`` un-augmented training images."""
    from .dynamics import dynamics_report, dynamics_summary

    def measure(model, batches):
        report = dynamics_report(model, batches)
        return {**report, "stages": dynamics_summary(report, _stage_of)}

    def line(v):
        k = v["kernels"]
        if not k:
            return None
        gains = "  ".join(f"{kind} drift {g['drift']:.3f}" for kind, g in v["gains"].items())
        return f"|W| {k['kernel_norm']:5.2f}  |g|/|W| {k['grad_ratio']:.4f}  radial {k['radial']:.3f}   {gains}"

    return _probe_models(args, run_dir, "dynamics", lambda x, y: (x, y), measure, line, plots.plot_dynamics)


# ---- variance propagation (figure 11) -------------------------------------------------------------------

@dataclass
class VarianceArgs(ExperimentArgs):
    depth: int = 64
    dim: int = 256
    samples: int = 4096
    settings: str = "1:1,1.5:0.1,1:0.01,4:1"  # SALU a0:b0 pairs


@experiment("variance", VarianceArgs, full={"depth": 256, "dim": 1024, "samples": 16384})
@torch.no_grad()
def variance_experiment(args: VarianceArgs, run_dir: Path) -> dict:
    """Variance of x_l through l blocks x -> layer(W x), W with variance-preserving N(0, 1/D) entries, for SALU
    with several (a0, b0), against the same stack with no layer (linear), tanh and LayerNorm. SALU's fixed
    point: variance settles where the gain a of the linear regime and the saturation A = sqrt(a/b) balance,
    instead of exploding (linear, a > 1) or vanishing."""
    from ..nn import functional as F

    if args.depth <= 0 or args.dim <= 0 or args.samples < 2:
        raise ValueError("depth and dim must be positive and samples >= 2")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.samples, args.dim, generator=g, dtype=torch.float64)
    ws = [torch.randn(args.dim, args.dim, generator=g, dtype=torch.float64) / math.sqrt(args.dim)
          for _ in range(args.depth)]
    layers: dict[str, Callable] = {"linear (no norm)": lambda h: h, "tanh": torch.tanh,
                                   "LayerNorm": lambda h: torch.nn.functional.layer_norm(h, h.shape[-1:])}
    for s in args.settings.split(","):
        a0, b0 = (float(v) for v in s.split(":"))
        if a0 <= 0 or b0 <= 0:
            raise ValueError(f"SALU a0, b0 must be positive, got {s!r}")
        a, b = torch.tensor(a0, dtype=torch.float64), torch.tensor(b0, dtype=torch.float64)
        layers[f"SALU a0={a0:g} b0={b0:g} (A={math.sqrt(a0 / b0):.3g})"] = lambda h, a=a, b=b: F.salu(h, a, b)
    curves = {}
    for name, fn in layers.items():
        h, var = x0, [float(x0.var())]
        for w in ws:
            h = fn(h @ w)
            var.append(float(h.var()))
        curves[name] = var
    out = {"experiment": "variance", "args": asdict(args), "curves": curves,
           "title": f"variance through {args.depth} layers (D={args.dim})"}
    _draw(out, plots.plot_variance, out, run_dir / "variance.png")
    for name, var in curves.items():
        print(f"  {name:36s} var at depth 0/{args.depth // 4}/{args.depth}: {var[0]:.3g} / "
              f"{var[args.depth // 4]:.3g} / {var[-1]:.3g}")
    return out


# ---- geometry and representation (figures 6-9), from checkpoints --------------------------------------------

@dataclass
class CheckpointArgs(ExperimentArgs):
    checkpoints: str = ""  # comma-separated checkpoint files (or run directories: their newest checkpoint)
    labels: str = ""  # comma-separated labels (default: the model names)
    ema: bool = False  # use the EMA weights
    images: int = 1000  # test images for the representation statistics
    data_path: str | None = None  # the data set's location if not the checkpoint's


def _checkpoint_list(args: CheckpointArgs) -> list[tuple[Path, str]]:
    from ..train.checkpoint import list_checkpoints

    items = [c.strip() for c in args.checkpoints.split(",") if c.strip()]
    if not items:
        raise ValueError("give --checkpoints PATH[,PATH...] (checkpoint files or run directories)")
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else []
    if labels and len(labels) != len(items):
        raise ValueError(f"{len(labels)} labels for {len(items)} checkpoints; give one label per checkpoint")
    out = []
    for i, c in enumerate(items):
        p = Path(c).expanduser()
        if p.is_dir():
            found = list_checkpoints(p)
            if not found:
                raise FileNotFoundError(f"{p}: no checkpoints in this run directory")
            p = found[-1]
        elif not p.is_file():
            raise FileNotFoundError(f"{p}: no such checkpoint or run directory")
        out.append((p, labels[i] if labels else ""))
    return out


def _stage_of(name: str) -> str:
    """Stage of a module name: ResNets ``stem`` / ``layerK``; the ViT's ``layers.K`` is block ``layer{K+1}``
    (as its ``stages()`` names them) and its final norm ``head``."""
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit():
        return f"layer{int(parts[1]) + 1}"
    if parts[0] in ("stem", "embed") or re.fullmatch(r"layer\d+", parts[0]):
        return parts[0]
    return "head" if parts[0].startswith("head") else "other"


def _downsampling(model: torch.nn.Module) -> set[str]:
    """Names of the SALU-family modules inside residual blocks that change resolution (a strided conv)."""
    from ..nn import SaluFamily

    out = set()
    for bname, block in model.named_modules():
        if not hasattr(block, "branch_end"):
            continue
        if any(isinstance(m, torch.nn.Conv2d) and max(m.stride) > 1 for m in block.modules()):
            out |= {f"{bname}.{n}" for n, m in block.named_modules() if isinstance(m, SaluFamily)}
    return out


@experiment("geometry", CheckpointArgs)
def geometry_experiment(args: CheckpointArgs, run_dir: Path) -> dict:
    """Figures 6-7: learned amplitude sqrt(a/b) and width 1/sqrt(ab) of every SALU / SWALU / GALU layer."""
    from ..train.evaluate import model_from_checkpoint

    ckpts = []
    for path, label in _checkpoint_list(args):
        model, meta, _ = model_from_checkpoint(path, ema=args.ema)
        layers = S.salu_geometry(model)
        down = _downsampling(model)
        for l in layers:
            l["stage"] = _stage_of(l["name"])
            l["downsample"] = l["name"] in down
        ckpts.append({"checkpoint": str(path), "label": label or meta["config"]["model"], "epoch": meta["epoch"],
                      "layers": layers})
        if not layers:
            print(f"  {path}: no SALU-family layers (a normalised baseline?)")
    out = {"experiment": "geometry", "args": asdict(args), "checkpoints": ckpts}
    if any(c["layers"] for c in ckpts):
        _draw(out, plots.plot_geometry, {"checkpoints": [c for c in ckpts if c["layers"]]}, run_dir / "geometry.png")
    return out


@experiment("representation", CheckpointArgs)
def representation_experiment(args: CheckpointArgs, run_dir: Path) -> dict:
    """Figures 8-9: effective rank and isotropy of each stage's (pooled) representation, and the moments of
    each stage's activations, on ``images`` test images of the checkpoint's data set."""
    from ..data import load_arrays
    from ..train.evaluate import model_from_checkpoint

    if args.images < 2:
        raise ValueError(f"images must be >= 2, got {args.images}")
    ckpts = []
    for path, label in _checkpoint_list(args):
        from ..train.distributed import resolve_device

        device = resolve_device(args.device)
        model, meta, _ = model_from_checkpoint(path, device=device, ema=args.ema)
        cfg = meta["config"]
        arrays = load_arrays(cfg["data"], args.data_path or cfg["data_path"])
        x = torch.from_numpy(arrays.x_test[:args.images]).permute(0, 3, 1, 2).float()
        mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
        x = ((x - mean) / std).to(device)
        feats = capture_batches(model, [x[i:i + 250] for i in range(0, len(x), 250)])
        stages = {}
        token_model = not isinstance(feats.get("stem"), torch.Tensor) or feats["stem"].dim() != 4
        for name, t in feats.items():
            # one vector per image: maps (N, C, H, W) are averaged over space; token tensors (N, T, D) over
            # tokens, their feature dim being the last
            cdim = -1 if (t.dim() == 3 and token_model) or t.dim() == 2 else 1
            pooled = t if t.dim() == 2 else (t.mean(1) if cdim == -1 else t.mean(dim=tuple(range(2, t.dim()))))
            spec = S.spectrum_stats(pooled)
            mom = S.moments(t, channel_dim=cdim)
            stages[name] = {**spec, **mom, "dormant_fraction": S.dormant_fraction(t, channel_dim=cdim)}
        # stage_order: the JSON is written with sorted keys, and a redraw must keep the network's order
        ckpts.append({"checkpoint": str(path), "label": label or cfg["model"], "epoch": meta["epoch"],
                      "images": len(x), "stages": stages, "stage_order": list(stages)})
    out = {"experiment": "representation", "args": asdict(args), "checkpoints": ckpts}
    _draw(out, plots.plot_representation, out, run_dir / "representation.png")
    for c in ckpts:
        print(f"  {c['label']}: " + "  ".join(f"{s} erank {v['effective_rank']:.1f} iso {v['isotropy']:.3f}"
                                            for s, v in c["stages"].items()))
    return out


# ---- training curves (figure 5) ---------------------------------------------------------------------------

@dataclass
class CurvesArgs(ExperimentArgs):
    runs: str = ""  # comma-separated run directories
    labels: str = ""


@experiment("curves", CurvesArgs)
def curves_experiment(args: CurvesArgs, run_dir: Path) -> dict:
    """Figure 5: test and EMA accuracy curves of several runs on one plot, from their metrics.jsonl. Runs given
    the same label are seeds of one configuration: drawn as their mean per epoch, with a +-1 std band on the
    accuracy, and reported as mean, std and per-run final values."""
    from ..train.rundir import RunDir

    dirs = [Path(r.strip()).expanduser() for r in args.runs.split(",") if r.strip()]
    if not dirs:
        raise ValueError("give --runs RUN_DIR[,RUN_DIR...]")
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [d.name for d in dirs]
    if len(labels) != len(dirs):
        raise ValueError(f"{len(labels)} labels for {len(dirs)} runs; give one label per run")
    groups: dict[str, list[list[dict]]] = {}
    runs: dict[str, list[str]] = {}
    for d, label in zip(dirs, labels):
        run = RunDir(d)
        if not run.metrics.is_file():
            raise FileNotFoundError(f"{run.metrics}: no such file; is {d} a salunet run directory?")
        groups.setdefault(label, []).append([r for r in run.read_metrics() if "test_acc" in r])
        runs.setdefault(label, []).append(str(d))
    series = {label: _seed_mean(label, rows) for label, rows in groups.items()}
    out = {"experiment": "curves", "args": asdict(args), "runs": runs,
           "final": {k: v[-1] if v else None for k, v in series.items()}}
    _draw(out, plots.plot_curves, series, run_dir / "curves.png", title="training curves")
    for k, v in out["final"].items():
        if v and len(groups[k]) > 1:
            print(f"  {k:36s} {_fmt(v['test_acc'], v.get('test_acc_std'))}% "
                  f"after epoch {v['epoch']} ({len(groups[k])} runs)")
    return out


_CURVE_KEYS = ("train_loss", "test_loss", "test_acc", "ema_test_acc", "train_acc")


def _seed_mean(label: str, runs: list[list[dict]]) -> list[dict]:
    """One run's rows as they are; several runs' (seeds') rows as their mean per epoch, with ``test_acc_std``
    (and ``ema_test_acc_std``) and ``per_run_test_acc``. The runs must have the same epochs."""
    if len(runs) == 1:
        return runs[0]
    epochs = [[r["epoch"] for r in rows] for rows in runs]
    if any(e != epochs[0] for e in epochs):
        raise ValueError(f"label {label!r}: its runs have different epochs ({', '.join(str(len(e)) for e in epochs)} "
                         "rows); runs that share a label are averaged, so give them the same epochs or other labels")
    out = []
    for i, epoch in enumerate(epochs[0]):
        row: dict = {"epoch": epoch}
        for key in _CURVE_KEYS:
            vals = [rows[i].get(key) for rows in runs]
            if any(v is None for v in vals):
                continue
            m, sd = _mean_std(vals)
            row[key] = m
            if key in ("test_acc", "ema_test_acc"):
                row[f"{key}_std"] = sd
        row["per_run_test_acc"] = [rows[i]["test_acc"] for rows in runs]
        out.append(row)
    return out


# ---- entry point ------------------------------------------------------------------------------------------

def args_from_dict(name: str, values: dict):
    """Build experiment ``name``'s args dataclass from ``values`` (type-checked; unknown keys rejected); with
    ``full=True`` the paper-scale overrides apply underneath explicit values."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    cls = EXPERIMENTS[name][0]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(values) - known)
    if bad:
        raise ValueError(f"experiment {name}: unknown option(s) {', '.join(bad)}; valid: {', '.join(sorted(known))}")
    full = _coerce(name, "full", values.get("full", False), hints["full"])
    merged = dict(FULL[name]) if full else {}
    merged.update(values)
    for k, v in merged.items():
        merged[k] = _coerce(name, k, v, hints[k])
    return cls(**merged)


def _coerce(exp: str, key: str, v, tp):
    from ..train.config import coerce_value, field_types

    return coerce_value(f"experiment {exp}: option {key}", v, field_types(tp))


def run_experiment(which: str, args=None, /, **values) -> dict:
    """Run experiment ``which`` (args dataclass or keyword options); returns its result dict, which is also
    written to ``<out>/<name>-<time>/results.json`` beside its figures."""
    if args is None:
        args = args_from_dict(which, values)
    fn = EXPERIMENTS[which][1]
    if getattr(args, "seeds", 1) <= 0:
        raise ValueError(f"seeds must be >= 1, got {args.seeds}")
    from ..train.rundir import timestamped

    run_dir = Path(args.out).expanduser() / (args.name or timestamped(which))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir}: already exists; choose another --name (nothing was overwritten)")
    if which in ("plasticity", "batch-sweep", "ablation", "init-study", "nf-study"):
        _check_data(args)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"salunet experiment {which}: {run_dir}")
    t0, commit = time.time(), _commit()  # the code that runs is the code at start
    try:
        result = fn(args, run_dir)
    except BaseException:
        if created and not any(run_dir.iterdir()):  # failed before writing anything: leave no trace
            run_dir.rmdir()
        raise
    result.update(seconds=round(time.time() - t0, 1), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  commit=commit)
    path = _write(run_dir, result)
    print(f"wrote {path} and {', '.join(sorted(p.name for p in run_dir.glob('*.png')))} "
          f"({result['seconds']:.0f} s)")
    return result


def _check_data(args) -> None:
    """Fail before anything is written if the training data cannot be loaded."""
    from ..data import load_arrays

    load_arrays(args.data, args.data_path)


def _commit() -> str | None:
    """The git commit of the package's checkout, with "+dirty" if it has uncommitted changes; None outside git."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)

    try:
        head = git("rev-parse", "--short", "HEAD").stdout.strip()
        if not head:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
