"""salunet: normalization-free deep networks with SALU, SWALU and GALU (arXiv 2606.02927)."""
from .convert import ConvertReport, convert
from .models import create_model, list_models
from .nn import GALU, SALU, SALUAct, SALUAddAct, SWALU, functional

__version__ = "0.1.0"
__all__ = ["SALU", "SWALU", "GALU", "SALUAct", "SALUAddAct", "functional", "convert", "ConvertReport",
           "create_model", "list_models", "load_model", "export_weights", "export_onnx", "SaluPin", "__version__"]

# imported on first use: they build on salunet.train, which `import salunet` need not load (plain imports: the
# package holds no dynamic import, tests/test_reliability_safety.py)
def __getattr__(name: str):
    if name in ("load_model", "export_weights"):
        from . import weights

        return getattr(weights, name)
    if name == "SaluPin":
        from .train.pin import SaluPin

        return SaluPin
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'salunet' has no attribute {name!r}")
