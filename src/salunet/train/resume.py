"""Where a run writes and what it continues from: the plan made before anything is written (:func:`plan_run`:
the config, the run directory, the checkpoint to resume from), resume and torchrun restarts, loading a
checkpoint into freshly built objects, and the clean-up of a new run that failed before its first epoch.

Resume skips a corrupt newest checkpoint for the previous good one (saying so), refuses a checkpoint of
another run, and under ``torchrun --max-restarts`` a restarted attempt continues the run directory of the
failed one (found by the job id it recorded, :attr:`RunDir.RUN_ID`)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from . import distributed as D
from .checkpoint import CheckpointError, RunLock, latest_checkpoint, state_mismatch
from .rundir import RunDir, timestamped
from .config import TrainConfig, resolve_config
from .sources import data_fingerprint

__all__ = ["RunPlan", "plan_run", "resume_config", "checkpoint_config", "check_checkpoint_meta", "load_state",
           "make_dirs", "remove_empty_dirs", "RESUME_KEYS"]

RESUME_KEYS = ("epochs", "progress", "device", "workers", "checkpoint_every", "keep_checkpoints", "logger",
               "log_steps", "dist_timeout")
_META_KEYS = ("config", "epoch", "step", "num_classes", "in_chans", "image_size", "mean", "std")
# config keys that may differ between a run's config.json and its checkpoints (--resume may change them; the
# directory may have been moved or renamed)
_FREE_KEYS = set(RESUME_KEYS) | {"out", "name"}


@dataclasses.dataclass
class RunPlan:
    """What ``train`` will do, decided before any process group exists and before anything is written."""

    cfg: TrainConfig
    run_dir: Path
    found: tuple | None  # (path, state, meta) of the checkpoint to continue from
    new_run: bool
    notes: list[str]  # printed by rank 0 before training: checkpoints skipped, torchrun restarts
    numbered: bool = False  # a default name: if another run claims it first, take the next free "-2", "-3", ...
    accept_data_change: bool = False  # resume on data whose fingerprint differs from the checkpoint's


def _new_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.name or timestamped(f"{cfg.model}-{cfg.data}-s{cfg.seed}")
    run_dir = Path(cfg.out).expanduser() / name
    RunLock.refuse_if_held(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ValueError(f"{run_dir}: run directory already exists; continue it with --resume {run_dir} or "
                         "choose another --name")
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{parent}: is a file, so the run directory {run_dir} cannot be made there; "
                                 "choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{parent}: not writable, so the run directory {run_dir} cannot be made there; "
                              "choose another --out")
    return run_dir


def check_checkpoint_meta(path: Path, meta) -> None:
    """Refuse a checkpoint whose (JSON) metadata lacks what training and evaluation read from it."""
    missing = [k for k in _META_KEYS if k not in meta] if isinstance(meta, dict) else list(_META_KEYS)
    if missing or not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path}: not a checkpoint of salunet train (metadata lacks "
                              f"{', '.join(missing) or 'a config'}); pass a checkpoints/epoch_NNNN.safetensors file")


def checkpoint_config(path: Path, meta: dict, overrides: dict | None = None) -> TrainConfig:
    check_checkpoint_meta(path, meta)
    try:
        return resolve_config(None, overrides, base=meta["config"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: its config is not valid for salunet {__version__} ({exc})") from None


def resume_config(run_dir: Path, overrides: dict) -> tuple[TrainConfig, tuple | None, list[str]]:
    """The config and checkpoint to continue ``run_dir`` with. A corrupt newest checkpoint is skipped (and
    named) in favour of the previous good one; a checkpoint written for another config (another model, ...)
    is refused, as is a directory whose checkpoints all fail to load."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory to resume; pass the directory of an earlier "
                                "salunet train run")
    bad = sorted(set(overrides) - set(RESUME_KEYS))
    if bad:
        raise ValueError(f"--resume continues the saved config; only {', '.join(RESUME_KEYS)} may be changed, "
                         f"not {', '.join(bad)}")
    RunLock.refuse_if_held(run_dir)
    RunDir(run_dir).refuse_links()
    saved = RunDir(run_dir).read_config()
    skipped: list[str] = []
    found = latest_checkpoint(run_dir, skipped)
    notes = [f"skipping {msg}" for msg in skipped]
    if found is None and skipped:
        raise CheckpointError(f"{run_dir}: no checkpoint loads ({skipped[0]}); restore a good checkpoint, or move "
                              "checkpoints/ away to start the run over")
    if found is not None:
        path, _, meta = found
        cfg = checkpoint_config(path, meta, overrides)
        if saved is not None:
            diff = sorted(k for k in set(saved) | set(meta["config"])
                          if k not in _FREE_KEYS and saved.get(k) != meta["config"].get(k))
            if diff:
                k = diff[0]
                raise CheckpointError(
                    f"{path}: written by another run ({k} {meta['config'].get(k)!r}, but this run's config.json "
                    f"has {saved.get(k)!r}); move it out of {path.parent}")
        if meta["epoch"] != RunDir.epoch_of(path):
            raise CheckpointError(f"{path}: records epoch {meta['epoch']!r}, not the epoch of its name (renamed or "
                                  f"copied in); move it out of {path.parent}")
        if skipped:
            notes.append(f"resuming from the previous good checkpoint {path}")
        if int(meta["epoch"]) > cfg.epochs:
            raise ValueError(f"{run_dir} has already trained {meta['epoch']} epochs; pass --epochs "
                             f"{meta['epoch']} or more")
        return cfg, found, notes
    if saved is None:
        raise ValueError(f"{run_dir}: not a salunet run directory (no config.json, no checkpoint); pass the "
                         "directory of an earlier salunet train run")
    return resolve_config(None, overrides, base=saved), None, notes


