"""The embedded default data set: scikit-learn's 8x8 handwritten digits (1,797 real images, 10 classes),
shipped inside the scikit-learn package, so ``salunet train`` works on a machine with no data and no network.

Images are grey levels 0..16, scaled to uint8 0..255 (x16, clipped) and kept 8x8x1. The split is fixed:
a seeded permutation, 1,437 train / 360 test images.
"""
from __future__ import annotations

import numpy as np

from .cifar import ImageArrays, validate_arrays

__all__ = ["load_digits"]


def load_digits() -> ImageArrays:
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    x = np.clip(d.images * 16.0, 0, 255).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    y = d.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(x))
    x, y = x[perm], y[perm]
    n_test = 360
    return validate_arrays(ImageArrays(x[n_test:], y[n_test:], x[:n_test], y[:n_test], 10,
                                       "sklearn.datasets.load_digits"), "digits")
