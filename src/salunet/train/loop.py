"""The training loop: ``train(config) -> dict`` (also ``salunet train``).

Reproducibility and exact resume (CPU, bitwise): the model is built right after ``torch.manual_seed(seed)``;
the data order and every augmentation draw of epoch ``e`` come from a generator seeded with (seed, e), so
an epoch replays identically whether or not the process restarted; the global RNG state (dropout) is saved
in each checkpoint with the model, optimizer, EMA, grad-scaler and step counter.

Data parallelism (torchrun): for in-memory data every rank draws the *global* batch and its augmentation
from the same generator and keeps its own slice, so N ranks see exactly the samples, crops and mixes that
one process with the same global batch sees; DDP averages gradients. Folder data uses DistributedSampler.

Failure behaviour: bad input is rejected before anything is written; a non-finite loss stops the run
(:class:`TrainingDiverged`) without writing a checkpoint, so the last good one stays the newest.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..data import (ImageFolder, load_arrays, mix_batch, mixed_cross_entropy, random_crop, random_flip,
                    to_memory)
from ..models import create_model, list_models
from ..nn import SaluFamily, kernels
from . import distributed as D
from .checkpoint import (RunLock, append_jsonl, latest_checkpoint, list_checkpoints, read_jsonl, save_checkpoint,
                         write_json_atomic)
from .config import TrainConfig, parse_value, resolve_config
from .ema import EMA

__all__ = ["train", "evaluate", "build_model", "lr_at", "param_groups", "TrainingDiverged", "RESUME_KEYS"]

RESUME_KEYS = ("epochs", "progress", "device", "workers", "checkpoint_every", "keep_checkpoints")
_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint is kept."""


# ---- pieces -----------------------------------------------------------------------------------------------

