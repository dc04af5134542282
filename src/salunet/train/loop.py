"""The training loop: ``train(config) -> dict`` (also ``salunet train``).

Reproducibility and exact resume (CPU, bitwise): the model is built right after ``torch.manual_seed(seed)``;
the data order and every augmentation draw of epoch ``e`` come from a generator seeded with (seed, e), so
an epoch replays identically whether or not the process restarted; the global RNG state (dropout) is saved
in each checkpoint with the model, optimizer, EMA, grad-scaler and step counter.

Data parallelism (torchrun): for in-memory data every rank draws the *global* batch and its augmentation
from the same generator and keeps its own slice, so N ranks see exactly the samples, crops and mixes that
one process with the same global batch sees; DDP averages gradients. The price is deliberate: every rank
indexes, crops, flips, normalises and mixes the whole global batch (N times the augmentation work, and one
global batch of images in memory per rank) to keep only 1/N of it. Mixup and cutmix pair samples across the
global batch, so slicing first would change the run; the batched tensor ops cost little next to forward and
backward. Folder data uses DistributedSampler for training (each rank decodes only its own images; the order
then differs from a 1-process run). Evaluation is sharded: rank r scores test images r, r+N, r+2N, ... (each
image exactly once) and the counts are summed with an all-reduce. Only rank 0 downloads; the others wait for
it and then read what it wrote. Per-step loss, accuracy and the finite checks are all-reduced, so every rank
logs the same numbers and stops at the same step.

``metrics.jsonl`` holds one line per epoch: ``train_loss`` / ``train_acc`` (means over the epoch's optimizer
steps and all ranks, on the augmented and mixed batches, accuracy against the first mixing target),
``test_*`` and ``ema_test_*`` (loss, top-1 ``acc``, ``top5``), ``lr`` (the value used by the epoch's *last*
optimizer step), ``epoch_s`` (wall time of the epoch's training steps), ``eval_s``, ``startup_s`` (the first
step of the first epoch a process runs: lazy initialisation, kernel loading, ``torch.compile``; 0 in other
epochs), ``images_per_s`` (training images per second excluding ``startup_s``), ``data_s`` / ``data_share``
(time spent producing batches: loading and augmentation, and its share of ``epoch_s``; on CUDA the
augmentation kernels run asynchronously, so this is the launch cost), ``elapsed_s`` (since this process
started training).

Failure behaviour: bad input is rejected before anything is written, and a new run that fails before it
finishes its first epoch removes what it wrote (``config.json``, the run directory it created). A
non-finite loss or gradient stops the run (:class:`TrainingDiverged`) before the optimizer step, and the
parameters are checked to be finite before every checkpoint, so no non-finite weights are ever saved and
the last good checkpoint stays the newest. A full disk, SIGTERM (``salunet train``) or a lost torchrun peer
stop the run with :class:`RunStopped`, whose message names the checkpoint to continue from. Resume skips a
corrupt newest checkpoint for the previous good one (saying so), refuses a checkpoint of another run, and
removes the temporary files of writes a killed process left. Under ``torchrun --max-restarts`` a restarted
attempt continues the run directory of the failed one. docs/RELIABILITY.md lists the faults tested.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..data import ImageFolder, load_arrays, mix_batch, mixed_cross_entropy, random_crop, random_flip, to_memory
from ..models import MODEL_CONFIGS, create_model, list_models
from ..nn import SaluFamily, kernels
from . import distributed as D
from . import faults
from .checkpoint import (CheckpointError, RunLock, append_jsonl, atomic_write_bytes, latest_checkpoint,
                         list_checkpoints, read_jsonl, remove_partial_files, save_checkpoint, state_mismatch,
                         write_json_atomic)
from .config import TrainConfig, resolve_config
from .ema import EMA
from .optim import adaptive_clip_, agc_parameters, lr_at, make_optimizer, set_lr

__all__ = ["train", "evaluate", "build_model", "load_source", "MemorySource", "FolderSource", "TrainingDiverged", "RunStopped", "RESUME_KEYS", "stop_on_sigterm",
           "check_checkpoint_meta"]

RESUME_KEYS = ("epochs", "progress", "device", "workers", "checkpoint_every", "keep_checkpoints")
_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights became NaN or infinite; the run stopped before saving them,
    and its last good checkpoint is kept."""


# ---- pieces -----------------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    if cfg.model not in list_models():
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(list_models())}")
    kw = dict(cfg.model_overrides)
    fields = {f.name for f in dataclasses.fields(MODEL_CONFIGS[cfg.model])}
    if "img_size" in fields and "img_size" not in kw:  # models whose shapes depend on the image size
        kw["img_size"] = image_size
        if "patch" in fields and image_size % 4:
            kw.setdefault("patch", 2 if image_size % 2 == 0 else 1)
    torch.manual_seed(cfg.seed)
    return create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, width=cfg.width,
                        norm_layer=cfg.norm_layer, act_layer=cfg.act_layer, **kw)


