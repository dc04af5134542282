"""Deployment: ONNX files that are right or are not written.

Every SALU-family op records as plain tensor ops while a graph is captured (:func:`salunet.nn.kernels.recorded`),
so ``torch.jit.trace``, ``torch.export`` and both ONNX exporters hold the model's math; ``torch.jit.script``
refuses SALU modules with a one-line error. :func:`export_onnx` adds the check that makes a wrong file
impossible to miss: the file is written to a temporary name, run with onnxruntime (when installed) on the
example input and on a second input of another batch size and other values (a graph that ignores its input
fails this), compared with the eager model, and only then renamed into place. Without onnxruntime the file is
written unchecked and the result says so.

Exporters: ``"dynamo"`` (``torch.onnx.export(..., dynamo=True)``, the default from torch 2.9; needs
``onnxscript``) and ``"torchscript"`` (the legacy exporter, ``dynamo=False``, the default on torch 2.4-2.8).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ._modes import eval_modes

__all__ = ["EXPORTERS", "ExportResult", "export_onnx", "relative_error", "onnxruntime_available"]

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_RTOL = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "output"


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how it was checked (``max_rel_error`` None when unchecked)."""

    path: Path
    exporter: str
    dynamic_batch: bool
    checked: bool
    max_rel_error: float | None
    note: str

    def __str__(self) -> str:
        check = (f"onnxruntime == eager within {self.max_rel_error:.1e} (relative)" if self.checked
                 else f"NOT checked: {self.note}")
        return f"wrote {self.path} ({self.exporter} exporter, {'dynamic' if self.dynamic_batch else 'static'} batch; {check})"


def relative_error(got: Tensor, ref: Tensor) -> float:
    """max |got - ref| / max |ref| over the finite entries of ``ref``; inf if the shapes differ, if a NaN or inf of
    ``ref`` is not matched exactly in ``got``, or if ``got`` is not finite where ``ref`` is."""
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        return float("inf")
    finite = torch.isfinite(ref)
    g, r = got[~finite], ref[~finite]
    if not ((g == r) | (g.isnan() & r.isnan())).all() or not torch.isfinite(got[finite]).all():
        return float("inf")
    if not finite.any():
        return 0.0
    scale = ref[finite].abs().max().clamp_min(1e-30)
    return float((got - ref)[finite].abs().max() / scale)


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def _require(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"the dynamo ONNX exporter needs {' and '.join(missing)}: pip install 'salunet[onnx]' "
                             "(or use exporter='torchscript')")
        if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
            raise ValueError(f"torch {torch.__version__} has no dynamo ONNX exporter; use exporter='torchscript' "
                             "or torch >= 2.5")


@contextmanager
def _quiet():
    """The exporters' progress prints and torchvision notices are not ours to show; errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on shape checks, deprecation notices
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _export(model: nn.Module, x: Tensor, path: Path, exporter: str, dynamic_batch: bool, opset: int | None):
    kw = {} if opset is None else {"opset_version": opset}
    if exporter == "dynamo":
        shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=shapes, external_data=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False, **kw)
    else:
        extra = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(model, (x,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=axes, **extra, **kw)


def _check_inputs(x: Tensor, dynamic_batch: bool) -> list[Tensor]:
    """The example and a second input with other values (and, with a dynamic batch, another batch size)."""
    g = torch.Generator().manual_seed(1)
    other = torch.randn(x.shape, generator=g, dtype=x.dtype) * x.std().clamp_min(1e-3) + x.mean()
    if dynamic_batch:
        other = torch.cat([other, other[:1].flip(-1)])
    return [x, other]


def export_onnx(model: nn.Module, example_input: Tensor, path: str | Path, *, exporter: str = "dynamo",
                dynamic_batch: bool = True, opset: int | None = None, check: bool = True,
                rtol: float = DEFAULT_RTOL) -> ExportResult:
    """Write ``model`` (evaluated in eval mode, on CPU, float32) as ONNX to ``path``.

    With onnxruntime installed and ``check`` (default), the file is kept only if onnxruntime reproduces the
    eager model within ``rtol`` (max absolute difference / max absolute output) on the example input and on a
    second input; otherwise nothing is written and ValueError says by how much it differed. ``dynamic_batch``:
    the batch dim is symbolic (``"batch"``). ``opset``: the ONNX opset (default: the exporter's).
    """
    _require(exporter)
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: name the ONNX file *.onnx")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such directory for the ONNX file; create it or choose another path")
    if not isinstance(example_input, Tensor) or not example_input.is_floating_point():
        raise ValueError("example_input must be a floating-point tensor of the model's input shape, e.g. "
                         "torch.randn(1, 3, 32, 32)")
    x = example_input.detach().cpu().float()
    if dynamic_batch and x.shape[0] == 1:  # torch.export specialises a dim of size 1: trace a batch of 2
        x = torch.cat([x, x.flip(-1)])
    with eval_modes(model):
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.onnx")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with _quiet():
                _export(model, x, tmp, exporter, dynamic_batch, opset)
            checked, err, note = False, None, ""
            if not check:
                note = "check=False"
            elif not onnxruntime_available():
                note = "onnxruntime is not installed (pip install 'salunet[onnx]')"
            else:
                err = _compare(model, tmp, _check_inputs(x, dynamic_batch))
                if not err <= rtol:
                    raise ValueError(f"ONNX export ({exporter}) differs from the eager model: max relative error "
                                     f"{err:.2e} > {rtol:g}; nothing written (please report this)")
                checked = True
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return ExportResult(path, exporter, dynamic_batch, checked, err, note)


@torch.no_grad()
def _compare(model: nn.Module, onnx_path: Path, inputs: list[Tensor]) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if names != [INPUT_NAME]:
        raise ValueError(f"ONNX export has inputs {names}, expected [{INPUT_NAME!r}]: the graph does not read its "
                         "input; nothing written (please report this)")
    worst = 0.0
    for x in inputs:
        ref = model(x)
        got = torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
        worst = max(worst, relative_error(got, ref))
    return worst
