"""Each SALU's operating point, sqrt(ab) * rms(input), the quantity ``--salu-recalibrate K`` pins.

    python scripts/salu_operating_point.py [--data-path ../shared/data/cifar10.npz | digits] [--images 512]
                                           [--width 16] RUN_OR_MODEL...

RUN_OR_MODEL is a run directory (its last checkpoint, raw weights) or ``init:MODEL`` (a freshly initialised
registered model at ``--width``, seed 0). For each it prints the median over channels of sqrt(ab) * rms(input) at
every SALU site, in forward order, measured on the first ``--images`` training images (of the CIFAR-10 .npz, or
of the embedded 8x8 digits with ``--data-path digits``), normalised per channel, without augmentation
(docs/RESULTS.md "Pinning the SALU inputs' scale between epochs", "Pinning on small batches").
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

import salunet
from salunet.models import create_model
from salunet.train.recalibrate import salu_input_rms, salu_sites


def operating_points(model: torch.nn.Module, x: torch.Tensor) -> list[float]:
    rms = salu_input_rms(model, [x[i:i + 128] for i in range(0, len(x), 128)])
    sites = salu_sites(model)
    out = []
    for name, r in rms.items():  # sqrt(ab) * rms = rms / width, width = 1/sqrt(ab) as the kernels use it
        out.append(float((r / sites[name][1].width.double().reshape(r.shape)).median()))
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """RUN_OR_MODEL... and the data options, shared with scripts/radial_share.py."""
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data-path", default="../shared/data/cifar10.npz")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--width", type=int, default=16, help="width of the init:MODEL models")


def training_images(data_path: str, images: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The first ``images`` training images (NCHW in memory, normalised per channel) and their labels (None if the
    .npz has none), of the CIFAR-10 .npz or of the embedded digits (``data_path="digits"``); None, with the reason
    on stderr, if the file is missing."""
    if data_path == "digits":
        from salunet.data.digits import load_digits

        d = load_digits()
        x_train, y_train = d.x_train, d.y_train
    else:
        try:
            d = np.load(data_path)
            x_train, y_train = d["x_train"], (d["y_train"] if "y_train" in d else None)
        except FileNotFoundError:
            print(f"{data_path}: no such file; pass --data-path to a CIFAR-10 .npz (or digits)", file=sys.stderr)
            return None
    # NCHW in memory, with NCHW's strides: a 1-channel permuted array passes is_contiguous() with channels_last
    # strides, and convs then run channels_last (torch's CPU 1x1 stride-2 conv bug: models/channels_last.py)
    x = torch.tensor(x_train[:images]).permute(0, 3, 1, 2).float().clone(memory_format=torch.contiguous_format) / 255
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return x, (None if y_train is None else torch.tensor(y_train[:images]).long())


def labelled_training_images(data_path: str, images: int, why: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`training_images` for the scripts that need labels (``why`` says what for, in the message): None, with
    the reason on stderr, when the file is missing or has no ``y_train``."""
    data = training_images(data_path, images)
    if data is not None and data[1] is None:
        print(f"{data_path}: no y_train; {why}", file=sys.stderr)
        return None
    return data


def model_of(spec: str, width: int, in_chans: int) -> torch.nn.Module:
    """A run directory's last checkpoint (raw weights), or ``init:MODEL`` freshly initialised (seed 0)."""
    if spec.startswith("init:"):
        torch.manual_seed(0)
        return create_model(spec[5:], num_classes=10, width=width, in_chans=in_chans)
    return salunet.load_model(spec, device="cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    data = training_images(args.data_path, args.images)
    if data is None:
        return 2
    x = data[0]
    for spec in args.runs:
        model = model_of(spec, args.width, x.shape[1])
        print(f"{spec}: " + " ".join(f"{v:.2f}" for v in operating_points(model, x)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
