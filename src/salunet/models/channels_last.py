"""Moving a model to the channels_last memory format, with a guard for a torch CPU bug.

On CPU (torch 2.13, oneDNN 3.12), the backward of a 1x1 convolution with stride > 1 and 2-7 input channels
corrupts memory when its input or its kernel is in channels_last: a segfault, or "double free or corruption", at
the first backward (first measured 2026-11-29, on an earlier session's machine, with a plain ``nn.Conv2d``: 1 or
>= 8 input channels, 3x3 kernels, stride 1 and forward-only passes were fine). A ResNet's stage-2 shortcut is such a conv at width < 8, so
``salunet train --channels-last`` crashed on CPU there, for SaluNets and their BN twins alike. On an AVX2 machine
(re-measured 2026-11-29, torch 2.13.0, against the same conv with oneDNN off) the failure depends on the threads:
with one thread 1-6 input channels corrupt memory, with two the weight gradient of 1-4 input channels comes out
wrong without any error; the guarded layout (both contiguous) gives the right gradient for 2-7 channels. A single
input channel fails in every layout (its tensors are channels_last and contiguous at once), so no layout guards
it: :func:`unguardable_cpu_convs` names such convs and ``salunet train`` warns (the registered ResNets have one
at ``--width 1``: the stage-2 shortcut; a 1x1 stride-1 conv on ``x[..., ::2, ::2]`` computes the same and is
right, a rewrite left for when it matters).

:func:`to_channels_last` moves a model to channels_last and, for each such conv on a CPU, keeps the kernel and
the input in the contiguous format (a forward pre-hook copies the input): they are tiny by construction, so the
copies are small, and the rest of the model stays channels_last. :func:`guarded_convs` names them (``salunet
train`` prints them). A later ``model.to(memory_format=...)`` undoes the kernel's part: call
:func:`to_channels_last` again (it is idempotent). On other devices nothing is guarded (cuDNN has no such bug).

``torch.compile`` on CPU hits the same kernel whatever the tensors' layout: inductor's layout optimisation moves
every conv to channels_last when oneDNN is available (a compiled width-4 ResNet crashed at its first backward,
contiguous or not). :func:`guard_cpu_compile` turns that optimisation off for the process when a CPU model has
such a conv (then compiled width-4 ResNets, contiguous or channels_last, train: checked by hand 2026-11-29, a
compile being too slow for the test suite); ``salunet train --compile`` calls it and says so.
``tests/test_models.py`` trains the crashing eager case in float32 in a subprocess (and fails without the guard).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["to_channels_last", "guarded_convs", "guard_cpu_compile", "onednn_crash_prone", "unguardable_cpu_convs"]


def onednn_crash_prone(conv: nn.Module) -> bool:
    """Whether ``conv`` is a 2-d convolution of the shape whose CPU backward crashes in channels_last."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and max(conv.stride) > 1
            and 2 <= conv.in_channels <= 7)


def _contiguous_strides(t: Tensor) -> bool:
    """Whether ``t`` has the contiguous format's strides. ``is_contiguous()`` is no test: a 1x1 kernel in
    channels_last passes it, and torch still picks the channels_last kernel from its strides."""
    expect, strides = 1, []
    for n in reversed(t.shape):
        strides.append(expect)
        expect *= n
    return t.stride() == tuple(reversed(strides))


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    if _contiguous_strides(x):
        return None
    return (x.clone(memory_format=torch.contiguous_format),) + tuple(args[1:])


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model.to(memory_format=torch.channels_last)``, except for the crash-prone convs of a CPU model (module
    docstring), which keep their kernels contiguous and get their inputs contiguous. Idempotent; returns the
    model."""
    model = model.to(memory_format=torch.channels_last)
    for m in _crash_prone_cpu_convs(model).values():
        with torch.no_grad():  # every call: the .to() above has just made the kernel channels_last again
            m.weight.data = m.weight.data.clone(memory_format=torch.contiguous_format)
        if not getattr(m, "_salunet_contiguous", False):
            m.register_forward_pre_hook(_contiguous_input)
            m._salunet_contiguous = True
    return model


def guard_cpu_compile(model: nn.Module) -> list[str]:
    """Before ``torch.compile`` of a CPU model: if it has crash-prone convs, turn inductor's layout optimisation off
    for this process (module docstring) and return their names; otherwise change nothing and return []."""
    convs = _crash_prone_cpu_convs(model)
    if convs:
        import torch._inductor.config as inductor_config

        inductor_config.layout_optimization = False
    return list(convs)


def _crash_prone_cpu_convs(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if onednn_crash_prone(m) and m.weight.device.type == "cpu"}


def guarded_convs(model: nn.Module) -> list[str]:
    """The names of the convs that :func:`to_channels_last` kept contiguous."""
    return [name for name, m in model.named_modules() if getattr(m, "_salunet_contiguous", False)]


def unguardable_cpu_convs(model: nn.Module) -> list[str]:
    """The names of the CPU model's 1x1 convs with stride > 1 and one input channel: torch's oneDNN backward of
    them is wrong or corrupts memory whatever the layout (module docstring), so nothing here can guard them."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels == 1
            and m.weight.device.type == "cpu"]
