"""The VGGT-family network as plain torch modules (no cache policies, no serving)."""

from .checkpoint import (
    CheckpointMismatchError,
    build_model,
    check_state_dict,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from .config import PRESETS, ModelConfig, config_with, get_preset
from .vggt import OUTPUT_NAMES, VGGT, count_parameters

__all__ = [
    "VGGT",
    "ModelConfig",
    "PRESETS",
    "OUTPUT_NAMES",
    "get_preset",
    "config_with",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
    "read_state_dict",
    "check_state_dict",
    "CheckpointMismatchError",
    "count_parameters",
]
