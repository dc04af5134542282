"""``salunet eval CHECKPOINT``: rebuild the model from the checkpoint's own config and report top-1/top-5
of the raw and EMA weights on a data set's test split (the checkpoint's data set unless told otherwise).
Image folders can be evaluated at another size than in training (``eval_size=288``: the paper's second
ResNet-50 number; the ResNets pool globally, so any size works)."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint, state_mismatch, write_json_atomic
from .config import resolve_config
from .distributed import DistInfo, resolve_device
from .loop import MemorySource, _checkpoint_config, build_model, evaluate, load_source

__all__ = ["evaluate_checkpoint", "model_from_checkpoint"]


def _load_weights(model, weights, path: Path, name: str):
    problem = state_mismatch(model.state_dict(), weights)
    if problem:
        raise CheckpointError(f"{path}: its weights do not fit model {name}, which its config names ({problem}); "
                              "the file was written for another model or altered")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model {name} ({str(exc).splitlines()[0]})") from None
    return model


def _ema_weights(state: dict, path: Path):
    ema = state.get("ema")
    if not ema:
        return None
    if not isinstance(ema, dict) or "module" not in ema:
        raise CheckpointError(f"{path}: its EMA state is malformed; the file was altered")
    return ema["module"]


def model_from_checkpoint(path: str | Path, device: str = "cpu", ema: bool = False):
    """(model, meta, state) rebuilt from a checkpoint; ``ema=True`` loads the EMA weights."""
    path = Path(path)
    state, meta = load_checkpoint(path)
    cfg = _checkpoint_config(path, meta)
    model = build_model(cfg, meta["num_classes"], meta["in_chans"], meta["image_size"])
    if ema:
        weights = _ema_weights(state, path)
        if weights is None:
            raise CheckpointError(f"{path}: has no EMA weights (its run trained with ema_decay=0); load the raw "
                                  "weights (ema=False, or leave out --ema) or pick a run that kept an EMA")
    else:
        weights = state.get("model")
    return _load_weights(model, weights, path, cfg.model).to(device), meta, state


def evaluate_checkpoint(path, *, data=None, data_path=None, batch_size=500, device="auto", out=None,
                        eval_size: int | None = None) -> dict:
    """Evaluate a checkpoint's raw (and EMA) weights; writes and returns a result dict: to ``out``, else to
    ``RUN/eval/<checkpoint>-<data>.json`` for a checkpoint in a run's ``checkpoints/``, else beside the file.

    ``eval_size`` (image folders only): evaluate at this size (resize to size/0.875, center crop)."""
    path = Path(path)
    state, meta = load_checkpoint(path)
    over = {"eval_batch_size": batch_size, "train_subset": 0, "test_subset": 0, "download": False}
    if data:
        over["data"] = data
        over["data_path"] = data_path
    elif data_path:
        over["data_path"] = data_path
    if eval_size is not None:
        over["eval_size"] = eval_size
    cfg = resolve_config(None, over, base=asdict(_checkpoint_config(path, meta)))  # its own config, then ours
    if eval_size is not None and cfg.data != "imagefolder":
        raise ValueError(f"--eval-size applies to image folders only; {cfg.data} images are evaluated at their "
                         "stored size; drop --eval-size")
    info = DistInfo(device=resolve_device(device))
    source = load_source(cfg, info, train=False, classes=meta.get("classes"))
    if (source.num_classes, source.in_chans) != (meta["num_classes"], meta["in_chans"]):
        raise ValueError(f"{path}: the model has {meta['num_classes']} classes / {meta['in_chans']} channels, "
                         f"data {cfg.data} has {source.num_classes} / {source.in_chans}; pick matching --data")
    if isinstance(source, MemorySource):  # normalise exactly as in training
        source.data.mean = torch.tensor(meta["mean"], device=info.device).view(1, -1, 1, 1)
        source.data.std = torch.tensor(meta["std"], device=info.device).view(1, -1, 1, 1)
    size = cfg.eval_size if cfg.data == "imagefolder" else source.image_size
    result = {"checkpoint": str(path), "data": cfg.data, "eval_size": size, "epoch": meta["epoch"],
              "model": cfg.model, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    model = build_model(cfg, meta["num_classes"], meta["in_chans"], meta["image_size"]).to(info.device)
    ema_weights = _ema_weights(state, path)
    _load_weights(model, state.get("model"), path, cfg.model)  # both checked before evaluating either
    if ema_weights is not None:
        _load_weights(model, ema_weights, path, cfg.model)
    for which in ("raw", "ema"):
        if which == "ema" and ema_weights is None:
            continue
        _load_weights(model, ema_weights if which == "ema" else state["model"], path, cfg.model)
        ev = evaluate(model, source.eval_batches())
        result[which] = {"top1": ev["acc"], "top5": ev["top5"], "loss": ev["loss"], "n": ev["n"]}
    suffix = f"-{size}" if cfg.data == "imagefolder" else ""
    if not out:  # RUN/eval/ for a checkpoint in its run directory, else beside the checkpoint itself
        name = f"{path.stem}-{cfg.data}{suffix}.json"
        out = path.parent.parent / "eval" / name if path.parent.name == "checkpoints" else \
            path.with_name(f"{path.stem}-eval-{cfg.data}{suffix}.json")
    write_json_atomic(out, result)
    result["written"] = str(out)
    return result
