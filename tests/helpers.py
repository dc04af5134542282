"""Builders of small, real-format test inputs (archives, folders, arrays)."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np


def cifar_batch_bytes(n: int, seed: int, label_key: bytes = b"labels", classes: int = 10) -> bytes:
    rng = np.random.RandomState(seed)
    d = {b"batch_label": b"test", b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
         label_key: [int(v) for v in rng.randint(0, classes, n)], b"filenames": [b"x.png"] * n}
    return pickle.dumps(d, protocol=2)


def make_cifar10_archive(path: Path, n_per_batch: int = 12) -> Path:
    """A .tar.gz in the official CIFAR-10 python layout (cifar-10-batches-py/data_batch_1..5, test_batch)."""
    with tarfile.open(path, "w:gz") as tf:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for i, name in enumerate(names):
            data = cifar_batch_bytes(n_per_batch, i)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_npz(path: Path, n_train=64, n_test=32, shape=(8, 8, 3), classes=10, **replace) -> Path:
    rng = np.random.RandomState(0)
    arrs = {"x_train": rng.randint(0, 256, (n_train, *shape)).astype(np.uint8),
            "y_train": rng.randint(0, classes, n_train).astype(np.int64),
            "x_test": rng.randint(0, 256, (n_test, *shape)).astype(np.uint8),
            "y_test": rng.randint(0, classes, n_test).astype(np.int64)}
    arrs.update(replace)
    arrs = {k: v for k, v in arrs.items() if v is not None}
    np.savez(path, **arrs)
    return path


def make_image_folder(root: Path, classes=("cat", "dog"), per_class=4, size=(20, 16), channels=3) -> Path:
    """ROOT/{train,val}/<class>/<i>.png of random pixels; ``size`` is (H, W); ``channels`` 1 saves grayscale (L)."""
    from PIL import Image

    rng = np.random.RandomState(0)
    shape = (*size, 3) if channels == 3 else tuple(size)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.randint(0, 256, shape).astype(np.uint8)).save(d / f"{i}.png")
    return root


def stage_stds(model, x) -> dict[str, float]:
    """Std of each named stage's output (the init rule's measure), captured by salunet's own hooks."""
    from salunet.analysis.capture import capture, named_stages

    return {k: v.std().item() for k, v in capture(model, x, names=list(named_stages(model))).items()}
