"""Training on the Hugging Face Trainer with auxiliary (anti-collapse) losses."""

from .callbacks import (
    CollapseAlarm,
    CollapseMonitorCallback,
    CollatorStateCallback,
    NonFiniteGuardCallback,
    QuietProgressCallback,
    StepUpdateCallback,
    StopOnSignalCallback,
)
from .trainer import DecollapseTrainer, DecollapseTrainingArguments, NonFiniteLossError
from .weighting import STRATEGIES, LossWeighting

__all__ = [
    "CollapseAlarm",
    "CollapseMonitorCallback",
    "CollatorStateCallback",
    "DecollapseTrainer",
    "DecollapseTrainingArguments",
    "LossWeighting",
    "NonFiniteGuardCallback",
    "NonFiniteLossError",
    "QuietProgressCallback",
    "STRATEGIES",
    "StepUpdateCallback",
    "StopOnSignalCallback",
]