def _epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + rank)


class MemorySource:
    """Batches from a data set resident on the device; augmentation as batched tensor ops."""

    def __init__(self, data, cfg: TrainConfig, info: D.DistInfo) -> None:
        self.data, self.cfg, self.info = data, cfg, info
        self.n_train = len(data.x_train)
        self.steps = self.n_train // cfg.batch_size
        self.num_classes, self.in_chans, self.image_size = data.num_classes, data.in_chans, data.image_size
        self.mean, self.std = data.mean, data.std

    def train_batches(self, epoch: int):
        cfg, B = self.cfg, self.cfg.batch_size
        g = _epoch_generator(cfg.seed, epoch)
        perm = torch.randperm(self.n_train, generator=g).to(self.data.x_train.device)
        b = B // self.info.world
        lo = self.info.rank * b
        for s in range(self.steps):
            idx = perm[s * B:(s + 1) * B]
            x = self.data.x_train[idx]  # (B, C, H, W) uint8, the global batch (see the module docstring)
            x = random_crop(x, cfg.crop_padding, g)
            if cfg.flip:
                x = random_flip(x, g)
            x = self.data.normalize(x)
            x, ya, yb, lam = mix_batch(x, self.data.y_train[idx], cfg.mixup, cfg.cutmix, g)
            yield x[lo:lo + b], ya[lo:lo + b], yb[lo:lo + b], lam

    def eval_batches(self):
        """This rank's shard of the test set: images rank, rank + world, ... (all of them in one process)."""
        d, n, r, w = self.data, self.cfg.eval_batch_size, self.info.rank, self.info.world
        x, y = d.x_test[r::w], d.y_test[r::w]
        for i in range(0, len(x), n):
            yield d.normalize(x[i:i + n]), y[i:i + n]


def _class_spread_subset(ds, n: int):
    """The first ``n`` samples of ``ds`` taken round-robin over its classes (all of ``ds`` when ``n`` is 0 or
    covers it), in their original order."""
    from torch.utils.data import Subset

    if n <= 0 or n >= len(ds):
        return ds
    seen: dict[int, int] = {}
    rank = []
    for i, (_, label) in enumerate(ds.samples):
        rank.append((seen.get(label, 0), label, i))
        seen[label] = seen.get(label, 0) + 1
    return Subset(ds, sorted(i for _, _, i in sorted(rank)[:n]))


class FolderSource:
    """ImageNet-style folders through DataLoader workers (Pillow decoding); training sharded by
    DistributedSampler, evaluation by a strided subset per rank."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo, classes: list[str] | None = None) -> None:
        """``classes`` (evaluation of a checkpoint, which records them): label order of the trained model; then
        only ROOT/val/ is read. Otherwise the class folders of ROOT/train/ define the labels."""
        if cfg.data_path is None:
            raise ValueError("data 'imagefolder' needs --data-path ROOT with ROOT/train/<class>/ and ROOT/val/<class>/")
        root = Path(cfg.data_path).expanduser()
        self.train_set = None if classes else \
            ImageFolder(root / "train", train=True, size=cfg.image_size, seed=cfg.seed, flip=cfg.flip)
        classes = classes or self.train_set.classes
        self.val_set = ImageFolder(root / "val", train=False, size=cfg.eval_size, classes=classes)
        # --train-subset / --test-subset: the same number of images from every class (the folders list samples
        # class by class, so a plain prefix would be one or two classes)
        self.train_data = _class_spread_subset(self.train_set, cfg.train_subset) if self.train_set else None
        self.val_data = _class_spread_subset(self.val_set, cfg.test_subset)
        self.cfg, self.info = cfg, info
        self.local_batch = cfg.batch_size // info.world
        self.n_train = len(self.train_data) if self.train_data is not None else 0
        self.steps = self.n_train // cfg.batch_size
        self.num_classes, self.in_chans, self.image_size = len(classes), 3, cfg.image_size
        self.mean, self.std = _IMAGENET_MEAN.to(info.device), _IMAGENET_STD.to(info.device)

    def _loader(self, ds, batch: int, sampler=None, generator=None, shuffle: bool = False):
        from torch.utils.data import DataLoader

        return DataLoader(ds, batch_size=batch, shuffle=shuffle, sampler=sampler, generator=generator,
                          num_workers=self.cfg.workers, drop_last=shuffle or sampler is not None,
                          pin_memory=self.info.device.type == "cuda")

    def train_batches(self, epoch: int):
        from torch.utils.data import DistributedSampler

        info = self.info
        self.train_set.set_epoch(epoch)
        if info.enabled:
            sampler = DistributedSampler(self.train_data, info.world, info.rank, shuffle=True, seed=self.cfg.seed,
                                         drop_last=True)
            sampler.set_epoch(epoch)
            loader = self._loader(self.train_data, self.local_batch, sampler=sampler)
        else:
            loader = self._loader(self.train_data, self.local_batch, shuffle=True,
                                  generator=_epoch_generator(self.cfg.seed, epoch))
        g = _epoch_generator(self.cfg.seed, epoch, info.rank)
        for s, (x, y) in enumerate(loader):
            if s >= self.steps:
                break
            x = (x.to(info.device, non_blocking=True).float() - self.mean) / self.std
            yield mix_batch(x, y.to(info.device, non_blocking=True), self.cfg.mixup, self.cfg.cutmix, g)

    def eval_batches(self):
        """This rank's shard of the validation set (every image exactly once over all ranks, no padding)."""
        from torch.utils.data import Subset

        shard = Subset(self.val_data, range(self.info.rank, len(self.val_data), self.info.world))
        for x, y in self._loader(shard, self.cfg.eval_batch_size):
            yield (x.to(self.info.device).float() - self.mean) / self.std, y.to(self.info.device)


