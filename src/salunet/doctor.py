"""``salunet doctor``: the versions this installation runs on and the state of the C++ kernel build.

Reports salunet, Python, torch (version, git revision, C++ ABI, CUDA), numpy, the CPU's vector ISA, the kernel
mode (``SALUNET_KERNELS``), the C++ build (cache folder, build folder, whether it is current for this torch,
when it was built and how long it took, a stale torch lock), the compiler and ninja that would build it, and the
optional extras (tensorboard, onnx, onnxruntime, timm). Nothing is built unless asked (``--build``), since a build
takes about 25 s; a current build is loaded (well under a second) to report the path the kernels take.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys

__all__ = ["report", "format_report"]

OPTIONAL = ("tensorboard", "onnx", "onnxruntime", "timm", "triton")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _first_output_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def _cpu_half() -> dict:
    """Whether torch runs bf16 / fp16 natively on this CPU (True / False; None: this torch cannot tell): without it,
    ``--amp`` on the CPU takes slow fallback paths (the trainer says so, train/evaluate.py ``amp_note``)."""
    from .train.evaluate import cpu_has_native

    return {amp: cpu_has_native(amp) for amp in ("bf16", "fp16")}


def report(build: bool = False) -> dict:
    """Everything ``salunet doctor`` prints, as a dict; ``build`` builds the C++ kernels if they are not current."""
    import torch

    from . import __version__
    from .nn import cpu_ext, kernels

    cxx = os.environ.get("CXX", "c++")
    cxx_path = shutil.which(cxx)
    ninja = shutil.which("ninja")
    out = {
        "salunet": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "torch_cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "torch_cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "numpy": _version("numpy"),
        "cpu_isa": cpu_ext.capability(),
        "cpu_half": _cpu_half(),
        "threads": torch.get_num_threads(),
        "kernel_mode": kernels.get_kernel_mode(),
        "compiler": f"{cxx_path}: {_first_output_line([cxx_path, '--version'])}" if cxx_path else f"{cxx} not found",
        "ninja": f"{ninja}: {_first_output_line([ninja, '--version'])}" if ninja else "not found",
    }
    st = cpu_ext.status()
    out.update({"kernel_cache": st["cache_root"], "kernel_build": st["folder"], "kernel_build_current": st["current"],
                "kernel_built_at": st["built_at"], "kernel_build_s": st["build_s"],
                "kernel_stale_lock": st["stale_torch_lock"]})
    if st["current"] or build:
        cpu_ext.load()
        out["kernel_build_current"] = cpu_ext.status()["current"]
        out["kernel_error"] = cpu_ext.load_error()
        try:
            out["kernel_path_cpu"] = kernels.kernel_path("cpu")
        except (RuntimeError, ValueError) as exc:  # SALUNET_KERNELS=cpp and no build; =triton on CPU
            out["kernel_path_cpu"] = f"none ({exc})"
    else:
        out["kernel_error"] = None
        out["kernel_path_cpu"] = ("not built yet for this torch: the first use builds it (about 25 s), or run "
                                  "`salunet doctor --build`")
    out["triton_kernels"] = _triton_kernels()
    out["optional"] = {name: _version(name) for name in OPTIONAL}
    return out


def _triton_kernels() -> str:
    """Whether kernel mode ``triton`` can run here, and if not, why (triton is imported only where CUDA is)."""
    import torch

    from .nn import kernels

    if importlib.util.find_spec("triton") is None:  # any distribution of it (torch nightlies: pytorch-triton)
        return "triton not installed (pip install 'salunet[triton]')"
    if not torch.cuda.is_available():
        return "no CUDA device: they run CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for tests)"
    tk = kernels._triton()
    why = tk.unavailable_reason(torch.device("cuda"))
    choice = "auto's choice on CUDA" if kernels.AUTO_CUDA == "triton" else "not auto's choice yet, docs/GPU.md"
    return why or f"ready on CUDA: SALUNET_KERNELS=triton ({choice}); launched {tk.launch_path()}"


_LABELS = {
    "salunet": "salunet", "python": "python", "platform": "platform", "torch": "torch", "torch_git": "torch git",
    "torch_cxx11_abi": "torch C++11 ABI", "torch_cuda": "torch CUDA", "cuda_devices": "CUDA devices",
    "numpy": "numpy", "cpu_isa": "CPU ISA", "cpu_half": "CPU bf16 / fp16", "threads": "torch threads",
    "kernel_mode": "kernel mode",
    "kernel_path_cpu": "kernel path (CPU)", "kernel_cache": "kernel cache", "kernel_build": "kernel build",
    "kernel_build_current": "build current", "kernel_built_at": "built at", "kernel_build_s": "build seconds",
    "kernel_stale_lock": "stale build lock", "kernel_error": "build error", "compiler": "C++ compiler",
    "ninja": "ninja", "triton_kernels": "Triton kernels",
}


def format_report(r: dict) -> str:
    """``label: value`` lines, one per entry (optional extras on one line)."""
    width = max(len(v) for v in _LABELS.values()) + 1
    lines = []
    for key, label in _LABELS.items():
        v = r.get(key)
        if key == "kernel_build_current":
            v = "yes" if v else "no (the next use builds it)"
        elif key == "cuda_devices":
            v = ", ".join(v) if v else "none"
        elif key == "cpu_half":
            v = " / ".join({True: "native", False: "slow", None: "unknown"}[v[amp]] for amp in ("bf16", "fp16")) + (
                " (--amp takes torch's slow fallback paths on this CPU: use --amp none here)" if False in v.values()
                else "")
        elif key == "kernel_stale_lock":
            v = "yes (the next build takes it over)" if v else "no"
        elif v is None:
            v = "-"
        lines.append(f"{label + ':':<{width}} {v}")
    extras = ", ".join(f"{k} {v}" if v else f"{k} not installed" for k, v in r["optional"].items())
    lines.append(f"{'optional:':<{width}} {extras}")
    return "\n".join(lines)
