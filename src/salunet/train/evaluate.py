"""``salunet eval CHECKPOINT``: rebuild the model from the checkpoint's own config and report top-1/top-5
of the raw and EMA weights on a data set's test split (the checkpoint's data set unless told otherwise).
Image folders can be evaluated at another size than in training (``eval_size=288``: the paper's second
ResNet-50 number; the ResNets pool globally, so any size works)."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .._modes import eval_modes
from .checkpoint import (CheckpointError, load_checkpoint, refuse_to_overwrite_inputs, state_mismatch,
                         write_json_atomic)
from .rundir import RunDir
from .config import TrainConfig, build_model, resolve_config
from . import distributed as D
from .distributed import DistInfo, resolve_device
from .resume import checkpoint_config
from .sources import MemorySource, load_source

__all__ = ["evaluate", "autocast_for", "amp_note", "evaluate_checkpoint", "model_from_checkpoint"]


def autocast_for(cfg: TrainConfig, device: torch.device):
    """The autocast context of ``cfg.amp`` on ``device`` (a no-op context for "none")."""
    if cfg.amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


def cpu_has_native(amp: str) -> bool | None:
    """Whether this CPU runs ``amp`` ("bf16" / "fp16") natively in torch's oneDNN (AVX512-BF16, AMX, AVX512-FP16);
    None when this torch cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported() if amp == "bf16"
                    else torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return None


def amp_note(amp: str, device: torch.device) -> str | None:
    """The line a run prints when ``--amp`` takes a slow path: on a CPU without native half precision, torch's
    convolutions and matrix products fall back to reference loops (on this project's AVX2 CPUs a SaluNet-C-18 step
    at width 16 took 15x its float32 time, a convolution 53x: scripts/cpu_amp_cost.py, docs/BENCHMARKS.md). None
    where nothing is slow."""
    if amp == "none" or device.type != "cpu" or cpu_has_native(amp) is not False:
        return None
    return (f"amp: {amp} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native {amp} in oneDNN) runs "
            "torch's convolutions and matrix products on slow fallback paths (a step ~15x float32's); --amp none "
            "trains faster here (--amp is for GPUs and CPUs with AVX512-BF16 / AMX)")


@torch.no_grad()
def evaluate(model: nn.Module, batches, *, amp_ctx=None, channels_last: bool = False,
             dist_info: D.DistInfo | None = None) -> dict:
    """Top-1 / top-5 accuracy and mean loss of ``model`` over ``batches`` of (x, y).

    With ``dist_info`` of a multi-process run, each rank passes its own shard and the sums are all-reduced:
    every rank returns the result over the whole set."""
    n, sums = 0, None  # sums: (loss, top-1 hits, top-5 hits) on the model's device, read once at the end, so a
    with eval_modes(model):  # GPU is never made to wait for the host batch by batch
        for x, y in batches:
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
    cfg = checkpoint_config(path, meta)
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
    if out:
        refuse_to_overwrite_inputs(out, {"the checkpoint": path, "the data": data_path})
    state, meta = load_checkpoint(path)
    over = {"eval_batch_size": batch_size, "train_subset": 0, "test_subset": 0, "download": False}
    if data:
        over["data"] = data
        over["data_path"] = data_path
    elif data_path:
        over["data_path"] = data_path
    if eval_size is not None:
        over["eval_size"] = eval_size
    saved = asdict(checkpoint_config(path, meta))
    if over.get("data", saved["data"]) == "imagefolder":  # the size and channels the model was trained at, not
        # whatever another copy of the images would suggest (None in the config = they came from the data)
        over.update(image_size=meta["image_size"], in_chans=meta["in_chans"])
    cfg = resolve_config(None, over, base=saved)  # its own config, then ours
    if eval_size is not None and cfg.data != "imagefolder":
        raise ValueError(f"--eval-size applies to image folders only; {cfg.data} images are evaluated at their "
                         "stored size; drop --eval-size")
    info = DistInfo(device=resolve_device(device))
    source = load_source(cfg, info, train=False, classes=meta.get("classes"))
    if (source.num_classes, source.in_chans) != (meta["num_classes"], meta["in_chans"]):
        raise ValueError(f"{path}: the model has {meta['num_classes']} classes / {meta['in_chans']} channels, "
                         f"data {cfg.data} has {source.num_classes} / {source.in_chans}; pick matching --data")
    if cfg.data != "imagefolder" and source.image_size != meta["image_size"]:  # (folders are resized to fit)
        raise ValueError(f"{path}: the model was trained on {meta['image_size']} px images, data {cfg.data} has "
                         f"{source.image_size} px; pick data of the same size")
    if isinstance(source, MemorySource):  # normalise exactly as in training
        source.data.mean = torch.tensor(meta["mean"], device=info.device).view(1, -1, 1, 1)
        source.data.std = torch.tensor(meta["std"], device=info.device).view(1, -1, 1, 1)
    size = (cfg.eval_size or cfg.image_size) if cfg.data == "imagefolder" else source.image_size
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
        run = RunDir.of_checkpoint(path)
        out = run.eval_file(name) if run is not None else path.with_name(f"{path.stem}-eval-{cfg.data}{suffix}.json")
    write_json_atomic(out, result)
    result["written"] = str(out)
    return result
