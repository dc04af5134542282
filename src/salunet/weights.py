"""Weights that load anywhere: :func:`load_model` (a run directory, a checkpoint or an exported weights file ->
a ready model) and :func:`export_weights` (a checkpoint -> a plain safetensors state dict + the JSON config that
rebuilds the model with :func:`salunet.create_model`).

A training checkpoint holds more than a model (optimizer, EMA, RNG states), under nested keys (``s/model/...``),
so ``model.load_state_dict`` cannot read it directly. An exported weights file holds one set of weights (raw or
EMA, chosen at export) under the module's own keys, so that, without salunet's trainer::

    cfg = json.load(open("model.json"))
    model = salunet.create_model(**cfg["create_model"])
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

The bytes (safetensors with a whole-file checksum, the JSON beside) are written by
:mod:`salunet.train.checkpoint`, the one owner of on-disk formats.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .models import create_model
from .train.checkpoint import (WEIGHTS_FORMAT, CheckpointError, latest_checkpoint, safetensors_format, save_weights,
                               state_mismatch, weights_from_bytes)
from .train.config import model_kwargs
from .train.evaluate import model_from_checkpoint
from .train.resume import checkpoint_config

__all__ = ["load_model", "load_model_with_info", "export_weights"]


def _checkpoint_of(source: Path) -> Path:
    """The checkpoint a source names: the file itself, or a run directory's newest checkpoint that verifies
    (corrupt newer ones are skipped with a warning, as resume does)."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: not found; pass a run directory, a checkpoint "
                                "(RUN/checkpoints/epoch_NNNN.safetensors) or a file written by salunet export-weights")
    if not source.is_dir():
        return source
    found = latest_checkpoint(source)
    if found is None:
        raise FileNotFoundError(f"{source}: no checkpoint that loads in this directory; pass a run directory of "
                                "salunet train that saved at least one epoch, or a checkpoint file")
    return found[0]


def _pick(ema: bool | None) -> str:
    return "ema" if ema else "raw"


def load_model_with_info(source: str | Path, *, ema: bool | None = None,
                         device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """:func:`load_model`, and a dict describing what was loaded: ``create_model`` (its keyword arguments),
    ``input`` (``in_chans``, ``image_size``, the ``mean`` / ``std`` the training data was normalised with),
    ``weights`` (``"raw"`` or ``"ema"``), ``source`` (the file read), ``epoch``."""
    path = _checkpoint_of(Path(source))
    data = path.read_bytes() if path.is_file() else b""
    if safetensors_format(data) == WEIGHTS_FORMAT:
        tensors, info = weights_from_bytes(data, str(path))
        held = info.get("weights")
        if ema is not None and _pick(ema) != held:
            raise ValueError(f"{path}: holds the {held} weights only, not the {_pick(ema)} ones; leave out ema "
                             f"(or pass ema={held == 'ema'}), or export the other set from the checkpoint")
        try:
            model = create_model(**info["create_model"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: its config does not build a model ({exc}); export it again") from None
        problem = state_mismatch(model.state_dict(), tensors)
        if problem:
            raise CheckpointError(f"{path}: its weights do not fit {info['create_model'].get('name')} ({problem}); "
                                  "the file was altered")
        model.load_state_dict(tensors)
        return model.to(device).eval(), {**info, "source": str(path)}
    model, meta, _ = model_from_checkpoint(path, device=device, ema=bool(ema))
    return model.eval(), {**_describe(path, meta, ema), "source": str(path)}


def load_model(source: str | Path, *, ema: bool | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model, in eval mode on ``device``, from any of:

    - a run directory of ``salunet train`` (its newest checkpoint that verifies),
    - a checkpoint (``RUN/checkpoints/epoch_NNNN.safetensors``),
    - a weights file written by :func:`export_weights` / ``salunet export-weights``.

    ``ema``: for checkpoints, True loads the EMA of the weights (an error if the run kept none), False or None
    the raw weights; a weights file holds one set, which None takes and True/False must name.

    Raises FileNotFoundError (nothing there) or ValueError (:class:`~salunet.train.checkpoint.CheckpointError`:
    corrupt, not salunet's, weights that do not fit) with one line naming the file and the fix."""
    return load_model_with_info(source, ema=ema, device=device)[0]


def _describe(path: Path, meta: dict, ema: bool | None) -> dict:
    """The JSON config of an export from checkpoint ``path``: what rebuilds the model, and what its input is."""
    cfg = checkpoint_config(path, meta)
    kwargs = model_kwargs(cfg, meta["num_classes"], meta["in_chans"], meta["image_size"])
    return {"create_model": kwargs,
            "input": {"in_chans": meta["in_chans"], "image_size": meta["image_size"], "mean": meta.get("mean"),
                      "std": meta.get("std")},
            "weights": _pick(ema), "epoch": meta.get("epoch"), "salunet_version": __version__}


def export_weights(source: str | Path, out: str | Path, *, ema: bool | None = None) -> tuple[Path, Path]:
    """Write the raw (or, with ``ema=True``, the EMA) weights of a run directory or checkpoint to ``out`` (a
    plain safetensors state dict) and its config to ``out`` with suffix ``.json``; returns both paths.

    Before anything is written, the config is checked to be JSON and to rebuild a model that takes the weights
    (``create_model(**config["create_model"]).load_state_dict(weights)``), so a file that is written loads."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: name the weights file *.safetensors (its config goes beside it, as .json)")
    path = _checkpoint_of(Path(source))
    if safetensors_format(path.read_bytes()) == WEIGHTS_FORMAT:
        raise ValueError(f"{path}: is already an exported weights file; pass the run directory or checkpoint")
    model, meta, _ = model_from_checkpoint(path, ema=bool(ema))
    info = {**_describe(path, meta, ema), "source": str(path)}
    try:
        json.dumps(info, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its model config is not plain JSON ({exc}); it cannot be exported as a "
                         "config file") from None
    rebuilt = create_model(**info["create_model"])
    rebuilt.load_state_dict(model.state_dict())  # the promise of the file: raises here if it would not hold
    side = save_weights(out, model.state_dict(), info)
    return out, side
