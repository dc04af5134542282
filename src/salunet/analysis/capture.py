"""Capture stage outputs with forward hooks (always removed, also when the forward raises).

Stages are what a model's ``stages()`` method names (``stem``, ``layer1`` .. ``layer4`` for the ResNets;
``embed`` and ``block1`` .. for the ViTs) plus ``features``: the input of the classifier ``fc`` (the pooled /
cls-token representation). A model without ``stages()`` gets its direct children. Captured tensors are detached
and moved to the CPU in float32, batch after batch.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from .._modes import eval_modes

__all__ = ["named_stages", "hooked", "capture", "capture_batches"]


def named_stages(model: nn.Module) -> dict[str, nn.Module]:
    """Ordered ``{name: module}`` of the stages to capture (``features`` is added by :func:`hooked`)."""
    stages = getattr(model, "stages", None)
    if callable(stages):
        return dict(stages())
    return dict(model.named_children())


@contextmanager
def hooked(model: nn.Module, names: Iterable[str] | None = None) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Context manager: while open, every forward of ``model`` appends the output of each selected stage (and
    ``features``, the classifier's input, when the model has an ``fc``) to ``store[name]``. Hooks are removed on
    exit whatever happens."""
    stages = named_stages(model)
    wanted = list(stages) + (["features"] if isinstance(getattr(model, "fc", None), nn.Module) else [])
    if names is not None:
        names = list(names)
        unknown = [n for n in names if n not in wanted]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; this model has {', '.join(wanted)}")
        wanted = names
    store: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
    handles = []

    def keep(name):
        def hook(_m, inputs, output=None):
            t = inputs[0] if output is None else output
            if isinstance(t, (tuple, list)):
                t = t[0]
            store[name].append(t.detach().float().cpu())
        return hook

    try:
        for name in wanted:
            if name == "features":
                handles.append(model.fc.register_forward_pre_hook(keep(name)))
            else:
                handles.append(stages[name].register_forward_hook(keep(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture(model: nn.Module, x: torch.Tensor, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Stage outputs of one forward of ``x`` in eval mode (the model's mode is restored)."""
    return capture_batches(model, [x], names)


@torch.no_grad()
def capture_batches(model: nn.Module, batches: Iterable, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Stage outputs over several batches (each a tensor or an (x, y) pair), concatenated along dim 0."""
    with eval_modes(model), hooked(model, names) as store:
        for b in batches:
            model(b[0] if isinstance(b, (tuple, list)) else b)
    return {k: torch.cat(v) for k, v in store.items() if v}
