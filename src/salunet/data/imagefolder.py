"""ImageNet-style folders (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) decoded with Pillow in
DataLoader workers, with the standard transforms: train = random-resized crop (scale 0.08-1, ratio 3/4-4/3)
+ horizontal flip (``flip=False`` turns it off); eval = resize the shorter side to size/0.875 + center crop
(224 -> 256, 288 -> 329).
Tensors leave the workers as uint8 CHW; normalisation happens on the training device.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ImageFolder", "IMG_EXTENSIONS", "scan_folder"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


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
            if p.suffix.lower() not in IMG_EXTENSIONS:
                raise ValueError(f"{p}: not an image file (extension {p.suffix or 'none'}); remove it or convert "
                                 f"it to one of {', '.join(IMG_EXTENSIONS)}")
            samples.append((p, label))
    if not samples:
        raise ValueError(f"{root}: no images found under its class folders; put image files "
                         f"({', '.join(IMG_EXTENSIONS[:3])}, ...) in {root}/<class>/")
    return samples, classes


class ImageFolder(Dataset):
    def __init__(self, root: str | Path, *, train: bool, size: int = 224, classes: list[str] | None = None,
                 seed: int = 0, flip: bool = True) -> None:
        self.root = Path(root)
        self.samples, self.classes = scan_folder(self.root, classes)
        self.train, self.size, self.seed, self.flip = train, size, seed, flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{path}: cannot decode image ({type(exc).__name__}); replace or remove the file") from None
        if self.train:
            rng = random.Random(hash((self.seed, self.epoch, i)))  # reproducible per (epoch, sample)
            im = _random_resized_crop(im, self.size, rng)
            if rng.random() < 0.5 and self.flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            im = _resize_center_crop(im, self.size)
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, size, size)
        return x, label


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
    if W <= H:
        nw, nh = short, max(1, int(round(H * short / W)))
    else:
        nw, nh = max(1, int(round(W * short / H))), short
    im = im.resize((nw, nh), Image.BILINEAR)
    x0, y0 = (nw - size) // 2, (nh - size) // 2
    return im.crop((x0, y0, x0 + size, y0 + size))
