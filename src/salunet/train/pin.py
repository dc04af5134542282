"""``SaluPin``: the per-step SALU pin of our measured-best normalization-free recipe, for a training loop of your own.

``salunet train`` runs the same thing with ``--salu-recalibrate K --salu-recalibrate-every 1
--salu-recalibrate-measure reference --salu-project-grad`` (docs/RESULTS.md "Pinning on fixed images": with
``salunet_c18_v2`` + ``{"conv_ws": "scaled", "salu_b0": 0.012}``, K 0.15 and weight decay 8e-3 it is level with the
BN twin at the C-18's CPU budget; on ``salunet_c50_v2`` it leads the C-50's twin), and by name for the models
registered with it, ``salunet_c18_v3`` and ``salunet_c50_v3`` (``MODEL_TRAIN_DEFAULTS``). Two halves of a scale
normalisation, applied through SALU's own parameters instead of a statistic in the graph:

- **forward** (:meth:`SaluPin.step`, before each optimizer step): every SALU's a and b are set so that each
  channel's sqrt(ab) * rms(input) = K on a fixed batch of training images at the current weights (one more
  forward, no gradient; SALU's amplitude sqrt(a/b), which the gradient trains, is kept). No sample's forward
  depends on its batch, so batch size 1, evaluation and export are untouched;
- **backward** (``project_grad``): in training forwards each SALU input's gradient loses its per-channel component
  along the input, as the gradient through an in-graph RMS normalisation would (the forward's values unchanged).

Usage (``x_ref``: 32-128 training images, augmented and laid out as training feeds them; 32 pinned as well as 128
in docs/RESULTS.md "How many fixed images the pin needs", at a quarter of the extra forward)::

    pin = SaluPin(model, x_ref)             # hooks the bare model: wrap it (DDP, torch.compile) afterwards
    for epoch in range(epochs):
        pin.reset()                         # only matters with project_grad_rate < 1 (running sums)
        for x, y in loader:
            pin.step()                      # pin on x_ref at the current weights
            loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    pin.step()                              # at the final weights, before evaluating or saving

Under ``torch.distributed`` each process passes its share of the reference images and every site's sums are
added over the processes (``reduce="auto"``), so every process sets the same a and b: the pin of the images pooled.
With ``torch.compile``, set ``pin.forward = torch.compile(model)`` (the bare model's, never DDP's wrapper) and the
pin runs as one compiled graph of its own (:func:`.recalibrate.pin_in_forward`). Under autocast, call
:meth:`step` inside the same autocast context as training. The trainer keeps its own wiring of the same functions
(``train/loop.py``); tests/test_pin.py checks that a loop with this class ends at the trainer's weights.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import Tensor, nn

from .recalibrate import GradientProjection, _check, pin_in_forward, salu_sites

__all__ = ["SaluPin"]

Reduce = Callable[[Tensor], Tensor]


def _sum_over_processes(t: Tensor) -> Tensor:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def _wrapped(m: object) -> str | None:
    """What wrapper ``m`` is, if it is one SaluPin must not hook or pin through (DDP, DataParallel and FSDP hold
    the model as ``.module``, torch.compile as ``._orig_mod``)."""
    if isinstance(m, torch._dynamo.eval_frame.OptimizedModule):
        return "torch.compile"
    if isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return type(m).__name__
    # fully_shard (FSDP2) makes the model an instance of a class of its own, FSDP<cls>: a subclass of FSDPModule,
    # which exists only once torch.distributed.fsdp is imported (not imported here: it costs every process ~0.7 s)
    fsdp2 = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if (fsdp2 is not None and isinstance(m, fsdp2)) or type(m).__name__ == "FullyShardedDataParallel" \
            or hasattr(m, "_fsdp_wrapped_module"):
        return "FSDP"
    return None


class SaluPin:
    """Pin every SALU of ``model`` before each step (see the module docstring).

    ``model``: the bare model (not yet wrapped in DDP or compiled; its SALU sites are hooked here). ``reference``:
    the fixed images each :meth:`step` pins on (this process's share under ``torch.distributed``); ``None`` to pin
    on the batch passed to :meth:`step` instead (BatchNorm's way: not for batch size 1). ``target``: K, the
    sqrt(ab) * rms every channel is pinned to (0.15: the measured best with the projection; 0.5 without it).
    ``project_grad``: the backward half (measured to be needed at K 0.15). ``project_grad_rate`` < 1: the
    projection uses running sums over steps (each batch that share) instead of the batch's own statistics, for
    batches of one image. ``reduce``: ``"auto"`` adds each site's sums over the processes when
    ``torch.distributed`` is initialised (nothing otherwise), ``None`` never, or a callable ``t -> t`` summed in
    place. ``forward``: what runs the pinning forward (default the model; ``torch.compile(model)`` for one compiled
    graph); settable later as the attribute ``forward``."""

    def __init__(self, model: nn.Module, reference: Tensor | None, target: float = 0.15, *, project_grad: bool = True,
                 project_grad_rate: float = 1.0, reduce: str | Reduce | None = "auto",
                 forward: Callable[[Tensor], Tensor] | None = None):
        if (kind := _wrapped(model)) == "FSDP":
            raise ValueError("SaluPin: model is sharded by FSDP, which SaluPin does not support (the pin sets every "
                             "SALU's a and b in place, whole); use DDP, or a single process")
        if kind is not None:
            raise ValueError(f"SaluPin: model is wrapped by {kind}; build SaluPin on the bare model first and wrap it "
                             "afterwards (its SALU sites must be hooked before DDP or torch.compile sees them)")
        if not salu_sites(model):
            raise ValueError("SaluPin: the model has no SALU to pin; convert it first (salunet.convert) or use a "
                             "SaluNet (salunet.create_model)")
        _check(target, project_grad_rate)  # the rate is checked whether or not the projection is on
        if reduce not in ("auto", None) and not callable(reduce):
            raise ValueError(f"SaluPin: reduce must be 'auto', None or a callable, got {reduce!r}")
        self.model, self.target, self.forward = model, float(target), forward
        self.reference = None if reference is None else self._checked(reference, "reference")
        self._reduce = reduce
        self.projection = GradientProjection(model, project_grad_rate) if project_grad else None

    def _checked(self, x: Tensor, what: str, moved: bool = False) -> Tensor:
        """``x`` if it is a non-empty tensor of images on the model's device, else a ValueError with the fix;
        ``moved``: ``x`` was on the model's device when SaluPin was built (the reference images at a later step)."""
        if not isinstance(x, Tensor):
            raise ValueError(f"SaluPin: {what} must be a tensor of images, got {type(x).__name__}")
        if x.dim() == 0 or len(x) == 0:
            raise ValueError(f"SaluPin: {what} holds no images (shape {tuple(x.shape)}); pass a batch, e.g. the "
                             "first 128 training images")
        device = next(iter(self.model.parameters())).device
        if x.device != device:
            fix = ("the model moved after SaluPin was built; build SaluPin after moving the model to its device"
                   if moved else f"move it with {what}.to({str(device)!r})")
            raise ValueError(f"SaluPin: {what} is on {x.device}, the model on {device}; {fix}")
        return x

    def _reduce_fn(self) -> Reduce | None:
        if self._reduce == "auto":
            dist = torch.distributed
            return _sum_over_processes if dist.is_available() and dist.is_initialized() else None
        return self._reduce

    def step(self, x: Tensor | None = None) -> dict[str, Tensor]:
        """Pin every SALU on ``x`` (default: the reference images) at the current weights; call it before each
        optimizer step's forward, and once more after the last step, before evaluating or saving. Returns, per
        site, the median factor applied to a and b (0-d float64 tensors on the model's device; reading them makes
        the host wait for the device). Under ``torch.distributed`` (``reduce`` summing over the processes) it is a
        collective: every process calls it, the same number of times (not only the one that saves)."""
        if x is None:
            if self.reference is None:
                raise ValueError("SaluPin.step: no images to pin on; pass the step's batch, or build SaluPin with "
                                 "reference images")
            x, what = self.reference, "reference"
        else:
            what = "x"
        self._checked(x, what, moved=what == "reference")  # at every call: the model may have moved since
        if self.forward is not None and self.forward is not self.model and (
                _wrapped(self.forward) != "torch.compile" or self.forward._orig_mod is not self.model):
            raise ValueError("SaluPin: forward must be the model or torch.compile(model) of that same bare model, not "
                             "a wrapper such as DDP's (each site's sums are added over the processes by reduce)")
        return pin_in_forward(self.model, x, self.target, forward=self.forward, reduce=self._reduce_fn())

    def reset(self) -> None:
        """Restart the projection's running sums (``project_grad_rate`` < 1): at each epoch's start, as the
        trainer does."""
        if self.projection is not None:
            self.projection.reset()

    def remove(self) -> None:
        """Take the projection's hooks off the model (the pinned a and b stay)."""
        if self.projection is not None:
            self.projection.remove()
            self.projection = None

    def __enter__(self) -> "SaluPin":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
