"""Configuration: dataclasses, YAML I/O and validation (see :mod:`stackwise.config.base`)."""

from __future__ import annotations

from stackwise.config.base import (
    DataConfig,
    ModelConfig,
    StackWiseConfig,
    TrainingConfig,
)
from stackwise.exceptions import ConfigurationError

__all__ = ["ConfigurationError", "DataConfig", "ModelConfig", "StackWiseConfig", "TrainingConfig"]
