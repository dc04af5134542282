"""Init rules shared by every model of the zoo (ResNets and the ViT): one dataclass, one function.

Why init is a first-class part of the models (docs/SPEC.md "Trainability at initialisation", **[decided]**):
without batch statistics nothing re-normalises the signal, so a SaluNet must start with activations of
order one in every stage or it does not learn (PyTorch's default conv init with SALU a0 = b0 = 1 loses the
signal ~400x across ResNet-18). The rules below keep every stage's activation std within [0.5, 2] at init
on unit-variance input for every registered SaluNet, at widths down to 4 channels and with deeper
``layers=`` overrides (``tests/test_models.py``). Reasons, rule by rule:

- ``conv="kaiming_normal"`` (fan-in, ReLU gain): the output variance of a conv equals twice the second
  moment of its input, which compensates the ~half of the second moment that each ReLU-like gate removes.
  PyTorch's default (kaiming_uniform, a=sqrt(5)) shrinks it ~3x per conv. Linear layers keep PyTorch's
  default: the ViT baseline uses it and must stay the paper's baseline.
- ``salu_a0`` (ResNets 1.5, ViT 1.0): SWALU (~SiLU at init) keeps about 0.36 of the second moment of a
  unit-variance input; a gain of 1.5 in the SALU before it brings the pair back to std ~0.9. The ViT's
  residual stream is dominated by its N(0, 1) embeddings and needs no gain.
- ``salu_b0 = 0.1``: width w = 1/sqrt(a0 b0) ~ 2.6 at a0 = 1.5, so SALU is near-linear on unit-scale input
  but bounded (A = sqrt(a0/b0) ~ 3.9); b0 = 1 saturates and compresses the signal.
- ``gate_b0 = 0.01``: SWALU ~ SiLU and GALU ~ GELU at init (the operator default).
- ``shortcut_a0 = 1``: the SALU on a downsampling shortcut bounds the stream entering a stage (amplitude
  sqrt(a0/salu_b0) ~ 3.2), which resets whatever variance the previous stage accumulated.
- ``block_gate_a0 = 4``: the gate after each block's residual sum starts ReLU-like (x * sigmoid(~4x))
  instead of SiLU-like. After the first gate the stream is mostly positive; a ReLU-like gate passes it
  almost unchanged, a SiLU-like one (x * sigmoid(x)) shrinks it ~0.88x per block, which compounds with
  depth (ResNet-18 with layers (3, 4, 23, 3) and the branch scaling below: std 0.01 at the end of stage 3)
  and, at small widths, with per-channel noise (salunet_c50 at width 4: layer4 std 0.28 without this rule).
  It is what makes the shortcut an identity path, and so what makes the next rule work.
- ``branch_a0`` with ``branch_scaling="sqrt_blocks"``: the SALU closing a residual branch gets gain
  ``branch_a0 / sqrt(n)`` in a stage of ``n`` blocks. Why: with an identity-like shortcut every block *adds*
  its branch's variance, so a stage of n blocks grows the variance ~ n * branch_var (measured: ResNet-18 with
  layers (3, 4, 23, 3) and a fixed gain reached std 4.5-5 at the end of stage 3). Scaling the branch by
  1/sqrt(n) makes the variance a stage adds independent of its depth (the argument of Fixup, SkipInit and
  other 1/sqrt(depth) residual scalings); the downsampling shortcut's SALU then resets it for the next
  stage. ``branch_a0`` is the gain of a one-block stage: 1.2 for BasicBlocks, 0.8 for the paper's
  Bottlenecks (their branch holds two amplifying SALU -> SWALU pairs), 1.2 again for Bottlenecks with centred
  kernels (``salunet_c50_v2``): part of what those pairs amplified was the per-channel mean shift that centring
  removes, and at 0.8 the centred C-50's stages decay to std 0.36-0.49 by layer4. ``branch_scaling="none"`` uses
  ``branch_a0`` as is.
Measured with these rules (2-12 seeds per case, batch 2-8): every stage std within [0.57, 1.7] for
salunet_c18 at widths 4, 8, 64 and salunet_c50 at widths 4, 8, 32, 64, both also with layers (3, 4, 23, 3);
salunet_c50_v2 within [0.64, 0.92] at widths 8, 16, 64 (ImageNet stem) and 4, 16 (CIFAR stem). One case
falls short: the v2 at width 4 with the ImageNet stem, whose layer1 starts at 0.46-0.61 over seeds (a 4-channel
bottleneck after a stem at 0.67; branch_a0 1.4 would lift it to 0.50 at the cost of the evidence, which is for 1.2).

Blocks opt in by exposing ``branch_end`` (the module closing the residual branch), ``shortcut`` and
``out_act`` (the gate after the sum); the SALU-family layers found there get the block rules. Models
without such blocks (the ViT) get the per-layer rules only: a new architecture declares where its branches
end, it does not bring a new init function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from torch import nn

from ..nn import GALU, SALU, SWALU, SaluFamily

__all__ = ["InitRules", "ResNetInit", "init_model", "CONV_INITS", "BRANCH_SCALINGS"]

CONV_INITS = ("kaiming_normal", "default")
BRANCH_SCALINGS = ("sqrt_blocks", "none")


def _check_positive(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def _check_choice(name: str, v, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


@dataclass
class InitRules:
    """Init of convs and SALU-family layers; the module docstring gives the reason for every default.

    Defaults are the ResNet rules; each registered model's table row holds its own values. Every field is
    validated on construction, so a bad value fails here with the field's name and valid range."""

    conv: str = "kaiming_normal"
    salu_a0: float = 1.5
    salu_b0: float = 0.1
    branch_a0: float = 1.2
    shortcut_a0: float = 1.0
    block_gate_a0: float = 4.0
    gate_b0: float = 0.01
    branch_scaling: str = "sqrt_blocks"

    def __post_init__(self) -> None:
        self.conv = _check_choice("conv", self.conv, CONV_INITS)
        self.branch_scaling = _check_choice("branch_scaling", self.branch_scaling, BRANCH_SCALINGS)
        for f in fields(self):
            if f.type in ("float", float):
                setattr(self, f.name, _check_positive(f.name, getattr(self, f.name)))