def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv kernels and Linear weight matrices only; SALU/SWALU/GALU parameters, biases,
    norm gains, embeddings and tokens are not decayed. Asserts every parameter is in exactly one group."""
    decay_ids = {id(m.weight) for m in model.modules()
                 if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and not isinstance(m, SaluFamily)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    n = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay) + len(no_decay) == n and not ({id(p) for p in decay} & {id(p) for p in no_decay})
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    if cfg.model not in list_models():
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(list_models())}")
    kw = dict(cfg.model_overrides)
    if cfg.model in ("salunet_t", "vit_ln") and "img_size" not in kw:
        kw["img_size"] = image_size
        if image_size % 4:
            kw.setdefault("patch", 2 if image_size % 2 == 0 else 1)
    torch.manual_seed(cfg.seed)
    return create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, width=cfg.width,
                        norm_layer=cfg.norm_layer, act_layer=cfg.act_layer, **kw)


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(groups, lr=cfg.lr)


def _epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + rank)


class MemorySource:
    """Batches from a data set resident on the device; augmentation as batched tensor ops."""

    def __init__(self, data, cfg: TrainConfig, info: D.DistInfo) -> None:
        self.data, self.cfg, self.info = data, cfg, info
        if cfg.batch_size % (info.world * cfg.accum_steps):
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by ranks x accum_steps "
                             f"({info.world} x {cfg.accum_steps})")
        self.steps = len(data.x_train) // cfg.batch_size
        if self.steps == 0:
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set "
                             f"({len(data.x_train)} images); lower --batch-size")
        self.num_classes, self.in_chans, self.image_size = data.num_classes, data.in_chans, data.image_size
        self.mean, self.std = data.mean, data.std

    def train_batches(self, epoch: int):
        cfg, B = self.cfg, self.cfg.batch_size
        g = _epoch_generator(cfg.seed, epoch)
        perm = torch.randperm(len(self.data.x_train), generator=g).to(self.data.x_train.device)
        b = B // self.info.world
        lo = self.info.rank * b
        for s in range(self.steps):
            idx = perm[s * B:(s + 1) * B]
            x = self.data.x_train[idx]  # (B, C, H, W) uint8, the global batch
            x = random_crop(x, cfg.crop_padding, g)
            if cfg.flip:
                x = random_flip(x, g)
            x = self.data.normalize(x)
            x, ya, yb, lam = mix_batch(x, self.data.y_train[idx], cfg.mixup, cfg.cutmix, g)
            yield x[lo:lo + b], ya[lo:lo + b], yb[lo:lo + b], lam

    def eval_batches(self):
        d, n = self.data, self.cfg.eval_batch_size
        for i in range(0, len(d.x_test), n):
            yield d.normalize(d.x_test[i:i + n]), d.y_test[i:i + n]


class FolderSource:
    """ImageNet-style folders through DataLoader workers (Pillow decoding), sharded by DistributedSampler."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo) -> None:
        if cfg.data_path is None:
            raise ValueError("data 'imagefolder' needs --data-path ROOT with ROOT/train/<class>/ and ROOT/val/<class>/")
        root = Path(cfg.data_path).expanduser()
        self.train_set = ImageFolder(root / "train", train=True, size=cfg.image_size, seed=cfg.seed)
        self.val_set = ImageFolder(root / "val", train=False, size=cfg.eval_size, classes=self.train_set.classes)
        if cfg.batch_size % (info.world * cfg.accum_steps):
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by ranks x accum_steps")
        self.cfg, self.info = cfg, info
        self.local_batch = cfg.batch_size // info.world
        self.steps = len(self.train_set) // cfg.batch_size
        if self.steps == 0:
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({len(self.train_set)})")
        self.num_classes, self.in_chans, self.image_size = len(self.train_set.classes), 3, cfg.image_size
        self.mean, self.std = _IMAGENET_MEAN.to(info.device), _IMAGENET_STD.to(info.device)

    def _loader(self, ds, batch, shuffle, epoch):
        from torch.utils.data import DataLoader, DistributedSampler

        sampler = None
        gen = None
        if self.info.enabled:
            sampler = DistributedSampler(ds, self.info.world, self.info.rank, shuffle=shuffle, seed=self.cfg.seed,
                                         drop_last=shuffle)
            sampler.set_epoch(epoch)
        elif shuffle:
            gen = _epoch_generator(self.cfg.seed, epoch)
        return DataLoader(ds, batch_size=batch, shuffle=shuffle and sampler is None, sampler=sampler,
                          generator=gen, num_workers=self.cfg.workers, drop_last=shuffle,
                          pin_memory=self.info.device.type == "cuda")

    def train_batches(self, epoch: int):
        self.train_set.set_epoch(epoch)
        g = _epoch_generator(self.cfg.seed, epoch, self.info.rank)
        for s, (x, y) in enumerate(self._loader(self.train_set, self.local_batch, True, epoch)):
            if s >= self.steps:
                break
            x = (x.to(self.info.device, non_blocking=True).float() - self.mean) / self.std
            yield mix_batch(x, y.to(self.info.device), self.cfg.mixup, self.cfg.cutmix, g)

    def eval_batches(self):
        for x, y in self._loader(self.val_set, self.cfg.eval_batch_size, False, 0):
            yield (x.to(self.info.device).float() - self.mean) / self.std, y.to(self.info.device)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, batches, *, amp_ctx=None, channels_last: bool = False) -> dict:
    """Top-1 / top-5 accuracy and mean loss of ``model`` over ``batches`` of (x, y)."""
    was = model.training
    model.eval()
    n = correct = correct5 = 0
    loss = 0.0
    for x, y in batches:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_ctx or nullcontext():
            logits = model(x)
        logits = logits.float()
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        n += len(y)
    model.train(was)
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1), "top5": correct5 / max(n, 1), "n": n}


def _load_source(cfg: TrainConfig, info: D.DistInfo):
    if cfg.data == "imagefolder":
        return FolderSource(cfg, info)
    arrays = load_arrays(cfg.data, cfg.data_path, download=cfg.download and info.is_main)
    return MemorySource(to_memory(arrays, info.device, cfg.train_subset, cfg.test_subset), cfg, info)


def _new_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.name or f"{cfg.model}-{cfg.data}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out).expanduser() / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir}: run directory already exists; continue it with --resume {run_dir} or "
                         "choose another --name")
    return run_dir


def _resume_config(run_dir: Path, overrides: dict) -> tuple[TrainConfig, tuple | None]:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory to resume")
    bad = sorted(set(overrides) - set(RESUME_KEYS))
    if bad:
        raise ValueError(f"--resume continues the saved config; only {', '.join(RESUME_KEYS)} may be changed, "
                         f"not {', '.join(bad)}")
    found = latest_checkpoint(run_dir)
    if found is not None:
        base = found[2]["config"]
    elif (run_dir / "config.json").is_file():
        base = json.loads((run_dir / "config.json").read_text())
    else:
        raise ValueError(f"{run_dir}: not a salunet run directory (no config.json, no checkpoint)")
    return resolve_config(None, overrides, base={k: v for k, v in base.items()}), found


