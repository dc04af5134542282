"""Build (once) and load the fused C++ CPU kernels of ``csrc/salu_cpu.cpp``.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (about 40 s on 2 cores) and cached
by torch in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so later processes load it in well
under a second. It is compiled for the vector ISA that this PyTorch build reports for the running CPU
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, or portable code otherwise), exactly as ATen's own
CPU kernels select ``at::vec::Vectorized``; the ISA is part of the extension's name so that caches of different
machines never mix. Building needs a C++ compiler and ninja (a dependency of the package).

Why C++ rather than ``torch.compile``: the parameter gradients are reductions over every dimension but the
channel. Inductor splits such a backward into a pointwise loop that materialises three full-size intermediates
and a second, strided reduction loop that recomputes the math (about 2x the time of a single pass), and it
compiles once per input shape (seconds each, for every layer shape of a network). The C++ kernel does each
direction in one pass over memory for every shape.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

__all__ = ["load", "load_error", "capability", "SOURCE"]

log = logging.getLogger("salunet.kernels")

SOURCE = Path(__file__).with_name("csrc") / "salu_cpu.cpp"

_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl",
               "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}

_lock = threading.Lock()
_module = None
_error: str | None = None


def capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - very old torch: portable code
        return "DEFAULT"


def load():
    """Return the compiled extension module, building it on first use; ``None`` if it cannot be built (the
    reason is then in :func:`load_error`)."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        from torch.utils import cpp_extension

        cap = capability()
        flags = _ISA_FLAGS.get(cap, [])
        digest = hashlib.sha1(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:10]
        name = f"salunet_cpu_{cap.lower()}_{digest}"
        log.info("salunet kernels: loading C++ CPU kernels %s (built once, ~40 s, then cached)", name)
        try:
            _module = cpp_extension.load(
                name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp", *flags],
                extra_ldflags=["-fopenmp"], verbose=os.environ.get("SALUNET_VERBOSE_BUILD") == "1")
        except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, read-only cache...: report, fall back
            _error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return _module


def load_error() -> str | None:
    """Why the extension could not be built, or ``None``."""
    return _error
