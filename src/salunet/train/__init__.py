"""Training: config and recipes, the loop, EMA, checkpoints, distributed setup."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import RECIPES, TrainConfig, resolve_config
from .ema import EMA
from .config import build_model
from .evaluate import evaluate
from .loop import RunStopped, TrainingDiverged, train
from .optim import adaptive_clip_, lr_at, param_groups
from .pin import SaluPin

__all__ = ["train", "evaluate", "TrainConfig", "RECIPES", "resolve_config", "EMA", "save_checkpoint",
           "load_checkpoint", "CheckpointError", "TrainingDiverged", "RunStopped", "build_model", "lr_at",
           "param_groups", "adaptive_clip_", "SaluPin"]
