"""Pin every SALU's operating point between epochs, with no batch statistics in the forward.

``salunet train --salu-recalibrate K`` (docs/RESULTS.md "Pinning the SALU inputs' scale"). SALU's argument is
t = sqrt(ab) x, and scaling its input x by c is the same function as scaling a and b by c (the amplitude
A = sqrt(a/b) is unchanged). So the fraction of a channel's inputs that SALU saturates depends only on
sqrt(ab) * rms(x). BatchNorm keeps its output at unit scale whatever the kernels before it learn, at every step,
from the batch; the normalization-free models cannot, and the 12-epoch weight-decay sweep measured their SALU
inputs drifting (shrinking with centred kernels, growing past the knee with scaled WS).

:func:`recalibrate_salu` measures, per SALU channel, the RMS of its input over a few training batches (no
gradient, the model in eval mode) and sets log a and log b so that sqrt(ab) * rms = K, the same K for every
channel, site after site in one forward (each from its input as the sites before it, already set, produce it). The forward stays a pointwise function of each sample: batch size 1, inference and export are
untouched; only the parameters move, once an epoch, and the checkpoint holds them (a resumed run repeats the same
recalibrations, since the batches are the epoch's seeded ones). Under DDP the per-channel sums are all-reduced,
so every rank sets the same parameters.

``--salu-recalibrate-every N`` moves the recalibration inside the epoch: before every N-th optimizer step (global
step count), on that step's own batch, so that the step's forward sees every SALU site at the target (N = 1 is
BatchNorm's scale pinning with the statistics as constants, applied through SALU's parameters; the gradient
still moves A = sqrt(a/b), and sqrt(ab) until the next recalibration). It costs one more forward per
recalibration (on the compiled kernel path, CUDA's default, with the kernels training compiled for that shape).
The trainer has the SALU sites pin themselves in that forward (:func:`pin_in_forward`: the same parameters bitwise
as the hooks' pin, and with ``--compile`` one compiled graph instead of an uncompiled forward with a hook per site);
under DDP each site's sums are all-reduced inside that forward (traced into the compiled graph).
``--salu-recalibrate-rate r`` pins a running mean square instead of the batch's own (BatchNorm's running variance
with momentum r), for batches too small to measure a channel's scale on. ``--salu-recalibrate-measure step`` takes
the statistics from the training forwards themselves (:class:`StepStatistics`), one step late, instead of one more
forward. ``--salu-recalibrate-measure reference`` pins every step on the same fixed training images (the
first ceil(128 / B) batches of epoch 1 at batch size B, ``train/loop.py``) at the current weights: one more forward, but no batch statistics and no
lag, so the network trains as the fixed function it is evaluated as, at any batch size.
``--salu-eval-pin N`` (:func:`pin_to_average`) pins, before each evaluation, on the average of N batches instead
of the last step's one, as BatchNorm evaluates with running statistics.
``--salu-project-grad`` (:class:`GradientProjection`) adds the other half of a scale normalisation, the backward:
each SALU input's gradient loses its per-channel component along the input, as the gradient through an in-graph
batch RMS would remove it; the forward is untouched.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .._modes import eval_modes
from ..nn import SALU, SALUAct, kernels, modules

__all__ = ["salu_sites", "salu_input_rms", "recalibrate_salu", "pin_in_forward", "pin_to_average", "StepStatistics",
           "GradientProjection", "RunningCoefficient", "project_radial_grad"]


def salu_sites(model: nn.Module) -> dict[str, tuple[nn.Module, SALU]]:
    """name -> (module whose input is the SALU's input, the SALU holding log a / log b): every standalone SALU and
    the SALU of every fused SALU -> gate module (SALUAct, SALUAddAct), whose inner SALU's forward never runs."""
    inner = {id(m.norm) for m in model.modules() if isinstance(m, SALUAct)}
    sites = {}
    for name, m in model.named_modules():
        if isinstance(m, SALUAct):
            sites[name] = (m, m.norm)
        elif isinstance(m, SALU) and id(m) not in inner:
            sites[name] = (m, m)
    return sites


def _sum_squares(salu: SALU, x: Tensor) -> Tensor:
    """Per-channel sums of squares of the site input ``x`` and, last, the number of values each sums, packed in one
    float64 vector (one sum for scalar-parameter SALUs): what the processes' all-reduce adds up."""
    x = x.detach()
    axis = salu.channel_axis(x)
    sq = x.square() if x.dtype in (torch.float32, torch.float64) else x.float().square()  # squares and their sums
    # in at least float32 (torch's reductions sum pairwise: ~1e-6 relative, where the pin needs ~1e-3; a float64
    # accumulation cost 2.4x on CPU, paid at every site and step by --salu-recalibrate-measure step)
    if axis is None:
        s2, n = sq.sum().double().reshape(1), float(x.numel())
    else:
        dims = tuple(d for d in range(x.dim()) if d != axis % x.dim())
        s2, n = sq.sum(dims).double(), float(x.numel() // x.shape[axis])
    # the count as a fill on the device, not a copy from the host at every site
    return torch.cat([s2, torch.full((1,), n, dtype=torch.float64, device=s2.device)])


def _rms(salu: SALU, packed: Tensor) -> Tensor:
    rms = (packed[:-1] / packed[-1]).sqrt()
    return rms.reshape(()) if salu.num_features is None else rms


def _input_rms(salu: SALU, x: Tensor, reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
    """The per-channel RMS of the site input ``x`` (over processes with ``reduce``) as float64, 0-d for
    scalar-parameter SALUs: what a hook and a pinning site both measure."""
    packed = _sum_squares(salu, x)
    return _rms(salu, reduce(packed) if reduce is not None else packed)


def _rms_hook(salu: SALU, reduce: Callable[[Tensor], Tensor] | None, then: Callable[[Tensor], None]):
    """A forward pre-hook that computes the per-channel RMS of the site's input (over processes with ``reduce``)
    as float64 (0-d for scalar-parameter SALUs) and passes it to ``then``."""
    def hook(_m, args):
        then(_input_rms(salu, args[0], reduce))
    return hook


@torch.no_grad()
def _set_logs(salu: SALU, rms: Tensor, target: float, rate: float) -> Tensor:
    """Scale one site's a and b by c per channel so that its argument's mean square, taken as
    ``(1 - rate) * target**2 + rate * (sqrt(ab) * rms)**2``, becomes ``target**2`` (channels with rms 0 kept, and
    those whose rms is not finite: an overflowed input, as float16 can give, would set a and b to 0 for good);
    returns log c per channel (float64)."""
    la, lb = salu.log_a, salu.log_b
    arg = torch.exp(0.5 * (la.double() + lb.double())).reshape(rms.shape) * rms
    mean_sq = (1 - rate) * target ** 2 + rate * arg.square()  # rate 1: arg^2, this batch alone
    log_c = torch.where((arg > 0) & torch.isfinite(arg), 0.5 * torch.log(target ** 2 / mean_sq.clamp_min(1e-300)),
                        torch.zeros_like(arg))
    la.add_(log_c.reshape(la.shape).to(la.dtype))
    lb.add_(log_c.reshape(lb.shape).to(lb.dtype))
    return log_c


def _pin(salu: SALU, rms: Tensor, target: float, rate: float) -> Tensor:
    """:func:`_set_logs`, returning the median c as a 0-d float64 tensor on the parameters' device (a Python float
    here would make the host wait for the device at every site of every pinned step)."""
    return torch.exp(_set_logs(salu, rms, target, rate)).median()


def _floats(factors: dict[str, Tensor], sync: bool) -> dict[str, float] | dict[str, Tensor]:
    """The per-site factors as Python floats, with one host-device synchronisation for all of them (``sync``), or
    as they are (0-d tensors)."""
    if not sync or not factors:
        return factors
    return dict(zip(factors, torch.stack(list(factors.values())).tolist()))


@torch.no_grad()
def _forward_with_hooks(model: nn.Module, batches: Iterable, make_hook, training_shape: bool = False) -> None:
    """One forward in eval mode of all ``batches`` concatenated (each a tensor or a tuple whose first item is the
    input), with ``make_hook(name, salu)`` as the forward pre-hook of every SALU site. ``training_shape``: the
    input has the shape training compiles for (one training batch), so the compiled kernel path is kept."""
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not xs:
        raise ValueError("SALU calibration needs at least one batch")
    x = torch.cat(xs) if len(xs) > 1 else xs[0]
    handles = [m.register_forward_pre_hook(make_hook(name, salu)) for name, (m, salu) in salu_sites(model).items()]
    mode = kernels.get_kernel_mode()
    if not training_shape and kernels.kernel_path(x.device).startswith("compiled"):
        # one forward of an input shape that training never sees: on the compiled path (CUDA's default) it would
        # compile a kernel per op for that shape, once, for nothing; the same math op by op costs one forward
        kernels.set_kernel_mode("eager")
    try:
        with eval_modes(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
        kernels.set_kernel_mode(mode)


def salu_input_rms(model: nn.Module, batches: Iterable, reduce: Callable[[Tensor], Tensor] | None = None
                   ) -> dict[str, Tensor]:
    """Per-channel RMS of every SALU site's input over ``batches`` (float64 vectors; 0-d for scalar-parameter
    SALUs). ``reduce``: sums over processes (DDP's all-reduce) of each site's (sums of squares, count)."""
    out: dict[str, Tensor] = {}
    _forward_with_hooks(model, batches, lambda name, salu: _rms_hook(salu, reduce, lambda r: out.__setitem__(name, r)))
    return out


def recalibrate_salu(model: nn.Module, batches: Iterable, target: float,
                     reduce: Callable[[Tensor], Tensor] | None = None, training_shape: bool = False,
                     rate: float = 1.0, sync: bool = True) -> dict[str, float]:
    """Set every SALU channel's log a and log b so that sqrt(ab) * rms(input) = ``target`` (module docstring).
    ``rate`` in (0, 1] (``--salu-recalibrate-rate``, for small per-step batches): the argument's mean square is
    taken as an exponential moving average, ``(1 - rate) * target**2 + rate * ab * mean(x**2)``, of this batch and
    the earlier ones (which the last recalibration left at exactly ``target**2``), as BatchNorm's running variance
    with momentum ``rate``: an average of squares, so unbiased where a batch has few values per channel (an
    average of logs would be biased low). ``rate`` 1: this batch alone.
    ``training_shape``: ``batches`` is one training batch (``--salu-recalibrate-every``), whose shape the compiled
    kernel path has already compiled: it is kept (otherwise the forward runs op by op rather than compile for a
    shape training never sees).

    One forward of ``batches`` concatenated: each site is set in its pre-hook, from its input as the sites before
    it (already set) produce it, before it runs; so every site meets the target exactly on these inputs (with
    ``rate`` 1), however the earlier sites' changes moved them. Channels whose input is exactly 0 are left as they
    are. Returns, per site, the median factor c applied to a and b (1 = no change); ``sync`` False: as 0-d tensors
    on the model's device, so that the host need not wait for the device (the trainer's per-step pin)."""
    _check(target, rate)
    factors: dict[str, Tensor] = {}

    def make_hook(name, salu):
        return _rms_hook(salu, reduce, lambda rms: factors.__setitem__(name, _pin(salu, rms, target, rate)))

    with torch.no_grad():
        _forward_with_hooks(model, batches, make_hook, training_shape)
    return _floats(factors, sync)


# (target, rate, reduce) of the running pin_in_forward
_IN_FORWARD: tuple[float, float, Callable[[Tensor], Tensor] | None] | None = None


def _pin_site(salu: SALU, x: Tensor) -> None:
    """``salunet.nn.modules.pin_site`` while :func:`pin_in_forward` runs: the pre-hook's work, done by the site."""
    target, rate, reduce = _IN_FORWARD
    _set_logs(salu, _input_rms(salu, x, reduce), target, rate)


def pin_in_forward(model: nn.Module, x: Tensor, target: float, rate: float = 1.0,
                   forward: Callable[[Tensor], Tensor] | None = None,
                   reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """:func:`recalibrate_salu` of one batch ``x`` of the shape training compiled for, with the pin done by the SALU
    modules themselves (``salunet.nn.modules.pin_site``) instead of a forward pre-hook per site: the same functions
    in the same order (so the same parameters bitwise, op by op), but a compiled model (``forward``: the
    ``torch.compile`` of ``model``; default ``model``) runs it as one graph of its own, compiled once, where the
    hooks' forward runs ``model`` uncompiled, each site a call of its own. ``reduce`` (as :func:`recalibrate_salu`'s:
    under DDP a sum over the processes, ``torch.distributed.all_reduce``, which ``torch.compile`` traces into the
    graph) is applied to each site's packed sums before its pin, in the forward's order, so every process must run
    the same sites in the same order, as a DDP model's forward does.

    Returns, per site (in :func:`salu_sites`' order), the median factor applied to a and b as a 0-d float64 tensor
    on the model's device, taken from the parameters before and after: within the parameters' rounding of
    :func:`recalibrate_salu`'s; 1 for a site the forward did not reach, the product for one called twice.

    ``forward`` must run ``model`` (its ``torch.compile``, not another model). ``target`` and ``rate`` are constants
    of the compiled graph (a new value compiles it again: the trainer's are fixed for a run). The slot is
    process-wide: a SALU forward in another thread during the pin would be pinned too."""
    global _IN_FORWARD
    _check(target, rate)
    if modules.pin_site is not None:
        raise RuntimeError("pin_in_forward: another pinning forward is running (it does not nest)")
    sites = {name: salu for name, (_, salu) in salu_sites(model).items()}
    if not sites:
        raise ValueError("pin_in_forward: the model has no SALU to pin")
    before = torch.cat([s.log_a.detach().reshape(-1) for s in sites.values()]).double()
    _IN_FORWARD, modules.pin_site = (float(target), float(rate), reduce), _pin_site
    try:
        with torch.no_grad(), eval_modes(model):
            (model if forward is None else forward)(x)
    finally:
        _IN_FORWARD, modules.pin_site = None, None
    log_c = torch.cat([s.log_a.detach().reshape(-1) for s in sites.values()]).double() - before
    sizes = [s.log_a.numel() for s in sites.values()]
    return {name: torch.exp(c).median() for name, c in zip(sites, log_c.split(sizes))}


def pin_to_average(model: nn.Module | Sequence[nn.Module], batches: Iterable, target: float,
                   reduce: Callable[[Tensor], Tensor] | None = None, training_shape: bool = False):
    """Pin every SALU on the average of ``batches``, one forward per batch (``--salu-eval-pin``): batch j is pinned
    with rate n_j / (n_0 + ... + n_j) (n: its number of samples; 1 / (j + 1) for batches of one size), so that
    after it each site's argument has mean square ``target**2`` on the running average of the mean squares measured
    so far, weighted by sample count (BatchNorm's running statistics with momentum None). At the first site this
    is exactly the mean square of all the batches pooled; at a later one each batch's is measured after the sites
    before it moved for the batches before, a small difference once they have settled. Memory is one batch's
    forward, where :func:`recalibrate_salu` of the list would forward all of them at once. Under DDP every rank
    passes its share of each batch (shares of one size across ranks, as the trainer's are).

    ``model`` may be a list of models (the trainer's raw and EMA weights): each batch is drawn once and pins each
    model in turn. Returns, per site, the median over channels of the total factor applied to a and b (1 = no
    change); for a list, one such dict per model."""
    models = [model] if isinstance(model, nn.Module) else list(model)
    sites = [salu_sites(m) for m in models]
    before = [{name: salu.log_a.detach().clone() for name, (_, salu) in ss.items()} for ss in sites]
    seen = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        n = len(x)
        if n == 0:
            raise ValueError("SALU calibration got an empty batch")
        seen += n
        for m in models:
            recalibrate_salu(m, [x], target, reduce=reduce, training_shape=training_shape, rate=n / seen)
    if seen == 0:
        raise ValueError("SALU calibration needs at least one batch")
    out = [{name: float(torch.exp(ss[name][1].log_a.detach().double() - b[name].double()).median()) for name in ss}
           for ss, b in zip(sites, before)]
    return out[0] if isinstance(model, nn.Module) else out


def _check(target: float, rate: float) -> None:
    if not (target > 0 and math.isfinite(target)):
        raise ValueError(f"SALU recalibration target must be a positive number, got {target}")
    if not 0 < rate <= 1:
        raise ValueError(f"SALU recalibration rate must be in (0, 1] (1 = the measured statistics alone), got {rate}")


class _SiteHooks:
    """Forward pre-hooks on every SALU site of a model (:func:`salu_sites`) that act on training forwards only
    (module in train mode, autograd on: evaluation and the calibration forward pass through untouched). They are
    attached at construction and stay until :meth:`remove`, so a compiled model traces them once. Subclasses define
    ``_on_input(name, salu, args)``, which returns the site's new positional arguments or None (unchanged)."""

    def __init__(self, model: nn.Module):
        self._sites = salu_sites(model)
        self._handles = [m.register_forward_pre_hook(self._hook(name, salu))
                         for name, (m, salu) in self._sites.items()]

    def _hook(self, name: str, salu: SALU):
        def hook(module, args):
            if module.training and torch.is_grad_enabled():
                return self._on_input(name, salu, args)
            return None
        return hook

    def _on_input(self, name: str, salu: SALU, args: tuple) -> tuple | None:
        raise NotImplementedError

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class StepStatistics(_SiteHooks):
    """``--salu-recalibrate-measure step``: the statistics the training forwards already compute, instead of one
    more forward. Forward pre-hooks on every SALU site add up the per-channel sums of squares of its input during
    the training forwards (modules in train mode with autograd on: evaluation and the calibration forward are
    skipped); :meth:`pin` sets every site from what was gathered since the last call, then starts again.

    The pinning is one step late, where the extra forward's is exact: step t trains on parameters pinned to step
    t-1's batch as step t-1's weights produced it, and each site is set from its input as the sites before it were
    (not as their new setting moves it). So corrections overshoot: the trainer pins the first due step of every
    epoch with the extra forward (nothing is gathered yet then; at the run's rate), and requires a rate <= 0.5 (at
    rate 1 the per-site corrections grow into an oscillation within ten steps; at 0.5 they stay at the exact pin's
    size: scripts/pin_lag.py). It costs one pass over each SALU input (a square and a sum) per step instead of a
    forward (the hooks: :class:`_SiteHooks`)."""

    def __init__(self, model: nn.Module):
        self._sums: dict[str, Tensor] = {}
        super().__init__(model)

    def _on_input(self, name: str, salu: SALU, args: tuple) -> None:
        packed = _sum_squares(salu, args[0])
        self._sums[name] = self._sums[name] + packed if name in self._sums else packed

    def reset(self) -> None:
        """Forget what was gathered (the start of an epoch: a resumed run starts there with nothing gathered)."""
        self._sums = {}

    def pin(self, target: float, rate: float = 1.0, reduce: Callable[[Tensor], Tensor] | None = None,
            sync: bool = True) -> dict[str, float] | None:
        """Set every site from the statistics gathered since the last call (``reduce``: one all-reduce of them
        all, so every process sets the same parameters) and start again; None if nothing was gathered (the
        first step of an epoch). Returns, per site, the median factor applied to a and b (``sync`` False: 0-d
        tensors, as :func:`recalibrate_salu`)."""
        _check(target, rate)
        if not self._sums:
            return None
        if len(self._sums) != len(self._sites):
            missing = sorted(set(self._sites) - set(self._sums))
            raise RuntimeError(f"SALU statistics: the training forward did not reach {', '.join(missing)}")
        names = list(self._sites)
        packed = torch.cat([self._sums[n] for n in names])
        if reduce is not None:
            packed = reduce(packed)
        self._sums = {}
        out, i = {}, 0
        for n in names:
            salu = self._sites[n][1]
            k = (1 if salu.num_features is None else salu.num_features) + 1
            out[n] = _pin(salu, _rms(salu, packed[i:i + k]), target, rate)
            i += k
        return _floats(out, sync)


class RunningCoefficient:
    """``--salu-project-grad-rate r`` < 1: one site's projection coefficient from running sums over backward passes
    (optimizer steps; micro-batches under ``--accum-steps``): N <- (1 - r) N + r sum(g x) and
    D <- (1 - r) D + r sum(x²) per channel, and the coefficient is N / D, the least-squares one of the recent
    batches pooled (the bias corrections of the two averages cancel, so the first step uses its own batch's).
    A ratio of averages, not an average of ratios: a batch in which a channel is nearly silent (sum(x²) tiny, its
    own ratio huge) weighs in by its sum(x²), so it cannot throw the coefficient of the next batches (an average of
    the ratios did: non-finite gradients within 7 epochs on CIFAR-10); a channel silent so far gets 0.

    No Python state changes inside the backward, so a compiled model (``torch.compile``) carries it: N and D are
    tensors read by the backward as inputs, and the backward hands its batch's raw sums out as the gradient of
    ``probe``, a zero leaf tensor passed through the forward; a hook on the probe's gradient accumulation folds
    them into N and D (the same expression the backward used) and clears it. So the sums move with ``.backward()``
    (which accumulates into every leaf); ``torch.autograd.grad`` and ``backward(inputs=...)`` without the probes
    leave them as they were (pass the probes among the inputs and :meth:`fold` their gradients to keep them
    running). A site called twice in one forward has the two calls' sums pooled (each call's backward subtracts
    the old sums' coefficient updated with its own). :meth:`reset` restarts the sums. The gradients must not carry a loss scale
    (fp16's GradScaler changes it, and its skipped steps are not finite): the trainer refuses ``--amp fp16``."""

    def __init__(self, rate: float, channels: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        self.rate = float(rate)
        self.num = torch.zeros(channels, dtype=dtype, device=device)
        self.den = torch.zeros(channels, dtype=dtype, device=device)
        self.probe = torch.zeros(2, channels, dtype=dtype, device=device, requires_grad=True)
        self.probe.register_post_accumulate_grad_hook(self._fold)

    def _fold(self, probe: Tensor) -> None:
        sums = probe.grad
        probe.grad = None
        self.fold(sums)

    def fold(self, sums: Tensor) -> None:
        """Fold one backward's raw sums (the probe's gradient: sum(g x) and sum(x²) per channel) into N and D. New
        tensors, not in-place updates: a forward not yet backpropagated has saved the old ones."""
        with torch.no_grad():
            self.num = _running_update(self.num, sums[0], self.rate)
            self.den = _running_update(self.den, sums[1], self.rate)

    def coefficient(self) -> Tensor:
        """The per-channel coefficient of the sums as they stand (0 for a channel silent so far)."""
        return _ratio(self.num, self.den)

    def reset(self) -> None:
        self.num, self.den = torch.zeros_like(self.num), torch.zeros_like(self.den)


def _running_update(old: Tensor, new: Tensor, rate: float) -> Tensor:
    return old * (1 - rate) + new * rate


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


class _ProjectRadialGrad(torch.autograd.Function):
    """Identity forward; the backward removes from the gradient g its component along the input x per channel
    along ``axis`` (over every other dim; over all with None): g - x * sum(g x) / sum(x²), summed in at least
    float32 (channels with sum(x²) = 0 keep g); on CPU in the C++ kernel (``kernels.radial_project``, chosen in
    the forward), op by op elsewhere, in compiled or recorded graphs and for a double backward.
    With the running sums ``num``, ``den`` and ``probe`` of a :class:`RunningCoefficient` (rate ``rate``), the
    coefficient is that of the sums updated with this batch's, whose raw sums are the probe's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, axis: int | None, rate: float = 1.0, num: Tensor | None = None,
                den: Tensor | None = None, probe: Tensor | None = None) -> Tensor:
        ctx.save_for_backward(x, num, den)
        ctx.axis, ctx.rate, ctx.running = axis, rate, num is not None
        ctx.cpp = kernels.radial_project_in_cpp(x)  # the path is the forward's, as every kernel's (CPU: C++)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, num_saved, den_saved = ctx.saved_tensors
        if ctx.cpp and type(g) is Tensor and not torch.is_grad_enabled():  # (a double backward needs the ops' graph)
            out, sums = kernels.radial_project(g, x, ctx.axis, (num_saved, den_saved) if ctx.running else None,
                                               ctx.rate)
            return out, None, None, None, None, (sums.to(num_saved.dtype) if ctx.running else None)
        dims = tuple(range(x.dim())) if ctx.axis is None else tuple(d for d in range(x.dim()) if d != ctx.axis)
        wide = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        xf, gf = x.to(wide), g.to(wide)
        num = (gf * xf).sum(dims, keepdim=True)
        den = xf.square().sum(dims, keepdim=True)
        if not ctx.running:
            return (gf - xf * _ratio(num, den)).to(g.dtype), None, None, None, None, None
        shape = num.shape
        num_old, den_old = num_saved.to(wide).view(shape), den_saved.to(wide).view(shape)
        coef = _ratio(_running_update(num_old, num, ctx.rate), _running_update(den_old, den, ctx.rate))
        sums = torch.stack([num.flatten(), den.flatten()]).to(num_saved.dtype)  # the probe's dtype
        return (gf - xf * coef).to(g.dtype), None, None, None, None, sums


def project_radial_grad(x: Tensor, channel_axis: int | None, running: RunningCoefficient | None = None) -> Tensor:
    """``x`` unchanged in the forward; in the backward, per channel (over every other dim: the batch and the
    positions; over everything with ``channel_axis=None``), the gradient loses its component along ``x``. This is
    what the gradient through an uncentred scale normalisation, x / sqrt(mean(x²)), does to the gradient of what
    follows it, at the point where the forward's scale is pinned (float64 check: tests/test_recalibrate.py).
    ``running``: subtract x times the per-channel coefficient of running sums over steps instead of this batch's own
    (``--salu-project-grad-rate``: no statistic of the batch beyond its share of the sums)."""
    axis = None if channel_axis is None else channel_axis % x.dim()
    if running is None:
        return _ProjectRadialGrad.apply(x, axis)
    return _ProjectRadialGrad.apply(x, axis, running.rate, running.num, running.den, running.probe)


def _running_for(salu: SALU, rate: float) -> RunningCoefficient:
    dtype = salu.log_a.dtype if salu.log_a.dtype in (torch.float32, torch.float64) else torch.float32
    return RunningCoefficient(rate, salu.num_features or 1, dtype, salu.log_a.device)


class GradientProjection(_SiteHooks):
    """``--salu-project-grad``: the backward half of a per-step scale normalisation, for the SALU inputs. Pinned
    every step (``--salu-recalibrate-every 1``), every SALU site's forward already sees its input at the target
    scale of the step's batch, but the statistic is a constant: the gradient that reaches the layers before it
    keeps its component along the input, which an in-graph normalisation removes (the BatchNorm diagnostics in
    docs/RESULTS.md "Taking BatchNorm apart" measure that half at 2.5 points to the BN model; this projection
    gained the pinned SALU at K 0.5 nothing, with SWALU or with ReLU; with the SALU pinned into its linear range,
    K 0.05, the model fits and tests as the twin does: "The layer: SALU's curve"; without it that linear pin is
    3 points below the curved one, so the curve and this projection stand in for each other: "The curve and the
    statistic's gradient").
    The :class:`_SiteHooks` pass every SALU input through :func:`project_radial_grad` in training forwards;
    evaluation, inference and export never see it, and the forward's values are unchanged. The statistics are the
    process's own batch (under DDP each rank projects with its shard, as BatchNorm without SyncBatchNorm
    normalises). ``rate`` < 1 (``--salu-project-grad-rate``): each site subtracts the coefficient of running
    sums over the steps since :meth:`reset` (:class:`RunningCoefficient`; the trainer resets at every epoch's
    start, so a resumed run repeats it), which a batch of one image can also use."""

    def __init__(self, model: nn.Module, rate: float = 1.0):
        if not 0 < rate <= 1:
            raise ValueError(f"gradient projection rate must be in (0, 1] (1 = the batch's own), got {rate}")
        self._running = {name: _running_for(salu, rate) for name, (_, salu) in salu_sites(model).items()} \
            if rate < 1 else {}
        super().__init__(model)

    def _on_input(self, name: str, salu: SALU, args: tuple) -> tuple | None:
        x, running = args[0], self._running.get(name)
        if not x.requires_grad:  # no gradient reaches this input: nothing to project (nor to sum)
            return None
        if running is not None and running.num.device != x.device:
            raise ValueError(f"gradient projection of {name}: its running sums are on {running.num.device}, the input "
                             f"on {x.device}; build GradientProjection (or salunet.SaluPin) after moving the model "
                             "to its device")
        return (project_radial_grad(x, salu.channel_axis(x), running),) + tuple(args[1:])

    def reset(self) -> None:
        """Restart every site's running coefficient (the start of an epoch)."""
        for r in self._running.values():
            r.reset()
