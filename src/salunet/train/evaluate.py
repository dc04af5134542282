"""``salunet eval CHECKPOINT``: rebuild the model from the checkpoint's own config and report top-1/top-5
of the raw and EMA weights on a data set's test split (the checkpoint's data set unless told otherwise)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint, write_json_atomic
from .config import resolve_config
from .distributed import DistInfo, _resolve_device
from .loop import MemorySource, FolderSource, build_model, evaluate, _load_source

__all__ = ["evaluate_checkpoint", "model_from_checkpoint"]


def model_from_checkpoint(path: str | Path, device: str = "cpu", ema: bool = False):
    """(model, meta) rebuilt from a checkpoint; ``ema=True`` loads the EMA weights."""
    state, meta = load_checkpoint(Path(path))
    cfg = resolve_config(None, base=meta["config"])
    model = build_model(cfg, meta["num_classes"], meta["in_chans"], meta["image_size"])
    weights = state["ema"]["module"] if ema and state.get("ema") else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model {cfg.model} ({str(exc).splitlines()[0]})") from None
    return model.to(device), meta, state


def evaluate_checkpoint(path, *, data=None, data_path=None, batch_size=500, device="auto", out=None) -> dict:
    path = Path(path)
    state, meta = load_checkpoint(path)
    over = {"eval_batch_size": batch_size, "train_subset": 0, "test_subset": 0, "download": False}
    if data:
        over["data"] = data
        over["data_path"] = data_path
    elif data_path:
        over["data_path"] = data_path
    cfg = resolve_config(None, over, base=meta["config"])
    info = DistInfo(device=_resolve_device(device, 0))
    source = _load_source(cfg, info)
    if (source.num_classes, source.in_chans) != (meta["num_classes"], meta["in_chans"]):
        raise ValueError(f"{path}: the model has {meta['num_classes']} classes / {meta['in_chans']} channels, "
                         f"data {cfg.data} has {source.num_classes} / {source.in_chans}; pick matching --data")
    if isinstance(source, MemorySource):  # normalise exactly as in training
        source.data.mean = torch.tensor(meta["mean"], device=info.device).view(1, -1, 1, 1)
        source.data.std = torch.tensor(meta["std"], device=info.device).view(1, -1, 1, 1)
    result = {"checkpoint": str(path), "data": cfg.data, "epoch": meta["epoch"], "model": cfg.model,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for which in ("raw", "ema"):
        if which == "ema" and not state.get("ema"):
            continue
        model, _, _ = model_from_checkpoint(path, info.device, ema=which == "ema")
        ev = evaluate(model, source.eval_batches())
        result[which] = {"top1": ev["acc"], "top5": ev["top5"], "loss": ev["loss"], "n": ev["n"]}
    out = Path(out) if out else path.parent.parent / "eval" / f"{path.stem}-{cfg.data}.json"
    write_json_atomic(out, result)
    result["written"] = str(out)
    return result
