"""salunet: normalization-free deep networks with SALU, SWALU and GALU (arXiv 2606.02927)."""
from .convert import ConvertReport, convert
from .models import create_model, list_models
from .nn import GALU, SALU, SALUAct, SALUAddAct, SWALU, functional

__version__ = "0.1.0"
__all__ = ["SALU", "SWALU", "GALU", "SALUAct", "SALUAddAct", "functional", "convert", "ConvertReport",
           "create_model", "list_models", "__version__"]
