"""Training of missing-modality segmentation models with the MedMAP alignment (docs: training)."""

from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import TrainConfig, load_config
from .frameworks import FRAMEWORK_CLASSES, Framework, StepResult, build_framework, gradient_reversal
from .losses import deep_supervision_loss, distillation_loss, seg_loss, soft_dice
from .sampling import draw_mask, split_cases
from .trainer import NonFiniteError, Trainer, TrainResult, train

__all__ = [
    "TrainConfig", "load_config", "train", "Trainer", "TrainResult", "NonFiniteError",
    "Framework", "StepResult", "FRAMEWORK_CLASSES", "build_framework", "gradient_reversal",
    "load_checkpoint", "save_checkpoint", "model_from_checkpoint",
    "seg_loss", "soft_dice", "deep_supervision_loss", "distillation_loss", "draw_mask", "split_cases",
]
