"""Training configuration: one dataclass of defaults, named recipes that hold only overrides, and
type-checked overrides applied last (unknown keys are errors). The resolved config is printed, saved as
``config.json`` in the run directory and stored inside every checkpoint.

Recipes (docs/SPEC.md section 4; **[decided]** where the paper is silent):
- ``cifar-resnet``: SaluNet-C-18 on CIFAR-10, 300 epochs, SGD-Nesterov lr 0.1 (batch 128), weight decay
  5e-4, 5 warm-up epochs + cosine, label smoothing 0.1, mixup 0.2 / cutmix 1.0, crop+flip, EMA 0.9997 (the
  paper's SaluNet decay; use ema_decay=0.997 for the BN ResNet, as the paper does).
- ``cifar-vit``: SaluNet-T, the ViT-CIFAR recipe: 200 epochs, batch 128, Adam lr 1e-3 -> 1e-5 cosine,
  5 warm-up epochs, weight decay 5e-5, label smoothing 0.1, dropout 0. Departure: AutoAugment is not
  implemented (crop + flip instead).
- ``imagenet-resnet``: SaluNet-C-50 on an image folder, "ResNet strikes back"-style: 100 epochs, batch 256,
  SGD-Nesterov with the linear scaling rule lr = 0.1 x batch/256 (Goyal et al.), 5 warm-up epochs, label
  smoothing 0.1, mixup 0.1 / cutmix 1.0, EMA 0.9998, bfloat16 autocast, evaluation at 224 (``eval_size=288``
  for the paper's second number).
- ``cpu-quick``: the embedded digits set, SaluNet-C-18 at width 16, 6 epochs: the same values as the
  defaults, pinned here so that the recipe stays fixed if the defaults change.

The defaults are the ``cpu-quick`` settings, so that a bare ``salunet train`` trains on the embedded digits
set in well under two minutes on 2 CPU cores (measured 2026-11-24: 6-12 s of training, 95-96% test accuracy
over seeds 0-3). They are *not* a CIFAR or ImageNet recipe (width 16, 1-pixel crop padding, no flips): start
those from a named recipe. A recipe therefore lists every field in which it departs from these defaults.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..models import MODEL_CONFIGS, create_model, list_models, model_train_defaults

__all__ = ["TrainConfig", "FIELD_HELP", "RECIPES", "resolve_config", "parse_value", "coerce_value", "field_types",
           "field_choices", "config_from_json", "build_model", "model_kwargs", "declared_in_use"]


@dataclass
class TrainConfig:
    # what
    model: str = "salunet_c18"
    width: int | None = 16  # base channels / hidden size; None = the paper's (64 for the ResNets)
    norm_layer: str | None = None  # override the model's norm (e.g. "batchnorm" for the ablation)
    act_layer: str | None = None
    model_overrides: dict = field(default_factory=dict)  # extra create_model(**kw), e.g. {"salu_b0": 0.3}
    data: str = "digits"  # digits | cifar10 | cifar100 | npz | imagefolder
    data_path: str | None = None
    download: bool = False
    train_subset: int = 0  # first N training images only (0 = all); the shared CIFAR copy is class-balanced
    test_subset: int = 0
    # how long, how big
    epochs: int = 6
    batch_size: int = 64  # global batch (split across DDP ranks)
    eval_batch_size: int = 500
    accum_steps: int = 1  # micro-batches per optimizer step (batch_size is per optimizer step)
    # optimiser and schedule
    optimizer: str = "sgd"  # sgd (Nesterov) | adamw | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on conv kernels and weight matrices only
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    agc: float = 0.0  # adaptive gradient clipping factor (unit-wise, NFNets); 0 = off (train/optim.py)
    salu_lr_scale: float = 1.0  # learning-rate multiplier for SALU/SWALU/GALU parameters (log a, log b)
    salu_recalibrate: float = 0.0  # after each epoch but the last, pin sqrt(ab)*rms(SALU input) to this; 0 = off
    salu_recalibrate_every: int = 0  # > 0: pin it every this many steps instead (on --salu-recalibrate-measure's images); 0 = per epoch
    salu_recalibrate_rate: float = 1.0  # momentum of the running mean square pinned (as BN's running var); 1 = batch
    salu_recalibrate_measure: str = "forward"  # per-step pinning measures in one more forward, or in the step's own
    # (step), or pins on fixed reference images (reference)
    salu_reference_images: int = 128  # --salu-recalibrate-measure reference: how many images (epoch 1's first)
    salu_eval_pin: int = 0  # > 0: before each evaluation, pin on the average of the epoch's first N batches
    salu_project_grad: bool = False  # SALU inputs' gradients lose their per-channel radial part (a normaliser's backward)
    salu_project_grad_rate: float = 1.0  # < 1: ... with the coefficient of running sums over steps; 1 = the batch's
    # regularisation and augmentation
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0
    crop_padding: int | None = None  # pad-and-crop shift; None = size/8 rounded (8x8 digits: 1; 28-32 px: 4)
    flip: bool = False  # digits are not mirror-symmetric; the CIFAR / ImageNet recipes flip
    ema_decay: float = 0.99  # 0 = no EMA; the paper: 0.9997 SaluNet, 0.997 BN ResNet
    # images from folders (data/folders.py): None = from the data
    image_size: int | None = None  # None = the images' own size (mixed sizes: median shorter side, at most 224)
    eval_size: int | None = None  # None = image_size
    in_chans: int | None = None  # None = 1 for grayscale folders, else 3; 1 or 3 converts every image
    crop: str = "auto"  # auto (pad for <= 64 px, else resized) | pad (CIFAR-style) | resized (ImageNet-style)
    crop_scale: float = 0.08  # resized crop: smallest area fraction (ImageNet's 0.08; larger is gentler)
    workers: int = 2
    dist_timeout: float = 600.0  # seconds a torchrun rank waits for the others in a collective
    # execution
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    out: str = "runs"
    name: str | None = None  # run directory name (default: <model>-<data>-s<seed>-<time>)
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 2
    progress: bool = True
    logger: str = "none"  # none | tensorboard (train/loggers.py)
    log_steps: bool = False  # one JSON line per optimizer step in steps.jsonl
    recipe: str | None = None  # informational: the recipe the run started from


# One line per field: `salunet train --help` is generated from these (a test checks that every field has one).
FIELD_HELP: dict[str, str] = {
    "model": "registered model to train",
    "width": "base channels (ResNets) or hidden size (ViT); none = the paper's (64 for the ResNets)",
    "norm_layer": "replace the model's norm layers by this kind (the ablation); none = the model's own",
    "act_layer": "replace the model's activations by this kind; none = the model's own",
    "model_overrides": "extra create_model keyword arguments as a JSON object, e.g. '{\"salu_b0\": 0.3}'",
    "data": "data set (digits is embedded; the others read --data-path)",
    "data_path": "file or folder of the data set (an .npz, a CIFAR archive or folder, an image-folder root)",
    "download": "download CIFAR into --data-path if it is not there (checksum-verified)",
    "train_subset": "train on the first N training images only (0 = all)",
    "test_subset": "evaluate on the first N test images only (0 = all)",
    "epochs": "training epochs",
    "batch_size": "global batch per optimizer step (split across torchrun ranks)",
    "eval_batch_size": "batch size of evaluation",
    "accum_steps": "micro-batches per optimizer step (gradient accumulation; --batch-size stays per step)",
    "optimizer": "optimizer (sgd = SGD with Nesterov momentum)",
    "lr": "peak learning rate (after warm-up, before the cosine decay)",
    "momentum": "SGD momentum (0 = plain SGD)",
    "weight_decay": "weight decay of conv kernels and weight matrices (never of SALU/gate parameters or biases)",
    "warmup_epochs": "linear learning-rate warm-up, in epochs (fractions allowed)",
    "min_lr": "learning rate at the end of the cosine decay",
    "grad_clip": "clip the global gradient norm to this value (0 = off)",
    "agc": "adaptive gradient clipping factor, unit-wise as in NFNets (0 = off)",
    "salu_lr_scale": "learning-rate multiplier of the SALU/SWALU/GALU parameters (log a, log b)",
    "salu_recalibrate": "after each epoch but the last, scale each SALU's a and b so that sqrt(ab) * rms(input) is "
                        "this (0 = off)",
    "salu_recalibrate_every": "with --salu-recalibrate: recalibrate every this many steps (measured as "
                              "--salu-recalibrate-measure says) instead of once an epoch (0 = once an epoch)",
    "salu_recalibrate_rate": "with --salu-recalibrate: the momentum of the SALU inputs' running mean square that "
                             "is pinned (1 = this batch only)",
    "salu_recalibrate_measure": "per-step pins from: forward = one more forward; step = the training forward, a "
                                "step late (rate <= 0.5); reference = fixed images (--salu-reference-images)",
    "salu_reference_images": "with --salu-recalibrate-measure reference: pin on epoch 1's first this many "
                             "training images (all, if it has fewer)",
    "salu_eval_pin": "per-step pinning: before each evaluation, pin every SALU on the average of the epoch's "
                     "first N training batches (0 = off)",
    "salu_project_grad": "drop each SALU input gradient's per-channel part along the input: a scale "
                         "normaliser's backward, forward unchanged",
    "salu_project_grad_rate": "with --salu-project-grad: momentum of the running sums (over steps, restarted "
                              "each epoch) whose ratio is removed; 1 = the step's batch alone",
    "label_smoothing": "label smoothing of the cross-entropy, in [0, 1)",
    "mixup": "mixup: alpha of Beta(alpha, alpha) (0 = off)",
    "cutmix": "cutmix: alpha of Beta(alpha, alpha) (0 = off)",
    "crop_padding": "random crops after padding by this many pixels (0 = no crop; none = image size / 8)",
    "flip": "random horizontal flips",
    "ema_decay": "decay of the EMA of the weights, evaluated beside the raw weights (0 = no EMA)",
    "image_size": "image folders: training size (none = the images' own; a larger one upsamples, with a warning)",
    "eval_size": "image folders: evaluation size (none = image_size; 288 for the paper's second ResNet-50 number)",
    "in_chans": "image folders: input channels, 1 or 3 (none = 1 for grayscale images, else 3)",
    "crop": "image folders: training crop (auto = pad for images of <= 64 px, resized above)",
    "crop_scale": "image folders, --crop resized: smallest area fraction of the crop (ImageNet 0.08)",
    "workers": "image folders: data-loading worker processes",
    "dist_timeout": "torchrun: seconds a rank waits for the others (a stopped or hung rank ends the run after this)",
    "device": "auto | cpu | cuda | cuda:N (auto: the GPU if there is one)",
    "amp": "autocast dtype (fp16 adds a grad scaler); for GPUs: ~15x slower on a CPU without native bf16 (salunet doctor)",
    "channels_last": "channels-last memory format for the model and batches",
    "compile": "torch.compile the model",
    "seed": "seed of the initial weights, the data order and the augmentation",
    "out": "folder in which the run directory is created",
    "name": "run directory name; none = <model>-<data>-s<seed>-<time>",
    "checkpoint_every": "save a checkpoint every N epochs (and after the last)",
    "keep_checkpoints": "keep the N newest checkpoints",
    "progress": "a progress bar during each epoch",
    "logger": "also write TensorBoard events to RUN/tensorboard: scalars per step and per epoch, with the lr "
              "(needs salunet[tensorboard])",
    "log_steps": "write one JSON line per optimizer step (loss, accuracy, lr, gradient norm) to RUN/steps.jsonl",
    "recipe": "the recipe the run started from (informational; set it with --recipe)",
}


RECIPES: dict[str, dict] = {
    "cifar-resnet": dict(model="salunet_c18", width=None, data="cifar10", epochs=300, batch_size=128,
                         optimizer="sgd", lr=0.1, weight_decay=5e-4, warmup_epochs=5, label_smoothing=0.1,
                         mixup=0.2, cutmix=1.0, crop_padding=4, flip=True, ema_decay=0.9997),
    "cifar-vit": dict(model="salunet_t", width=None, data="cifar10", epochs=200, batch_size=128,
                      optimizer="adam", lr=1e-3, min_lr=1e-5, weight_decay=5e-5, warmup_epochs=5,
                      label_smoothing=0.1, crop_padding=4, flip=True, ema_decay=0.0),
    "imagenet-resnet": dict(model="salunet_c50", width=None, data="imagefolder", epochs=100, batch_size=256,
                            optimizer="sgd", lr=0.1, weight_decay=5e-5, warmup_epochs=5, label_smoothing=0.1,
                            mixup=0.1, cutmix=1.0, ema_decay=0.9998, amp="bf16", channels_last=True,
                            eval_batch_size=250, crop_padding=0, flip=True),
    "cpu-quick": dict(model="salunet_c18", width=16, data="digits", epochs=6, batch_size=64, lr=0.05,  # padding:
                      weight_decay=5e-4, warmup_epochs=1, crop_padding=None, flip=False, ema_decay=0.99),  # 8 px / 8 = 1
}

_CHOICES = {"optimizer": ("sgd", "adamw", "adam"), "amp": ("none", "bf16", "fp16"), "crop": ("auto", "pad", "resized"),
            "data": ("digits", "cifar10", "cifar100", "npz", "imagefolder"), "logger": ("none", "tensorboard"),
            "salu_recalibrate_measure": ("forward", "step", "reference")}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_choices(key: str) -> tuple[str, ...] | None:
    """The values field ``key`` takes from a fixed set (for ``--help``), or None: the checked choices, the
    registered models, and the norm / activation names of the model factory."""
    if key == "model":
        return tuple(list_models())
    if key in ("norm_layer", "act_layer"):
        from ..models.layers import ACTS, NORMS

        return tuple(NORMS if key == "norm_layer" else ACTS)
    return _CHOICES.get(key)
_HINTS = typing.get_type_hints(TrainConfig)  # resolves the annotation strings (PEP 563) without eval()


def _types(key: str) -> tuple:
    return field_types(_HINTS[key])


def parse_value(key: str, value):
    """Convert ``value`` (a string from the command line, or a JSON value) to the type of field ``key``."""
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, _FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(_FIELDS)}")
    return coerce_value(key, value, _types(key))


def field_types(tp) -> tuple:
    """The types a field annotation allows (``int | None`` -> (int, NoneType))."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def coerce_value(name: str, value, allowed: tuple):
    """The one value parser of the project (trainer config, experiment options, the CLI): ``value`` (a string
    from a command line, or a JSON / Python value) as one of the ``allowed`` types, or a ValueError that names
    ``name``. Strings: "none"/"null"/"" mean None where None is allowed; booleans are true/false/yes/no/on/off/1/0;
    dicts are JSON objects. Other values must already have an allowed type (an int is accepted as a float)."""
    if isinstance(value, str):
        s = value.strip()
        if type(None) in allowed and s.lower() in ("none", "null", ""):
            return None
        if bool in allowed:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name}: {value!r} is not a boolean (use true/false)")
        if int in allowed:
            try:
                return int(s)
            except ValueError:
                if float not in allowed:
                    raise ValueError(f"{name}: {value!r} is not an integer; write a whole number such as 3") from None
        if float in allowed:
            try:
                return float(s)
            except ValueError:
                raise ValueError(f"{name}: {value!r} is not a number") from None
        if dict in allowed:
            try:
                v = json.loads(s)
            except json.JSONDecodeError:
                raise ValueError(f"{name}: {value!r} is not a JSON object") from None
            return coerce_value(name, v, allowed)
        return s
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError(f"{name}: null is not allowed")
    if bool in allowed and isinstance(value, bool):
        return value
    if int in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    if float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if str in allowed and isinstance(value, str):
        return value
    if dict in allowed and isinstance(value, dict):
        return value
    names = "/".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ValueError(f"{name}: {value!r} has type {type(value).__name__}, expected {names}")