def _restart_run_dir(cfg: TrainConfig) -> Path | None:
    """Under a torchrun restart: the run directory that the failed attempt of this same job created, recognised
    by torchrun's run id *and* this process's launcher (:func:`.distributed.agent_identity`), which only this job
    has: a fixed ``--rdzv-id`` repeats the run id in every job."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    out = Path(cfg.out).expanduser()
    if not run_id or not out.is_dir():
        return None
    me = D.agent_identity()
    candidates = [out / cfg.name] if cfg.name else [p.parent for p in out.glob(f"*/{RunDir.RUN_ID}")]
    for d in candidates:
        rec = RunDir(d).read_run_id()
        if rec is not None and rec["run_id"] == run_id and me in rec["agents"]:
            return d
    return None


def plan_run(config, resume, overrides: dict) -> RunPlan:
    """Everything that can fail on bad input and needs no data: the config, the run directory, the
    checkpoint to resume from. Writes nothing."""
    if resume is not None:
        run_dir = Path(resume).expanduser()
        cfg, found, notes = resume_config(run_dir, overrides)
        return RunPlan(cfg, run_dir, found, False, notes)
    if isinstance(config, TrainConfig):
        cfg = resolve_config(None, overrides, base=asdict(config))
    else:
        cfg = resolve_config(None, {**(config or {}), **overrides})
    restart = D.restart_count()
    run_dir = _restart_run_dir(cfg) if restart else None
    if run_dir is not None and not RunDir(run_dir).is_started():
        return RunPlan(cfg, run_dir, None, True, [f"torchrun restart {restart} of {D.max_restarts()}: starting "
                                                f"{run_dir} over (the failed attempt saved nothing)"])
    if run_dir is not None:  # torchrun restarted this job after a failure: continue what the last attempt saved
        rcfg, found, notes = resume_config(run_dir, {k: getattr(cfg, k) for k in RESUME_KEYS})
        diff = [k for k, v in asdict(rcfg).items() if k not in _FREE_KEYS and getattr(cfg, k) != v]
        if diff:
            raise ValueError(f"{run_dir}: the saved config differs from this command's ({diff[0]}); start a new "
                             "run with another --name")
        where = f"{found[0]} (epoch {found[2]['epoch']})" if found else "the start (no checkpoint was saved)"
        notes.append(f"torchrun restart {restart} of {D.max_restarts()}: resuming {run_dir} from {where}")
        return RunPlan(rcfg, run_dir, found, False, notes)
    return RunPlan(cfg, _new_run_dir(cfg), None, True, [], numbered=not cfg.name)


def claim_run_dir(plan: RunPlan) -> tuple[Path, RunLock, list[Path]]:
    """Take the plan's run directory for this process, atomically: (directory, its held lock, the directories
    this call created, deepest first). A new run creates its directory exclusively (``mkdir``, no ``exist_ok``)
    and, once it holds the lock, checks again that nobody has written there: of two runs given the same
    ``--name``, the second is refused even if the first finished in between; with a default name it takes the
    next free ``<name>-2``, ``-3``, ... instead. Continuing a run (resume, torchrun restart) just takes the lock."""
    if not plan.new_run:
        created = make_dirs(plan.run_dir)
        lock = RunLock(plan.run_dir)
        try:
            lock.acquire()
        except ValueError:
            remove_empty_dirs(created)
            raise
        return plan.run_dir, lock, created
    for i in range(1, 1000 if plan.numbered else 2):
        run_dir = plan.run_dir if i == 1 else plan.run_dir.with_name(f"{plan.run_dir.name}-{i}")
        created = make_dirs(run_dir.parent)
        try:
            os.mkdir(run_dir)
            created.insert(0, run_dir)
        except FileExistsError:
            pass
        lock = RunLock(run_dir)
        try:
            lock.acquire()
            taken = any(p.name != RunDir.LOCK for p in run_dir.iterdir())
        except ValueError:  # a live run holds it ("in use by process PID"): that message, for a chosen name
            remove_empty_dirs(created)
            if not plan.numbered:
                raise
            continue
        if not taken:
            return run_dir, lock, created
        lock.release()
        remove_empty_dirs(created)
    raise ValueError(f"{plan.run_dir}: run directory already exists (another run took it); continue it with "
                     f"--resume {plan.run_dir} or choose another --name")


def make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories this call created, deepest first."""
    created, p = [], path
    while not p.exists():
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty_dirs(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()  # only if empty: anything else in there is not ours to delete
        except OSError:
            pass


def load_state(found, cfg: TrainConfig, source, model, opt, ema, scaler,
               accept_data_change: bool = False) -> tuple[int, int]:
    """Load a checkpoint into the freshly built objects; (epoch, step) to continue from. Anything that does
    not fit (another model, another data set, another version, data that changed) is refused naming the file."""
    path, state, meta = found
    recorded = meta.get("data_fingerprint")
    if recorded is not None and not accept_data_change and recorded != data_fingerprint(source):
        raise CheckpointError(f"{path}: the data changed since this run trained on it ({cfg.data_path or cfg.data}: "
                              f"fingerprint {data_fingerprint(source)[:12]}, the checkpoint's {recorded[:12]}: a "
                              "replaced file, images or labels changed, class folders renamed); resume with the "
                              "original data, or pass --accept-data-change to continue on this data")
    if (meta["num_classes"], meta["in_chans"], meta["image_size"]) != \
            (source.num_classes, source.in_chans, source.image_size):
        raise CheckpointError(f"{path}: written for {meta['num_classes']} classes, {meta['in_chans']} channel(s), "
                              f"{meta['image_size']} px, but the data has {source.num_classes}, {source.in_chans}, "
                              f"{source.image_size}; move it out of {path.parent}")
    problem = state_mismatch(model.state_dict(), state.get("model"))
    if problem:
        raise CheckpointError(f"{path}: its weights do not fit model {cfg.model} ({problem}); it was written for "
                              f"another model: move it out of {path.parent}")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        dev = next(model.parameters()).device
        if dev.type == "cuda" and state["rng"].get("cuda") is not None:  # dropout on a GPU draws from this one
            torch.cuda.set_rng_state(state["rng"]["cuda"], dev)
        return int(meta["epoch"]), int(meta["step"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{path}: its training state does not fit this run ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160]}); move it out of {path.parent}") from None
