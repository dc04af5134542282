"""SALU, SWALU and GALU: functional ops, modules and fused kernels."""
from . import functional
from .kernels import get_kernel_mode, kernel_path, set_kernel_mode
from .modules import GALU, SALU, SALUAct, SALUAddAct, SWALU, SaluFamily

__all__ = ["functional", "SALU", "SWALU", "GALU", "SALUAct", "SALUAddAct", "SaluFamily", "set_kernel_mode",
           "get_kernel_mode", "kernel_path"]