_FLOAT32_MAX = 3.4028234663852886e38
# create_model arguments the trainer passes itself; an override of one would collide with them
_MODEL_ARGS = {"num_classes", "in_chans", "width", "norm_layer", "act_layer"}


def _validate(cfg: TrainConfig) -> TrainConfig:
    for k, choices in _CHOICES.items():
        if getattr(cfg, k) not in choices:
            raise ValueError(f"{k}: {getattr(cfg, k)!r} is not one of {', '.join(choices)}")
    for k in ("epochs", "batch_size", "eval_batch_size", "accum_steps", "image_size", "eval_size",
              "checkpoint_every", "keep_checkpoints"):
        if getattr(cfg, k) is not None and getattr(cfg, k) <= 0:
            raise ValueError(f"{k} must be positive, got {getattr(cfg, k)}")
    if not (cfg.dist_timeout > 0 and math.isfinite(cfg.dist_timeout)):
        raise ValueError(f"dist_timeout must be a finite number of seconds > 0, got {cfg.dist_timeout}")
    for k in ("train_subset", "test_subset", "crop_padding", "workers", "warmup_epochs", "weight_decay",
              "grad_clip", "mixup", "cutmix", "min_lr", "momentum", "agc", "salu_recalibrate"):
        v = getattr(cfg, k)
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{k} must be a finite number >= 0, got {v}")
    if cfg.salu_recalibrate_every < 0:
        raise ValueError(f"salu_recalibrate_every must be a whole number of steps >= 0 (0 = once an epoch), got "
                         f"{cfg.salu_recalibrate_every}")
    if cfg.salu_recalibrate_every > 0 and cfg.salu_recalibrate == 0:
        raise ValueError("salu_recalibrate_every needs a target: add --salu-recalibrate K (0.5 measured best)")
    if not (0 < cfg.salu_recalibrate_rate <= 1):
        raise ValueError(f"salu_recalibrate_rate must be in (0, 1] (1 = pin exactly), got {cfg.salu_recalibrate_rate}")
    if cfg.salu_recalibrate_measure != "forward" and cfg.salu_recalibrate_every == 0:
        raise ValueError(f"salu_recalibrate_measure {cfg.salu_recalibrate_measure} is the per-step recalibration's: "
                         "add --salu-recalibrate K --salu-recalibrate-every N")
    if cfg.salu_recalibrate_measure == "reference" and cfg.salu_recalibrate_rate != 1:
        raise ValueError(f"salu_recalibrate_measure reference pins on the same images at every step: there is no "
                         f"batch noise to average, drop --salu-recalibrate-rate {cfg.salu_recalibrate_rate}")
    if cfg.salu_reference_images < 1:
        raise ValueError(f"salu_reference_images must be a whole number of images >= 1 (128 measured), got "
                         f"{cfg.salu_reference_images}")
    if cfg.salu_reference_images != 128 and cfg.salu_recalibrate_measure != "reference":
        raise ValueError("salu_reference_images sets how many images --salu-recalibrate-measure reference pins on: "
                         "add that, or drop --salu-reference-images")
    if cfg.salu_recalibrate_measure == "reference" and cfg.salu_eval_pin > 0:
        raise ValueError("salu_recalibrate_measure reference already pins on the reference images before each "
                         "evaluation: drop --salu-eval-pin")
    if cfg.salu_recalibrate_measure == "step" and cfg.salu_recalibrate_rate > 0.5:
        raise ValueError(f"salu_recalibrate_measure step needs --salu-recalibrate-rate <= 0.5, got "
                         f"{cfg.salu_recalibrate_rate}: pinned a step late at full rate, the sites overshoot and "
                         "oscillate (docs/RESULTS.md \"Pinning from the training forward\")")
    if cfg.salu_recalibrate_rate != 1 and cfg.salu_recalibrate == 0:
        raise ValueError("salu_recalibrate_rate needs a target: add --salu-recalibrate K (0.5 measured best)")
    if not (0 < cfg.salu_project_grad_rate <= 1):
        raise ValueError(f"salu_project_grad_rate must be in (0, 1] (1 = the batch's own), got "
                         f"{cfg.salu_project_grad_rate}")
    if cfg.salu_project_grad_rate != 1 and not cfg.salu_project_grad:
        raise ValueError("salu_project_grad_rate needs the projection: add --salu-project-grad")
    if cfg.salu_project_grad_rate != 1 and cfg.amp == "fp16":
        raise ValueError("salu_project_grad_rate < 1 sums gradients that fp16's loss scaling rescales (and makes "
                         "non-finite on skipped steps): use --amp bf16 or none, or the batch's own coefficient (rate 1)")
    if cfg.salu_eval_pin < 0:
        raise ValueError(f"salu_eval_pin must be a whole number of batches >= 0 (0 = off), got {cfg.salu_eval_pin}")
    if cfg.salu_eval_pin > 0 and cfg.salu_recalibrate_every == 0:
        raise ValueError("salu_eval_pin applies to per-step pinning: add --salu-recalibrate K --salu-recalibrate-every "
                         "N (pinning once an epoch already pins on 4 batches before each evaluation but the last)")
    if not (cfg.salu_lr_scale > 0 and math.isfinite(cfg.salu_lr_scale)):
        raise ValueError(f"salu_lr_scale must be a finite positive number (1 = no scaling), got {cfg.salu_lr_scale}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr must be a finite positive number, got {cfg.lr}")
    for k in ("lr", "min_lr", "weight_decay", "momentum", "grad_clip"):  # the optimizers hold them in float32
        if getattr(cfg, k) > _FLOAT32_MAX:
            raise ValueError(f"{k} {getattr(cfg, k)!r} does not fit in float32 (max {_FLOAT32_MAX:.3g}); pass a "
                             "realistic value")
    reserved = sorted(set(cfg.model_overrides) & _MODEL_ARGS)
    if reserved:
        raise ValueError(f"model_overrides may not set {', '.join(reserved)}: the trainer sets them (use "
                         "--width / --norm-layer / --act-layer; classes and channels come from the data)")
    if not 0 <= cfg.label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) (0 = off), got {cfg.ema_decay}")
    if cfg.in_chans not in (None, 1, 3):
        raise ValueError(f"in_chans must be 1 (grayscale) or 3 (colour), or none to take it from the data; got "
                         f"{cfg.in_chans}")
    if not (0 < cfg.crop_scale <= 1):
        raise ValueError(f"crop_scale is the smallest area fraction of the resized crop, in (0, 1]; got {cfg.crop_scale}")
    if cfg.data != "imagefolder" and (cfg.in_chans is not None or cfg.crop == "resized"):
        what = "--in-chans" if cfg.in_chans is not None else "--crop resized"
        raise ValueError(f"{what} applies to image folders only; {cfg.data} images keep their stored channels and "
                         "train with pad-and-crop (--crop-padding); drop it")
    if cfg.width is not None and cfg.width <= 0:
        raise ValueError(f"width must be positive, got {cfg.width}")
    if cfg.data == "digits" and cfg.data_path is not None:  # a path given for the embedded set is a mistake
        raise ValueError(f"data_path {cfg.data_path!r} given, but data 'digits' is embedded and reads no file; "
                         "pass --data npz, cifar10, cifar100 or imagefolder with it")
    return cfg


