"""Model zoo: SaluNet-C-18/C-50/T and their normalized twins, behind one registry."""
from ._registry import (MODEL_CONFIGS, MODEL_TRAIN_DEFAULTS, CNNConfig, ResNetConfig, ViTConfig, create_model,
                        describe_model, list_models, model_train_defaults, register_model)
from .cnn import PlasticityCNN
from .init import InitRules, ResNetInit, init_model
from .layers import ACTS, NORMS, get_act_layer, get_norm_layer, norm_act
from .nf import NFConv2d, fold_nf_convs
from .resnet import ResNet
from .vit import ViT

__all__ = ["create_model", "describe_model", "list_models", "register_model", "MODEL_CONFIGS", "ResNetConfig",
           "ViTConfig", "NORMS", "ACTS", "get_norm_layer", "get_act_layer", "norm_act", "ResNet", "ResNetInit", "InitRules", "init_model",
           "ViT", "CNNConfig", "PlasticityCNN", "MODEL_TRAIN_DEFAULTS", "model_train_defaults", "NFConv2d",
           "fold_nf_convs"]
