"""Training: the progressive rack builder and trainer, and strategies (quantization, masking,
caching)."""

from __future__ import annotations

from stackwise.training.progressive import ProgressiveTrainer
from stackwise.training.rack_builder import ProgressiveRackBuilder

__all__ = ["ProgressiveRackBuilder", "ProgressiveTrainer"]