def load_source(cfg: TrainConfig, info: D.DistInfo, *, train: bool = True,
                classes: list[str] | None = None) -> MemorySource | FolderSource:
    """The batches of ``cfg.data`` for this rank. ``train=False`` (evaluation only) skips the checks that
    concern the training batches; with ``classes`` (an image-folder checkpoint's label order) only the
    validation folder is read, labelled in that order."""
    if train and cfg.batch_size % (info.world * cfg.accum_steps):
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by ranks x accum_steps "
                         f"({info.world} x {cfg.accum_steps})")
    if cfg.data == "imagefolder":
        source = FolderSource(cfg, info, classes=None if train else classes)
    else:
        source = MemorySource(to_memory(_load_arrays(cfg, info), info.device, cfg.train_subset, cfg.test_subset),
                              cfg, info)
    if train and source.steps == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({source.n_train} images); "
                         "lower --batch-size")
    return source


def _load_arrays(cfg: TrainConfig, info: D.DistInfo):
    if not (cfg.download and info.enabled):
        return load_arrays(cfg.data, cfg.data_path, download=cfg.download, progress=cfg.progress)
    # rank 0 downloads and extracts alone; broadcasting its outcome is also the barrier the others wait at
    arrays, error = None, None
    if info.is_main:
        try:
            arrays = load_arrays(cfg.data, cfg.data_path, download=True, progress=cfg.progress)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks have been told
            error = exc
    msg = D.broadcast_object(info, None if error is None else str(error).splitlines()[0])
    if error is not None:
        raise error
    if msg is not None:
        raise ValueError(f"rank 0 could not get the data: {msg}")
    return arrays if arrays is not None else load_arrays(cfg.data, cfg.data_path, download=False)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, batches, *, amp_ctx=None, channels_last: bool = False,
             dist_info: D.DistInfo | None = None) -> dict:
    """Top-1 / top-5 accuracy and mean loss of ``model`` over ``batches`` of (x, y).

    With ``dist_info`` of a multi-process run, each rank passes its own shard and the sums are all-reduced:
    every rank returns the result over the whole set."""
    was = model.training
    model.eval()
    n, sums = 0, None  # sums: (loss, top-1 hits, top-5 hits) on the model's device, read once at the end, so a
    for x, y in batches:  # GPU is never made to wait for the host batch by batch
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_ctx or nullcontext():
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        batch = torch.stack([nn.functional.cross_entropy(logits, y, reduction="sum"), (top[:, 0] == y).sum(),
                             (top == y[:, None]).any(1).sum()]).double()
        sums = batch if sums is None else sums + batch
        n += len(y)
    model.train(was)
    if sums is None:
        sums = torch.zeros(3, dtype=torch.float64, device=dist_info.device if dist_info else "cpu")
    if dist_info is not None and dist_info.enabled:
        sums = torch.cat([sums.to(dist_info.device), torch.tensor([float(n)], dtype=torch.float64,
                                                                  device=dist_info.device)])
        loss, correct, correct5, n = D.all_reduce_sum(dist_info, sums).tolist()
        n = int(n)
    else:
        loss, correct, correct5 = sums.tolist()
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1), "top5": correct5 / max(n, 1), "n": n}


# ---- run directory and config -----------------------------------------------------------------------------

