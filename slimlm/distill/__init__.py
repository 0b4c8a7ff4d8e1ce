"""Knowledge distillation and fine-tuning: losses, one trainer (off-/on-policy, sequence-level, DDP), LoRA/QLoRA."""

from slimlm.distill.losses import LOSS_NAMES, divergence, lm_loss
from slimlm.distill.trainer import DistillConfig, TrainResult, train

__all__ = ["LOSS_NAMES", "DistillConfig", "TrainResult", "divergence", "lm_loss", "train"]