# ---- the loop ---------------------------------------------------------------------------------------------

def train(config: TrainConfig | dict | None = None, *, resume: str | Path | None = None, **overrides) -> dict:
    """Train per ``config`` (a TrainConfig, or a dict of overrides) and return a summary dict.

    ``resume=RUN_DIR`` continues that run from its newest valid checkpoint (``overrides`` may change only
    :data:`RESUME_KEYS`)."""
    info = D.setup((overrides.get("device") if overrides.get("device") else
                    (config.device if isinstance(config, TrainConfig) else (config or {}).get("device", "auto"))))
    try:
        return _train(config, resume, overrides, info)
    finally:
        D.teardown(info)


def _train(config, resume, overrides, info: D.DistInfo) -> dict:
    # 1. resolve everything that can fail on bad input before a single file is written
    found = None
    if resume is not None:
        run_dir = Path(resume).expanduser()
        cfg, found = _resume_config(run_dir, overrides)
    else:
        if isinstance(config, TrainConfig):
            cfg = resolve_config(None, overrides, base={k: v for k, v in asdict(config).items()})
        else:
            cfg = resolve_config(None, {**(config or {}), **overrides})
        run_dir = _new_run_dir(cfg)
    source = _load_source(cfg, info)
    model = build_model(cfg, source.num_classes, source.in_chans, source.image_size).to(info.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = _make_optimizer(cfg, model)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    scaler = torch.amp.GradScaler(info.device.type) if cfg.amp == "fp16" else None
    steps, total = source.steps, source.steps * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps))
    start_epoch, step = 0, 0
    if found is not None:
        path, state, meta = found
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch, step = int(meta["epoch"]), int(meta["step"])

    lock = RunLock(run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        if info.is_main:
            write_json_atomic(run_dir / "config.json", asdict(cfg))
            _trim_metrics(run_dir / "metrics.jsonl", start_epoch)
            print(f"salunet train: {run_dir}  (resumed at epoch {start_epoch})" if found else f"salunet train: {run_dir}")
            print("config: " + json.dumps(asdict(cfg), sort_keys=True))
            print(f"kernels: {kernels.kernel_path(info.device)}; device {info.device}; ranks {info.world}; "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters; {steps} steps/epoch")
        train_model: nn.Module = model
        if info.enabled:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        if cfg.compile:
            train_model = torch.compile(train_model)
        amp_ctx = _autocast(cfg, info.device)
        last = None
        t_run = time.time()
        for epoch in range(start_epoch, cfg.epochs):
            last = _train_epoch(cfg, info, source, model, train_model, opt, ema, scaler, amp_ctx, epoch, step,
                                total, warmup, run_dir)
            step += steps
            if info.is_main:
                row = last
                row["elapsed_s"] = round(time.time() - t_run, 2)
                append_jsonl(run_dir / "metrics.jsonl", row)
                ema_txt = f"  ema {100 * row['ema_test_acc']:.2f}%" if row.get("ema_test_acc") is not None else ""
                print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  test {100 * row['test_acc']:.2f}%"
                      f"{ema_txt}  lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s  {row['epoch_s']:.1f}s",
                      flush=True)
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                    _save(run_dir, cfg, model, opt, ema, scaler, epoch + 1, step, row, source)
            D.barrier(info)
        summary = _finish(run_dir, cfg, info) if info.is_main else {}
        return summary
    finally:
        if info.is_main:
            lock.release()


def _train_epoch(cfg, info, source, model, train_model, opt, ema, scaler, amp_ctx, epoch, step, total, warmup,
                 run_dir) -> dict:
    from tqdm import tqdm

    train_model.train()
    t0 = time.time()
    loss_sum, correct, seen = 0.0, 0, 0
    micro = cfg.accum_steps
    bar = tqdm(total=source.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (cfg.progress and info.is_main), dynamic_ncols=True)
    for s, (x, ya, yb, lam) in enumerate(source.train_batches(epoch)):
        lr = lr_at(step + s, total, warmup, cfg.lr, cfg.min_lr)
        for gr in opt.param_groups:
            gr["lr"] = lr
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xs, yas, ybs = x.chunk(micro), ya.chunk(micro), yb.chunk(micro)
        step_loss = 0.0
        for m in range(micro):
            sync = m == micro - 1 or not info.enabled
            ctx = nullcontext() if sync else train_model.no_sync()
            with ctx:
                with amp_ctx:
                    logits = train_model(xs[m])
                    loss = mixed_cross_entropy(logits.float(), yas[m], ybs[m], lam, cfg.label_smoothing)
                (scaler.scale(loss / micro) if scaler else loss / micro).backward()
            lv = loss.item()
            if not math.isfinite(lv):
                bar.close()
                good = list_checkpoints(run_dir)
                raise TrainingDiverged(
                    f"non-finite loss ({lv}) at epoch {epoch + 1}, step {s + 1}; stopped. Last good checkpoint: "
                    f"{good[-1] if good else 'none yet'}. Lower --lr or set --grad-clip")
            step_loss += lv / micro
            correct += (logits.argmax(1) == yas[m]).sum().item()
            seen += len(yas[m])
        if scaler:
            scaler.unscale_(opt)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        loss_sum += step_loss
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.3g}")
    bar.close()
    seconds = time.time() - t0
    row = {"epoch": epoch + 1, "step": step + source.steps, "train_loss": loss_sum / source.steps,
           "train_acc": correct / max(seen, 1), "lr": lr, "epoch_s": round(seconds, 3),
           "images_per_s": source.steps * cfg.batch_size / seconds}
    if info.is_main:
        ev = evaluate(model, source.eval_batches(), amp_ctx=amp_ctx, channels_last=cfg.channels_last)
        row.update(test_loss=ev["loss"], test_acc=ev["acc"], test_top5=ev["top5"])
        if ema is not None:
            ee = evaluate(ema.module, source.eval_batches(), amp_ctx=amp_ctx, channels_last=cfg.channels_last)
            row.update(ema_test_loss=ee["loss"], ema_test_acc=ee["acc"], ema_test_top5=ee["top5"])
    return row


