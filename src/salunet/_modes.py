"""One owner for "this module in eval mode for one pass": :func:`eval_modes`."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["eval_modes"]


@contextmanager
def eval_modes(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the ``with`` block, then every submodule back to its *own* mode, also on an exception.
    ``model.train(was_training)`` would set every submodule to the root's mode: a frozen BatchNorm, a dropout or a
    SALU site the user had put in eval mode inside a training model would come back in train mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
