"""Model zoo: SaluNet-C-18/C-50/T and their normalized twins, behind one registry."""
from ._registry import MODEL_CONFIGS, CNNConfig, ResNetConfig, ViTConfig, create_model, list_models, register_model
from .cnn import PlasticityCNN
from .init import InitRules, ResNetInit, init_model
from .layers import ACTS, NORMS, get_act_layer, get_norm_layer, norm_act
from .resnet import ResNet
from .vit import ViT

__all__ = ["create_model", "list_models", "register_model", "MODEL_CONFIGS", "ResNetConfig", "ViTConfig", "NORMS",
           "ACTS", "get_norm_layer", "get_act_layer", "norm_act", "ResNet", "ResNetInit", "InitRules", "init_model",
           "ViT", "CNNConfig", "PlasticityCNN"]