ResNetInit = InitRules  # the name models/__init__ has always exported


_BLOCK_PARTS = ("branch_end", "shortcut", "out_act")


def _set(m: SaluFamily, a0: float | None = None, b0: float | None = None) -> None:
    if a0 is not None:
        m.a_init = float(a0)
    if b0 is not None:
        m.b_init = float(b0)
    m.reset_parameters()


def _salus(m: nn.Module | None):
    return [] if m is None else [s for s in m.modules() if isinstance(s, SALU)]


def init_model(model: nn.Module, rules: InitRules) -> None:
    """Apply ``rules`` to the convs and SALU-family layers of ``model`` (norm layers keep their own init).

    Residual blocks are found by their ``branch_end`` / ``shortcut`` / ``out_act`` attributes and grouped by
    their parent (a stage) to count the blocks ``n`` that ``branch_scaling`` divides by."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and rules.conv == "kaiming_normal":
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, SALU):
            _set(m, rules.salu_a0, rules.salu_b0)
        elif isinstance(m, (SWALU, GALU)):
            _set(m, None, rules.gate_b0)
    for stage in model.modules():
        blocks = [b for b in stage.children() if all(hasattr(b, k) for k in _BLOCK_PARTS)]
        scale = 1.0 / math.sqrt(len(blocks)) if blocks and rules.branch_scaling == "sqrt_blocks" else 1.0
        for b in blocks:
            for s in _salus(b.branch_end):
                _set(s, rules.branch_a0 * scale)
            for s in _salus(b.shortcut):
                _set(s, rules.shortcut_a0)
            for g in b.out_act.modules():
                if isinstance(g, (SWALU, GALU)):
                    _set(g, rules.block_gate_a0)