_RUN_ID_FILE = ".torchrun_run_id"  # the torchrun job that created the run directory (finds it again on restart)
_META_KEYS = ("config", "epoch", "step", "num_classes", "in_chans", "image_size", "mean", "std")
# config keys that may differ between a run's config.json and its checkpoints (--resume may change them; the
# directory may have been moved or renamed)
_FREE_KEYS = set(RESUME_KEYS) | {"out", "name"}


@dataclasses.dataclass
class _Plan:
    """What ``train`` will do, decided before any process group exists and before anything is written."""

    cfg: TrainConfig
    run_dir: Path
    found: tuple | None  # (path, state, meta) of the checkpoint to continue from
    new_run: bool
    notes: list[str]  # printed by rank 0 before training: checkpoints skipped, torchrun restarts


def _new_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.name or f"{cfg.model}-{cfg.data}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
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


def _checkpoint_config(path: Path, meta: dict, overrides: dict | None = None) -> TrainConfig:
    check_checkpoint_meta(path, meta)
    try:
        return resolve_config(None, overrides, base=meta["config"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: its config is not valid for salunet {__version__} ({exc})") from None


def _resume_config(run_dir: Path, overrides: dict) -> tuple[TrainConfig, tuple | None, list[str]]:
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
    saved = None
    if (run_dir / "config.json").is_file():
        try:
            saved = json.loads((run_dir / "config.json").read_text())
        except (ValueError, OSError) as exc:
            raise ValueError(f"{run_dir / 'config.json'}: unreadable ({exc}); restore it from a checkpoint's "
                             "config or start a new run") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{run_dir / 'config.json'}: not a JSON object; restore it or start a new run")
    skipped: list[str] = []
    found = latest_checkpoint(run_dir, skipped)
    notes = [f"skipping {msg}" for msg in skipped]
    if found is None and skipped:
        raise CheckpointError(f"{run_dir}: no checkpoint loads ({skipped[0]}); restore a good checkpoint, or move "
                              "checkpoints/ away to start the run over")
    if found is not None:
        path, _, meta = found
        cfg = _checkpoint_config(path, meta, overrides)
        if saved is not None:
            diff = sorted(k for k in set(saved) | set(meta["config"])
                          if k not in _FREE_KEYS and saved.get(k) != meta["config"].get(k))
            if diff:
                k = diff[0]
                raise CheckpointError(
                    f"{path}: written by another run ({k} {meta['config'].get(k)!r}, but this run's config.json "
                    f"has {saved.get(k)!r}); move it out of {path.parent}")
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
    """Under a torchrun restart: the run directory that the failed attempt of this same job created."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    out = Path(cfg.out).expanduser()
    if not run_id or not out.is_dir():
        return None
    candidates = [out / cfg.name] if cfg.name else [p.parent for p in out.glob(f"*/{_RUN_ID_FILE}")]
    for d in candidates:
        try:
            if (d / _RUN_ID_FILE).read_text().strip() == run_id:
                return d
        except OSError:
            continue
    return None


def _resolve(config, resume, overrides: dict) -> _Plan:
    """Everything that can fail on bad input and needs no data: the config, the run directory, the
    checkpoint to resume from. Writes nothing."""
    if resume is not None:
        run_dir = Path(resume).expanduser()
        cfg, found, notes = _resume_config(run_dir, overrides)
        return _Plan(cfg, run_dir, found, False, notes)
    if isinstance(config, TrainConfig):
        cfg = resolve_config(None, overrides, base=asdict(config))
    else:
        cfg = resolve_config(None, {**(config or {}), **overrides})
    restart = D.restart_count()
    run_dir = _restart_run_dir(cfg) if restart else None
    if run_dir is not None and not ((run_dir / "config.json").is_file() or list_checkpoints(run_dir)):
        return _Plan(cfg, run_dir, None, True, [f"torchrun restart {restart} of {D.max_restarts()}: starting "
                                                f"{run_dir} over (the failed attempt saved nothing)"])
    if run_dir is not None:  # torchrun restarted this job after a failure: continue what the last attempt saved
        rcfg, found, notes = _resume_config(run_dir, {k: getattr(cfg, k) for k in RESUME_KEYS})
        diff = [k for k, v in asdict(rcfg).items() if k not in _FREE_KEYS and getattr(cfg, k) != v]
        if diff:
            raise ValueError(f"{run_dir}: the saved config differs from this command's ({diff[0]}); start a new "
                             "run with another --name")
        where = f"{found[0]} (epoch {found[2]['epoch']})" if found else "the start (no checkpoint was saved)"
        notes.append(f"torchrun restart {restart} of {D.max_restarts()}: resuming {run_dir} from {where}")
        return _Plan(rcfg, run_dir, found, False, notes)
    return _Plan(cfg, _new_run_dir(cfg), None, True, [])


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories this call created, deepest first."""
    created, p = [], path
    while not p.exists():
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return created


def _discard_new_files(run_dir: Path) -> None:
    """Remove the files a new run wrote before finishing its first epoch: they hold nothing worth keeping, and a
    leftover ``config.json`` would block re-running with the same ``--name``. Called while holding the lock."""
    for f in ("config.json", "metrics.jsonl", _RUN_ID_FILE):
        (run_dir / f).unlink(missing_ok=True)
    remove_partial_files(run_dir)


def _remove_empty_dirs(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()  # only if empty: anything else in there is not ours to delete
        except OSError:
            pass


# ---- stopping from outside: SIGTERM, a lost torchrun worker, a full disk ----------------------------------

class RunStopped(RuntimeError):
    """The run stopped before finishing for a reason outside training itself: a full disk, SIGTERM, a lost
    torchrun worker. Every finished epoch is in the last good checkpoint; ``--resume`` continues the run."""


class Terminated(BaseException):
    """Raised by :func:`stop_on_sigterm`'s handler (a BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` swallows it)."""


_STOPPING = [False]  # once a run is stopping, further SIGTERMs (torchrun sends one to every worker) are ignored


def stop_on_sigterm():
    """Make SIGTERM stop a run cleanly: the current write is abandoned (its temporary file removed), the lock
    released, and a message says what was kept. Installed by ``salunet train``; returns the previous handler
    (for ``signal.signal``) so that the caller can restore it once the message is out."""
    import signal

    def handler(signum, frame):
        if not _STOPPING[0]:
            _STOPPING[0] = True
            raise Terminated()

    _STOPPING[0] = False
    return signal.signal(signal.SIGTERM, handler)


def _is_comm_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL")))


def _short(exc: BaseException) -> str:
    """A communication error in a few words: gloo's text without its source location and advice."""
    import re

    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return text.split(". ")[0][:120]


def _stopped(exc: BaseException, run_dir: Path, info: D.DistInfo, epoch: int, kept: bool) -> RunStopped | None:
    """The RunStopped that ``exc`` (raised during epoch ``epoch``) amounts to, or None if it is not one."""
    import errno

    if isinstance(exc, Terminated):
        why = f"terminated (SIGTERM) during epoch {epoch}"
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        why = f"no space left on device while writing {exc.filename or 'to ' + str(run_dir)} (epoch {epoch})"
    elif info.enabled and _is_comm_error(exc):
        why = f"rank {info.rank} lost contact with the other ranks during epoch {epoch} (a worker died?): {_short(exc)}"
    else:
        return None
    _STOPPING[0] = True
    good = list_checkpoints(run_dir)
    if not kept:
        then = "nothing was kept; run the same command again"
    elif not good:
        then = f"no checkpoint yet; continue with --resume {run_dir}"
    else:
        then = f"the last good checkpoint is {good[-1]}; continue with --resume {run_dir}"
    restart, most = D.restart_count(), D.max_restarts()
    if info.enabled and os.environ.get("TORCHELASTIC_RUN_ID"):
        if restart < most:
            then = (f"torchrun restarts the job (restart {restart + 1} of {most}), which continues from "
                    f"{good[-1] if (kept and good) else 'the start'}")
        else:
            then += (" (under torchrun as before; torchrun --max-restarts N restarts automatically)" if most == 0
                     else f" (under torchrun as before; its {most} restart(s) are used up)")
    if isinstance(exc, OSError):
        then = "free some space; " + then
    return RunStopped(f"{why}; {then}")


# ---- the loop ---------------------------------------------------------------------------------------------

def train(config: TrainConfig | dict | None = None, *, resume: str | Path | None = None, **overrides) -> dict:
    """Train per ``config`` (a TrainConfig, or a dict of overrides) and return a summary dict.

    ``resume=RUN_DIR`` continues that run from its newest valid checkpoint (``overrides`` may change only
    :data:`RESUME_KEYS`). Under a torchrun restart (``--max-restarts``) a new-run call continues the run
    directory that the failed attempt of the same job created."""
    plan = _resolve(config, resume, overrides)  # before init: every rank checks, none wrote yet
    info = D.setup(plan.cfg.device)
    try:
        plan.run_dir = Path(D.broadcast_object(info, str(plan.run_dir)))  # one name on all ranks (a time stamp)
        return _train(plan, info)
    finally:
        D.teardown(info)


def _train(plan: _Plan, info: D.DistInfo) -> dict:
    cfg, run_dir, found, new_run = plan.cfg, plan.run_dir, plan.found, plan.new_run
    # everything that can fail on bad input (data, model) comes before a single file is written
    source = load_source(cfg, info)
    model = build_model(cfg, source.num_classes, source.in_chans, source.image_size).to(info.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay, salu_lr_scale=cfg.salu_lr_scale)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    scaler = torch.amp.GradScaler(info.device.type) if cfg.amp == "fp16" else None
    steps, total = source.steps, source.steps * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps))
    start_epoch, step = 0, 0
    if found is not None:
        start_epoch, step = _load_state(found, cfg, source, model, opt, ema, scaler)

    lock = RunLock(run_dir)
    created: list[Path] = []
    epochs_done = 0
    epoch = start_epoch
    if info.is_main:
        created = _make_dirs(run_dir)
        try:
            lock.acquire()  # refuses if another live process holds the directory (then nothing here is ours)
        except ValueError:
            _remove_empty_dirs(created)  # only the directories this call made; the files are the holder's
            raise
    try:
        if info.is_main:
            for note in plan.notes:
                print(f"salunet train: {note}", file=sys.stderr, flush=True)
            partial = remove_partial_files(run_dir)
            if partial:
                print(f"salunet train: removed {len(partial)} partial file(s) of an interrupted write "
                      f"({', '.join(p.name for p in partial)})", file=sys.stderr, flush=True)
            if info.enabled and new_run and os.environ.get("TORCHELASTIC_RUN_ID"):  # before config.json: a
                # restart then finds every directory its failed attempt could have written to
                atomic_write_bytes(run_dir / _RUN_ID_FILE, os.environ["TORCHELASTIC_RUN_ID"].encode())
            write_json_atomic(run_dir / "config.json", asdict(cfg))
            _trim_metrics(run_dir / "metrics.jsonl", start_epoch)
            print(f"salunet train: {run_dir}" + ("" if new_run else f"  (resumed at epoch {start_epoch})"))
            print("config: " + json.dumps(asdict(cfg), sort_keys=True))
            print(f"kernels: {kernels.kernel_path(info.device)}; device {info.device}; ranks {info.world}; "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters; {steps} steps/epoch", flush=True)
        train_model: nn.Module = model
        if info.enabled:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        if cfg.compile:
            train_model = torch.compile(train_model)
        amp_ctx = _autocast(cfg, info.device)
        t_run = time.perf_counter()
        for epoch in range(start_epoch, cfg.epochs):
            row = _train_epoch(cfg, info, source, model, train_model, opt, ema, scaler, amp_ctx, epoch, step,
                               total, warmup, run_dir, first=epoch == start_epoch)
            step += steps
            _check_finite_params(model, info, epoch, run_dir)
            if info.is_main:
                row["elapsed_s"] = round(time.perf_counter() - t_run, 2)
                append_jsonl(run_dir / "metrics.jsonl", row)
                ema_txt = f"  ema {100 * row['ema_test_acc']:.2f}%" if row.get("ema_test_acc") is not None else ""
                print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  test {100 * row['test_acc']:.2f}%"
                      f"{ema_txt}  lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s  {row['epoch_s']:.1f}s",
                      flush=True)
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                    _save(run_dir, cfg, model, opt, ema, scaler, epoch + 1, step, row, source)
            epochs_done += 1
            D.barrier(info)
        return _finish(run_dir, cfg) if info.is_main else {}
    except (Exception, Terminated) as exc:
        stopped = _stopped(exc, run_dir, info, epoch + 1, kept=not (new_run and epochs_done == 0))
        if stopped is None:
            raise
        raise stopped from None
    finally:
        if info.is_main:
            discard = new_run and epochs_done == 0
            if discard:  # the files while the lock still makes them ours; the (then empty) directories after
                _discard_new_files(run_dir)
            lock.release()
            if discard:
                _remove_empty_dirs([run_dir / "checkpoints", *created])


def _load_state(found, cfg: TrainConfig, source, model, opt, ema, scaler) -> tuple[int, int]:
    """Load a checkpoint into the freshly built objects; (epoch, step) to continue from. Anything that does
    not fit (another model, another data set, another version) is refused naming the file."""
    path, state, meta = found
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


def _forward(train_model: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    try:
        return train_model(x)
    except Exception as exc:  # torch.compile may wrap the error; recognise it by its text
        if "Expected more than 1 value per channel when training" in str(exc):
            raise ValueError(
                f"model {cfg.model}: BatchNorm needs more than 1 value per channel in training, but with {len(x)} "
                "image(s) per micro-batch (and rank) a layer's feature map is 1x1; use a larger --batch-size or "
                "a norm-free model such as salunet_c18") from None
        raise


def _grad_norm(model: nn.Module, clip: float) -> torch.Tensor:
    """Global gradient norm (clipping to ``clip`` if > 0): one fused pass, and the cheap finite check."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    # the norm of the per-tensor norms, as torch.nn.utils.get_total_norm computes it (that exists only from torch
    # 2.6; _foreach_norm, which clip_grad_norm_ has used since 2.0, is one fused call over all the small tensors)
    grads = [p.grad for p in params]
    if not grads:  # nothing received a gradient (e.g. a loss that does not depend on the parameters)
        return torch.zeros((), device=next(model.parameters()).device)
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [torch.linalg.vector_norm(g) for g in grads]
    return torch.linalg.vector_norm(torch.stack(list(norms)))


def _last_good(run_dir: Path) -> str:
    good = list_checkpoints(run_dir)
    return str(good[-1]) if good else "none yet"


def _timed(batches, total: list):
    """Yield from ``batches``, adding the time each item took to produce to ``total[0]``."""
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        total[0] += time.perf_counter() - t
        yield item


def _train_epoch(cfg, info, source, model, train_model, opt, ema, scaler, amp_ctx, epoch, step, total, warmup,
                 run_dir, first: bool) -> dict:
    from tqdm import tqdm

    train_model.train()
    micro, dev = cfg.accum_steps, info.device
    loss_sum = correct_sum = 0.0
    lr = cfg.lr
    agc_params = agc_parameters(model) if cfg.agc > 0 else []
    bar = tqdm(total=source.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (cfg.progress and info.is_main), dynamic_ncols=True)
    t0 = time.perf_counter()
    t_first = None
    data_s = [0.0]  # time spent producing batches (loading, augmentation): the data pipeline's share
    try:
        for s, (x, ya, yb, lam) in enumerate(_timed(source.train_batches(epoch), data_s)):
            lr = lr_at(step + s, total, warmup, cfg.lr, cfg.min_lr)
            set_lr(opt, lr)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            xs, yas, ybs = x.chunk(micro), ya.chunk(micro), yb.chunk(micro)
            step_loss = torch.zeros((), device=dev)
            step_correct = torch.zeros((), device=dev)
            for m in range(micro):
                sync = m == micro - 1 or not info.enabled
                with nullcontext() if sync else train_model.no_sync():
                    with amp_ctx:
                        logits = _forward(train_model, xs[m], cfg)
                        loss = mixed_cross_entropy(logits.float(), yas[m], ybs[m], lam, cfg.label_smoothing)
                    (scaler.scale(loss / micro) if scaler else loss / micro).backward()
                step_loss += loss.detach() / micro
                step_correct += (logits.argmax(1) == yas[m]).sum()
            if scaler:
                scaler.unscale_(opt)
            if cfg.agc > 0:
                adaptive_clip_(agc_params, cfg.agc)
            gnorm = _grad_norm(model, cfg.grad_clip)
            # one small all-reduce per step: the loss and hit count of every rank (the gradient norm is the
            # same on all ranks after DDP's average), so that all ranks log alike and stop alike
            sums = torch.stack([step_loss.double(), step_correct.double(), gnorm.double().to(dev)])
            loss_g, correct_g, gnorm_g = (D.all_reduce_sum(info, sums) / info.world).tolist()
            if not math.isfinite(loss_g):
                raise TrainingDiverged(
                    f"non-finite loss ({loss_g}) at epoch {epoch + 1}, step {s + 1}; stopped before the optimizer "
                    f"step. Last good checkpoint: {_last_good(run_dir)}. Lower --lr or set --grad-clip")
            if scaler is None and not math.isfinite(gnorm_g):  # (the fp16 grad scaler skips such steps itself)
                raise TrainingDiverged(
                    f"non-finite gradients (norm {gnorm_g}) with a finite loss at epoch {epoch + 1}, step {s + 1}; "
                    f"stopped before the optimizer step. Last good checkpoint: {_last_good(run_dir)}. Lower --lr")
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            faults.hit("step", step + s + 1)  # test hook (SALUNET_FAULT), a no-op otherwise
            loss_sum += loss_g
            correct_sum += correct_g * info.world
            if s == 0:
                t_first = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_g:.3f}", lr=f"{lr:.3g}")
    finally:
        bar.close()
    t1 = time.perf_counter()
    exclude_first = first and source.steps > 1  # the first step of a process carries its one-time costs
    startup = t_first - t0 if exclude_first else 0.0
    timed_steps = source.steps - exclude_first
    row = {"epoch": epoch + 1, "step": step + source.steps, "train_loss": loss_sum / source.steps,
           "train_acc": correct_sum / (source.steps * cfg.batch_size), "lr": lr, "epoch_s": round(t1 - t0, 3),
           "startup_s": round(startup, 3), "images_per_s": timed_steps * cfg.batch_size / (t1 - t0 - startup),
           "data_s": round(data_s[0], 3), "data_share": data_s[0] / (t1 - t0)}
    ev = evaluate(model, _hooked(source.eval_batches(), epoch + 1), amp_ctx=amp_ctx, channels_last=cfg.channels_last,
                  dist_info=info)
    row.update(test_loss=ev["loss"], test_acc=ev["acc"], test_top5=ev["top5"])
    if ema is not None:
        ee = evaluate(ema.module, source.eval_batches(), amp_ctx=amp_ctx, channels_last=cfg.channels_last,
                      dist_info=info)
        row.update(ema_test_loss=ee["loss"], ema_test_acc=ee["acc"], ema_test_top5=ee["top5"])
    row["eval_s"] = round(time.perf_counter() - t1, 3)
    return row


def _hooked(batches, epoch: int):
    """``batches`` with the ``eval`` fault-injection point after the first one (a no-op unless testing)."""
    for i, b in enumerate(batches):
        yield b
        if i == 0:
            faults.hit("eval", epoch)


@torch.no_grad()
def _check_finite_params(model: nn.Module, info: D.DistInfo, epoch: int, run_dir: Path) -> None:
    """Before anything is saved: every weight finite (one pass per epoch; the per-step gradient check catches
    almost everything, this catches an optimizer update that overflowed)."""
    bad = torch.stack([(~torch.isfinite(p)).any() for p in model.parameters()]).sum().double()
    if D.all_reduce_sum(info, bad).item() > 0:
        raise TrainingDiverged(f"parameters became non-finite during epoch {epoch + 1}; nothing saved. Last good "
                               f"checkpoint: {_last_good(run_dir)}. Lower --lr or set --grad-clip")


def _rng_state(model: nn.Module) -> dict:
    """The generators training draws from: the CPU one (data order, crops, mixes) and, on a GPU, that GPU's
    (dropout inside the model), so that a resumed run draws exactly what the uninterrupted one would."""
    rng = {"torch": torch.get_rng_state()}
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dev)
    return rng


def _save(run_dir, cfg, model, opt, ema, scaler, epoch, step, row, source) -> Path:
    state = {"model": model.state_dict(), "optim": opt.state_dict(),
             "ema": ema.state_dict() if ema is not None else None,
             "scaler": scaler.state_dict() if scaler is not None else None,
             "rng": _rng_state(model)}
    meta = {"config": asdict(cfg), "epoch": epoch, "step": step, "metrics": row, "salunet": __version__,
            "num_classes": source.num_classes, "in_chans": source.in_chans, "image_size": source.image_size,
            "mean": source.mean.flatten().tolist(), "std": source.std.flatten().tolist(),
            "torch": torch.__version__}
    if isinstance(source, FolderSource):  # label i is classes[i]: eval must map another copy of val/ the same way
        meta["classes"] = source.train_set.classes
    path = run_dir / "checkpoints" / f"epoch_{epoch:04d}.safetensors"
    save_checkpoint(path, state, meta)
    for old in list_checkpoints(run_dir)[:-cfg.keep_checkpoints]:
        old.unlink(missing_ok=True)
    return path


def _trim_metrics(path: Path, epochs_done: int) -> None:
    """On resume, drop metric lines of epochs that the checkpoint does not contain (they will be redone), so
    the file keeps exactly one line per epoch. A line cut short by a crash mid-append (always the last one) is
    dropped too; a damaged line elsewhere is an error naming the file."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON; repair or delete that line, then resume") from None
    keep = [r for r in rows if isinstance(r, dict) and r.get("epoch", 0) <= epochs_done]
    if len(keep) != len([line for line in lines if line.strip()]):
        atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep).encode())


def _finish(run_dir: Path, cfg: TrainConfig) -> dict:
    from ..analysis.plots import plot_curves

    rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    final = rows[-1] if rows else {}
    ckpts = list_checkpoints(run_dir)
    summary = {"run_dir": str(run_dir), "epochs": final.get("epoch", 0), "final": final,
               "best_test_acc": max((r["test_acc"] for r in rows), default=None),
               "checkpoint": str(ckpts[-1]) if ckpts else None}
    write_json_atomic(run_dir / "summary.json", summary)
    if rows:
        plot_curves({cfg.model: rows}, run_dir / "curves.png", title=f"{cfg.model} on {cfg.data}")
    ema_txt = (f", EMA {100 * final['ema_test_acc']:.2f}%" if final.get("ema_test_acc") is not None else "")
    print(f"final test accuracy {100 * final.get('test_acc', float('nan')):.2f}%{ema_txt}  ->  {run_dir}")
    return summary
