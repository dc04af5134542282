"""salunet: normalization-free deep networks with SALU, SWALU and GALU (arXiv 2606.02927)."""
from .nn import GALU, SALU, SALUAct, SWALU, functional

__version__ = "0.1.0"
__all__ = ["SALU", "SWALU", "GALU", "SALUAct", "functional", "__version__"]
