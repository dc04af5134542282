"""ImageNet-style folders (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) decoded with Pillow in
DataLoader workers. Two crop policies (``crop``):

- ``"resized"`` (ImageNet): train = random-resized crop (area ``scale``, default 0.08-1, ratio 3/4-4/3) +
  horizontal flip (``flip=False`` turns it off); eval = resize the shorter side to size/0.875 + center crop
  (224 -> 256, 288 -> 329).
- ``"fixed"`` (CIFAR-style, for small images): train and eval alike = resize the shorter side to ``size`` (nothing
  to do for images already at that size) + center crop; the random pad-and-crop and flip are then applied to the
  batch on the training device (salunet.train.sources), as for in-memory data.

``channels`` 1 decodes to grayscale: a colour image then raises (the folder was judged grayscale from a sample,
see :mod:`.folders`) unless ``to_gray`` says the conversion is wanted. Tensors leave the workers as uint8 CHW;
normalisation happens on the training device.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ImageFolder", "IMG_EXTENSIONS", "GRAY_MODES", "scan_folder", "open_image", "MAX_PIXELS",
           "quiet_worker", "iter_quietly"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # Pillow modes without colour


def scan_folder(root: Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """Files and labels of ``root/<class>/*``. Refuses missing folders, empty folders and non-image files."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory; an image folder needs {root}/<class>/<image> files")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise ValueError(f"{root}: no class folders; put the images in {root}/<class>/<image>.jpg")
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root}: class folder(s) {', '.join(unknown[:5])} not among the training classes; "
                         "train/ and val/ need the same class folders")
    samples = []
    for label, c in enumerate(classes):
        d = root / c
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            if p.is_dir() or p.name.startswith("."):
                continue
            if not p.is_file():  # a FIFO, socket, device or broken link: opening it could block or fail later
                raise ValueError(f"{p}: not a regular file (a FIFO, socket, device or broken link); remove it from "
                                 "the image folder")
            if p.suffix.lower() not in IMG_EXTENSIONS:
                raise ValueError(f"{p}: not an image file (extension {p.suffix or 'none'}); remove it or convert "
                                 f"it to one of {', '.join(IMG_EXTENSIONS)}")
            samples.append((p, label))
    if not samples:
        raise ValueError(f"{root}: no images found under its class folders; put image files "
                         f"({', '.join(IMG_EXTENSIONS[:3])}, ...) in {root}/<class>/")
    return samples, classes


MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS): ~9459 x 9459


@contextlib.contextmanager
def open_image(path: Path):
    """A Pillow image of ``path`` (lazy: nothing decoded yet), refusing before any decoding what would hang or
    exhaust memory: anything but a regular file (a FIFO named ``x.png`` would block ``open`` forever; opened
    non-blocking and checked), and more than :data:`MAX_PIXELS` pixels (a 24 KB PNG can declare 14000 x 14000).
    Every failure is a ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ValueError(f"{path}: cannot open ({exc.strerror}); replace or remove the file") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: not a regular file (a FIFO, socket or device); remove it from the image folder")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(f)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ValueError(f"{path}: cannot decode image ({type(exc).__name__}); replace or remove the file") from None
        with im:
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"{path}: {im.width} x {im.height} pixels, more than the {MAX_PIXELS:,} this loader "
                                 "decodes (a decompression bomb, or a huge scan); downscale or remove it")
            yield im


def quiet_worker(_worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader over image folders: a worker leaves quietly on SIGTERM (exit code 0)
    and ignores SIGINT. A scheduler stops a job by signalling its whole process group; the workers would otherwise
    run the trainer's inherited handler and print a traceback each. (Ignoring SIGTERM instead would hang the
    shutdown: multiprocessing ends daemonic workers with SIGTERM.) The main process reports the stop. Workers
    start with SIGTERM blocked (:func:`iter_quietly`): a signal that arrives between the fork and this function
    waits here, then ends the worker quietly. A worker hands each batch's shared memory to the main process over a
    socket (multiprocessing's resource_sharer thread); a main process that stops mid-handover (its own SIGTERM)
    drops the socket, and that thread printed a traceback (ConnectionResetError) whenever it ran before this
    worker's SIGTERM handler: such a lost handover is not reported (:func:`_quiet_excepthook`)."""
    import signal
    import sys

    sys.excepthook = _quiet_excepthook
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def _quiet_excepthook(kind, exc, tb) -> None:
    """``sys.excepthook`` of a loader worker, where only multiprocessing's resource_sharer thread calls it (torch
    passes the worker's own errors to the main process): the main process went away mid-handover (a connection
    reset, a broken pipe, an early end of stream), which the main process reports itself; anything else as usual."""
    import sys

    if not issubclass(kind, (ConnectionError, EOFError)):
        sys.__excepthook__(kind, exc, tb)


def iter_quietly(loader):
    """``iter(loader)`` with SIGTERM and SIGINT blocked while its worker processes are forked, so that no worker
    ever runs the trainer's inherited handler (it raised ``Terminated`` inside a half-started worker, which then
    spun forever: a hang at a group SIGTERM that landed in the few milliseconds of an epoch's worker start). A
    signal meanwhile sent to this process is delivered as soon as the workers exist."""
    import signal

    if not getattr(loader, "num_workers", 0):
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class ImageFolder(Dataset):
    def __init__(self, root: str | Path, *, train: bool, size: int = 224, classes: list[str] | None = None,
                 seed: int = 0, flip: bool = True, crop: str = "resized", scale: tuple[float, float] = (0.08, 1.0),
                 channels: int = 3, to_gray: bool = False) -> None:
        if crop not in ("resized", "fixed") or channels not in (1, 3):
            raise ValueError(f"ImageFolder: crop must be 'resized' or 'fixed' and channels 1 or 3, got {crop!r}, "
                             f"{channels}")
        self.root = Path(root)
        self.samples, self.classes = scan_folder(self.root, classes)
        self.train, self.size, self.seed, self.flip = train, size, seed, flip
        self.crop, self.scale, self.channels, self.to_gray = crop, tuple(scale), channels, to_gray
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        with open_image(path) as im:
            if self.channels == 1 and im.mode not in GRAY_MODES and not self.to_gray:
                raise ValueError(f"{path}: a colour image (mode {im.mode}) in a folder read as grayscale; pass "
                                 "--in-chans 3 to keep colour, or --in-chans 1 to convert every image to gray")
            try:
                im = im.convert("L" if self.channels == 1 else "RGB")
            except (UnidentifiedImageError, OSError) as exc:
                raise ValueError(f"{path}: cannot decode image ({type(exc).__name__}); replace or remove the "
                                 "file") from None
        if self.crop == "fixed":  # the random pad-and-crop and flip happen on the batch, on the device
            im = _resize_center_crop(im, self.size, crop_pct=1.0)
        elif self.train:
            rng = random.Random(hash((self.seed, self.epoch, i)))  # reproducible per (epoch, sample)
            im = _random_resized_crop(im, self.size, rng, scale=self.scale)
            if rng.random() < 0.5 and self.flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            im = _resize_center_crop(im, self.size)
        a = np.asarray(im, dtype=np.uint8).reshape(self.size, self.size, self.channels)
        return torch.from_numpy(a.copy()).permute(2, 0, 1), label  # (channels, size, size)


def _random_resized_crop(im, size: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    from PIL import Image

    W, H = im.size
    area = W * H
    for _ in range(10):
        target = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
        if 0 < w <= W and 0 < h <= H:
            x0, y0 = rng.randint(0, W - w), rng.randint(0, H - h)
            return im.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
    return _resize_center_crop(im, size, crop_pct=1.0)


def _resize_center_crop(im, size: int, crop_pct: float = 0.875):
    from PIL import Image

    W, H = im.size
    short = int(math.floor(size / crop_pct))
    if (W, H) == (short, short) == (size, size):
        return im  # already the size asked for: no resampling
    if W <= H:
        nw, nh = short, max(1, int(round(H * short / W)))
    else:
        nw, nh = max(1, int(round(W * short / H))), short
    im = im.resize((nw, nh), Image.BILINEAR)
    x0, y0 = (nw - size) // 2, (nh - size) // 2
    return im.crop((x0, y0, x0 + size, y0 + size))
