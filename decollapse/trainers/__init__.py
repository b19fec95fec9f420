"""Training on the Hugging Face Trainer with auxiliary (anti-collapse) losses."""

from .callbacks import (
    CollapseAlarm,
    CollapseMonitorCallback,
    NonFiniteGuardCallback,
    QuietProgressCallback,
    StepUpdateCallback,
)
from .trainer import DecollapseTrainer, DecollapseTrainingArguments, NonFiniteLossError
from .weighting import STRATEGIES, LossWeighting

__all__ = [
    "CollapseAlarm",
    "CollapseMonitorCallback",
    "DecollapseTrainer",
    "DecollapseTrainingArguments",
    "LossWeighting",
    "NonFiniteGuardCallback",
    "NonFiniteLossError",
    "QuietProgressCallback",
    "STRATEGIES",
    "StepUpdateCallback",
]
