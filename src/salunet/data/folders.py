"""What an image folder holds, and the plan to read it: size, channels, crop policy, in memory or streamed.

Your own images train at their own size. :func:`probe_folder` opens the headers (not the pixels) of up to
:data:`PROBE_FILES` files spread over the folder and :func:`plan_folder` turns that, and what the user asked for,
into a :class:`FolderPlan`:

- **size**: the images' own size when they share one (the shorter side if they are not square), else the median
  shorter side capped at 224 (ImageNet's train size). A requested size larger than the images' (median shorter
  side) is allowed but warned about: upsampling costs compute (8x the pixels per side from 28 to 224) and adds no
  detail.
- **channels**: 1 when every probed image is grayscale (the data kept as it is stored: a third of the input, and
  the same as the .npz route), else 3. A colour image met later in a folder judged grayscale is an error naming
  the file, never a silent conversion; ``--in-chans 1`` asks for the conversion, ``--in-chans 3`` for colour.
- **crop**: ``"auto"`` = pad-and-crop (CIFAR-style: the ``fixed`` transform, then a random shift of
  ``crop_padding`` pixels and the flip on the device) for images of at most :data:`SMALL_IMAGE` px, ImageNet's
  random-resized crop above; ``"pad"`` / ``"resized"`` pick one (``crop_scale`` is the resized crop's smallest
  area fraction, 0.08 as ImageNet, larger is gentler).
- **in memory**: a pad-and-crop folder whose decoded pixels fit :data:`MEMORY_BUDGET` bytes is decoded once and
  trained exactly like an .npz (airbench-style, data resident on the device, batched augmentation, per-channel
  mean/std of the training images); others are streamed through DataLoader workers every epoch and normalised with
  ImageNet's statistics. The plan says which (``describe()``; ``salunet train`` prints it).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .imagefolder import GRAY_MODES, ImageFolder, iter_quietly, open_image, quiet_worker

__all__ = ["FolderShape", "FolderPlan", "probe_folder", "plan_folder", "decode_folder", "default_padding",
           "PROBE_FILES", "SMALL_IMAGE", "MEMORY_BUDGET", "IMAGENET_SIZE"]

PROBE_FILES = 64  # headers opened to judge size and colour; about 1 ms each, independent of the folder's size
SMALL_IMAGE = 64  # px: at most this, pad-and-crop by default (CIFAR 32, Tiny-ImageNet 64), above it resized crops
MEMORY_BUDGET = 1 << 30  # bytes of decoded uint8 pixels (train + val) kept resident; every DDP rank holds a copy
IMAGENET_SIZE = 224  # the cap of an inferred size for folders of mixed sizes


@dataclass(frozen=True)
class FolderShape:
    """What the probed headers say: the sizes (W, H) seen, whether all were grayscale, how many were opened."""

    sizes: tuple[tuple[int, int], ...]
    gray: bool
    probed: int

    @property
    def common(self) -> tuple[int, int] | None:
        """(W, H) when every probed image has it, else None."""
        return self.sizes[0] if len(set(self.sizes)) == 1 else None

    @property
    def median_short(self) -> int:
        return int(np.median([min(s) for s in self.sizes]))


def probe_folder(ds: ImageFolder, n: int | None = None) -> FolderShape:
    """Open the headers of up to ``n`` (:data:`PROBE_FILES`) files of ``ds`` spread evenly over it (every class,
    in folder order)."""
    n = n or PROBE_FILES
    idx = np.unique(np.linspace(0, len(ds.samples) - 1, min(n, len(ds.samples))).round().astype(int))
    sizes, gray = [], True
    for i in idx:
        path = ds.samples[i][0]
        with open_image(path) as im:  # lazy: reads the header only
            sizes.append(tuple(im.size))
            gray &= im.mode in GRAY_MODES
    return FolderShape(tuple(sizes), gray, len(idx))


def default_padding(size: int) -> int:
    """Pad-and-crop shift for ``size`` px images when not given: size/8 rounded (8 -> 1, 28 -> 4, 32 -> 4 as the
    CIFAR recipes)."""
    return max(1, int(size / 8 + 0.5))


@dataclass(frozen=True)
class FolderPlan:
    size: int  # train size
    eval_size: int
    channels: int
    to_gray: bool  # channels 1 asked for explicitly: colour images are converted
    crop: str  # "pad" | "resized"
    scale: tuple[float, float]
    padding: int  # pad-and-crop shift (pad only)
    in_memory: bool
    shape: FolderShape
    bytes: int  # decoded train + val pixels

    def describe(self, root) -> str:
        c = self.shape.common
        seen = f"{c[0]}x{c[1]}" if c else f"mixed sizes (median shorter side {self.shape.median_short} px)"
        kind = "grayscale" if self.shape.gray else "colour"
        crop = (f"pad-and-crop {self.padding} px" if self.crop == "pad"
                else f"random-resized crop, area {self.scale[0]:g}-{self.scale[1]:g}")
        where = (f"decoded once into memory ({self.bytes / 2**20:.1f} MiB)" if self.in_memory else
                 "streamed from disk every epoch by DataLoader workers")
        return (f"image folder {root}: {kind} {seen} ({self.shape.probed} headers probed) -> {self.size} px "
                f"(eval {self.eval_size}), {self.channels} channel(s), {crop}; {where}")


def plan_folder(ds: ImageFolder, n_images: int, *, image_size: int | None, eval_size: int | None,
                in_chans: int | None, crop: str, crop_scale: float, crop_padding: int | None,
                shape: FolderShape | None = None) -> FolderPlan:
    """The plan for a folder (module docstring); ``n_images`` = train + val images that would be decoded. Warns
    (UserWarning) when a requested size upsamples the images."""
    shape = shape or probe_folder(ds)
    c = shape.common
    native = min(c) if c else shape.median_short
    size = image_size or (native if c else min(IMAGENET_SIZE, native))
    ev = eval_size or size
    for name, v in (("image_size", size), ("eval_size", ev)) if ev != size else (("image_size", size),):
        if v > native:
            warnings.warn(f"{name} {v} upsamples the images of {ds.root.parent} ({'their' if c else 'median'} "
                          f"shorter side {native} px) {v / native:.1f}x per side: {(v / native) ** 2:.1f}x the "
                          f"compute, no new detail; use --{name.replace('_', '-')} {native} or less (left out, the "
                          "size comes from the images)", UserWarning, stacklevel=3)
    channels = in_chans or (1 if shape.gray else 3)
    policy = crop if crop != "auto" else ("pad" if size <= SMALL_IMAGE else "resized")
    nbytes = n_images * channels * max(size, ev) ** 2
    return FolderPlan(size=size, eval_size=ev, channels=channels, to_gray=in_chans == 1, crop=policy,
                      scale=(crop_scale, 1.0), padding=crop_padding if crop_padding is not None else default_padding(size),
                      in_memory=policy == "pad" and nbytes <= MEMORY_BUDGET, shape=shape, bytes=nbytes)


def decode_folder(ds, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of ``ds`` (an ImageFolder with the deterministic ``fixed`` crop, or a Subset of one) decoded
    once: (uint8 NHWC images, int64 labels), in order. ``workers`` DataLoader processes decode in parallel."""
    from torch.utils.data import DataLoader

    xs, ys = [], []
    for x, y in iter_quietly(DataLoader(ds, batch_size=256, num_workers=workers, shuffle=False,
                                        worker_init_fn=quiet_worker if workers else None)):
        xs.append(x.permute(0, 2, 3, 1).numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)

