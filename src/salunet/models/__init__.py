"""Model zoo: SaluNet-C-18/C-50/T and their normalized twins, behind one registry."""
from ._registry import MODEL_CONFIGS, create_model, list_models
from .layers import ACTS, NORMS, get_act_layer, get_norm_layer, norm_act
from .resnet import ResNet, ResNetInit
from .vit import ViT

__all__ = ["create_model", "list_models", "MODEL_CONFIGS", "NORMS", "ACTS", "get_norm_layer", "get_act_layer",
           "norm_act", "ResNet", "ResNetInit", "ViT"]
