"""Data: CIFAR-10/100 (official format, .npz, download), the embedded digits set, ImageNet-style folders,
and batched on-device augmentation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .augment import mix_batch, mixed_cross_entropy, random_crop, random_flip
from .cifar import CIFAR, ImageArrays, download_cifar, load_cifar, read_npz, safe_extract, validate_arrays
from .digits import load_digits
from .imagefolder import ImageFolder, scan_folder

__all__ = ["DATASETS", "load_arrays", "MemoryData", "to_memory", "ImageArrays", "ImageFolder", "load_cifar",
           "download_cifar", "load_digits", "read_npz", "safe_extract", "validate_arrays", "scan_folder",
           "random_crop", "random_flip", "mix_batch", "mixed_cross_entropy", "CIFAR"]

DATASETS = ("digits", "cifar10", "cifar100", "npz", "imagefolder")


def load_arrays(name: str, path: str | None = None, *, download: bool = False, progress: bool = True) -> ImageArrays:
    """In-memory data set ``name``: "digits" (embedded), "cifar10"/"cifar100" (``path`` = .npz, archive,
    folder, or download root with ``download``), "npz" (any .npz in the CIFAR layout)."""
    if name == "digits":
        return load_digits()
    if name in CIFAR:
        if path is None:
            raise ValueError(f"{name} needs --data-path (an .npz, the official archive or its folder; with "
                             "--download, the folder to download into)")
        if download:
            p = Path(path).expanduser()
            if not (p.is_file() or (p / CIFAR[name].folder).is_dir()):
                return load_cifar(name, download_cifar(name, p, progress=progress))
        return load_cifar(name, path)
    if name == "npz":
        if path is None:
            raise ValueError("data 'npz' needs --data-path pointing at an .npz with x_train, y_train, x_test, y_test")
        p = Path(path).expanduser()
        if p.is_dir():
            raise IsADirectoryError(f"{p}: is a directory; data 'npz' needs an .npz file with x_train, y_train, "
                                    "x_test, y_test")
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file; pass an .npz with x_train, y_train, x_test, y_test")
        return read_npz(p)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


class MemoryData:
    """A data set resident on the training device: uint8 NCHW images, int64 labels, per-channel mean/std."""

    def __init__(self, arrays: ImageArrays, device: torch.device, train_subset: int = 0, test_subset: int = 0):
        def prep(x: np.ndarray, n: int) -> torch.Tensor:
            x = x[:n] if n else x
            return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous().to(device)

        self.x_train = prep(arrays.x_train, train_subset)
        self.y_train = torch.from_numpy(arrays.y_train[:train_subset or None].astype(np.int64)).to(device)
        self.x_test = prep(arrays.x_test, test_subset)
        self.y_test = torch.from_numpy(arrays.y_test[:test_subset or None].astype(np.int64)).to(device)
        xf = self.x_train.float()
        self.mean = xf.mean((0, 2, 3)).view(1, -1, 1, 1)
        self.std = xf.std((0, 2, 3)).clamp_min(1.0).view(1, -1, 1, 1)
        self.num_classes = arrays.num_classes
        self.in_chans = self.x_train.shape[1]
        self.image_size = self.x_train.shape[-1]
        self.source = arrays.source

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def to_memory(arrays: ImageArrays, device, train_subset: int = 0, test_subset: int = 0) -> MemoryData:
    return MemoryData(arrays, torch.device(device), train_subset, test_subset)
