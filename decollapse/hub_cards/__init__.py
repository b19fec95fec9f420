"""Hub-facing layer: self-contained exports, model cards built from a folder's records, and pushes."""

from .card import (
    PLACEHOLDERS,
    REQUIRED_METADATA,
    CardError,
    build_card,
    validate_card,
    write_card,
)
from ..remote_code import bundle_sources
from .export import ExportError, export_checkpoint
from .push import PushError, PushPlan, plan_push, push

__all__ = [
    "PLACEHOLDERS",
    "REQUIRED_METADATA",
    "CardError",
    "ExportError",
    "PushError",
    "PushPlan",
    "build_card",
    "bundle_sources",
    "export_checkpoint",
    "plan_push",
    "push",
    "validate_card",
    "write_card",
]