def resolve_config(recipe: str | None = None, overrides: dict | None = None, base: dict | None = None) -> TrainConfig:
    """Defaults <- recipe <- ``base`` (e.g. a config file) <- ``overrides``; every value type-checked."""
    values: dict = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        values.update({k: parse_value(k, v) for k, v in RECIPES[recipe].items()})
        values["recipe"] = recipe
    for layer in (base or {}, overrides or {}):
        for k, v in layer.items():
            values[k] = parse_value(k, v)
    model = values.get("model", TrainConfig.model)
    off = _following_off(values)
    for k, v in model_train_defaults(model).items():  # what the model declares, below everything said explicitly
        if k not in off:
            values.setdefault(k, parse_value(k, v))
    return _validate(TrainConfig(**values))


# settings that only mean something while a switch is on: a model's declared values for them fall away when the
# switch is given explicitly off, so one flag turns a declared pin off or changes its kind
# (`--model salunet_c18_v3 --salu-recalibrate 0` trains it as the plain scaled-WS v2, without the projection too,
# the pin's backward half; `--salu-recalibrate-every 0` pins it once an epoch; `--salu-recalibrate-measure forward`
# on each step's own batch)
_SWITCHES = (
    ("salu_recalibrate", lambda v: v == 0, ("salu_recalibrate_every", "salu_recalibrate_rate",
                                            "salu_recalibrate_measure", "salu_reference_images", "salu_project_grad",
                                            "salu_project_grad_rate")),
    ("salu_recalibrate_every", lambda v: v == 0, ("salu_recalibrate_measure", "salu_reference_images")),
    ("salu_recalibrate_measure", lambda v: v != "reference", ("salu_reference_images",)),
)