def _save(run_dir, cfg, model, opt, ema, scaler, epoch, step, row, source) -> Path:
    state = {"model": model.state_dict(), "optim": opt.state_dict(),
             "ema": ema.state_dict() if ema is not None else None,
             "scaler": scaler.state_dict() if scaler is not None else None,
             "rng": {"torch": torch.get_rng_state()}}
    meta = {"config": asdict(cfg), "epoch": epoch, "step": step, "metrics": row, "salunet": __version__,
            "num_classes": source.num_classes, "in_chans": source.in_chans, "image_size": source.image_size,
            "mean": source.mean.flatten().tolist(), "std": source.std.flatten().tolist(),
            "torch": torch.__version__}
    path = run_dir / "checkpoints" / f"epoch_{epoch:04d}.safetensors"
    save_checkpoint(path, state, meta)
    for old in list_checkpoints(run_dir)[:-cfg.keep_checkpoints]:
        old.unlink(missing_ok=True)
    return path


def _trim_metrics(path: Path, epochs_done: int) -> None:
    """On resume, drop metric lines of epochs that the checkpoint does not contain (they will be redone)."""
    if not path.is_file():
        return
    rows = read_jsonl(path)
    keep = [r for r in rows if r.get("epoch", 0) <= epochs_done]
    if len(keep) != len(rows):
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep).encode())


def _finish(run_dir: Path, cfg: TrainConfig, info) -> dict:
    from ..plots import plot_curves

    rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    final = rows[-1] if rows else {}
    summary = {"run_dir": str(run_dir), "epochs": final.get("epoch", 0), "final": final,
               "best_test_acc": max((r["test_acc"] for r in rows), default=None),
               "checkpoint": str(list_checkpoints(run_dir)[-1]) if list_checkpoints(run_dir) else None}
    write_json_atomic(run_dir / "summary.json", summary)
    if rows:
        plot_curves({cfg.model: rows}, run_dir / "curves.png", title=f"{cfg.model} on {cfg.data}")
    ema_txt = (f", EMA {100 * final['ema_test_acc']:.2f}%" if final.get("ema_test_acc") is not None else "")
    print(f"final test accuracy {100 * final.get('test_acc', float('nan')):.2f}%{ema_txt}  ->  {run_dir}")
    return summary


def apply_overrides(pairs: dict) -> dict:
    """Type-check a dict of string overrides (CLI) against TrainConfig."""
    return {k: parse_value(k, v) for k, v in pairs.items()}

