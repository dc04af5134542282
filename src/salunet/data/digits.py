"""The embedded default data set: scikit-learn's 8x8 handwritten digits (1,797 real images, 10 classes),
shipped inside the scikit-learn package, so ``salunet train`` works on a machine with no data and no network.

Images are grey levels 0..16, scaled to uint8 0..255 (x16, clipped) and kept 8x8x1. The split is fixed:
a seeded permutation, 1,437 train / 360 test images.

The images are read from the file scikit-learn keeps them in (``sklearn/datasets/data/digits.csv.gz``: one row
of 64 grey levels and the label per image) without importing scikit-learn, whose import costs every ``salunet
train`` on digits ~0.9 s; where that file is not found (another layout), ``sklearn.datasets.load_digits`` reads
them. tests/test_data.py checks that both give the same arrays.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from .cifar import ImageArrays, validate_arrays

__all__ = ["load_digits"]


def _packaged_file() -> Path | None:
    """scikit-learn's digits file, found without importing scikit-learn; None where it is not there."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float grey levels 0..16, labels (1797,)) as scikit-learn's loader gives them."""
    path = _packaged_file()
    if path is None:
        from sklearn.datasets import load_digits as _sk

        d = _sk()
        return d.images, d.target
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = np.loadtxt(f, delimiter=",")
    return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)


def load_digits() -> ImageArrays:
    images, target = _read_digits()
    x = np.clip(images * 16.0, 0, 255).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    y = target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(x))
    x, y = x[perm], y[perm]
    n_test = 360
    return validate_arrays(ImageArrays(x[n_test:], y[n_test:], x[:n_test], y[:n_test], 10,
                                       "sklearn.datasets.load_digits"), "digits")