def _following_off(values: dict) -> set[str]:
    """The keys that follow a switch ``values`` holds off (a partial dict: only the switches in it count)."""
    return {d for switch, is_off, dependents in _SWITCHES if switch in values and is_off(values[switch])
            for d in dependents}


def declared_in_use(cfg: TrainConfig) -> tuple[dict, dict]:
    """The trainer settings ``cfg.model`` declares (``MODEL_TRAIN_DEFAULTS``), split into those ``cfg`` holds (a
    value given explicitly and equal to the declared one among them) and those it overrides, with ``cfg``'s values:
    for the line a run prints."""
    held, overridden = {}, {}
    off = _following_off(dataclasses.asdict(cfg))  # e.g. the reference images with the pin off: the switch says it
    for k, v in model_train_defaults(cfg.model).items():
        if k not in off:
            (held if getattr(cfg, k) == parse_value(k, v) else overridden)[k] = getattr(cfg, k)
    return held, overridden


def config_from_json(path: str | Path) -> dict:
    """Read a JSON config file (only keys of :class:`TrainConfig`; checked when resolved)."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{p}: is a directory; --config needs a JSON file of config keys")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: config file not found; --config needs a JSON file of config keys")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" ({exc.msg} at line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ValueError(f"{p}: not valid JSON{where}; fix the file") from None
    except RecursionError:
        raise ValueError(f"{p}: JSON nested too deeply to be a config; a config is one flat object of keys") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: a config file must hold a JSON object of config keys, not a {type(d).__name__}")
    for k, v in d.items():
        try:
            parse_value(k, v)
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None
    return d


def model_kwargs(cfg: TrainConfig, num_classes: int, in_chans: int, image_size: int) -> dict:
    """The keyword arguments of ``create_model`` (``name`` included) that :func:`build_model` passes: what an
    exported weights file records, so that ``create_model(**kwargs)`` rebuilds the model without the trainer."""
    if cfg.model not in list_models():
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(list_models())}")
    kw = dict(cfg.model_overrides)
    fields = {f.name for f in dataclasses.fields(MODEL_CONFIGS[cfg.model])}
    if "img_size" in fields and "img_size" not in kw:  # models whose shapes depend on the image size
        kw["img_size"] = image_size
        patch = kw.get("patch", getattr(MODEL_CONFIGS[cfg.model], "patch", None))
        if patch is not None and image_size % patch:  # refused, not changed behind the user's back
            fits = [p for p in range(1, min(image_size, 16) + 1) if image_size % p == 0]
            raise ValueError(f"model {cfg.model}: {image_size} px images do not split into {patch}x{patch} patches; "
                             f"pass --model-overrides '{{\"patch\": P}}' with P in {fits} ({image_size}/P squared "
                             "tokens), or --image-size a multiple of the patch (image folders)")
    return {"name": cfg.model, "num_classes": num_classes, "in_chans": in_chans, "width": cfg.width,
            "norm_layer": cfg.norm_layer, "act_layer": cfg.act_layer, **kw}


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, image_size: int):
    """The model ``cfg`` names, for data of ``num_classes`` / ``in_chans`` / ``image_size``, built right after
    ``torch.manual_seed(cfg.seed)`` (so a seed gives the same initial weights in every process)."""
    import torch

    kwargs = model_kwargs(cfg, num_classes, in_chans, image_size)
    torch.manual_seed(cfg.seed)
    try:
        return create_model(**kwargs)
    except (MemoryError, RuntimeError) as exc:  # the allocator's refusal, however torch words it
        if not isinstance(exc, MemoryError) and not any(s in str(exc) for s in ("alloc", "out of memory")):
            raise
        raise ValueError(f"model {cfg.model} at width {cfg.width} does not fit in memory "
                         f"({str(exc).strip().splitlines()[-1][:100] if str(exc).strip() else 'MemoryError'}); "
                         "use a smaller --width") from None
