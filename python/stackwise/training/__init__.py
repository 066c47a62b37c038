"""Training: the progressive rack builder and trainer, the hierarchical :class:`Trainer`, the
:class:`FusionTrainer`, and strategies (quantization, masking, caching)."""

from __future__ import annotations

from stackwise.training.core.fusion_trainer import FusionTrainer
from stackwise.training.distributed import DistributedContext
from stackwise.training.progressive import ProgressiveTrainer
from stackwise.training.rack_builder import ProgressiveRackBuilder
from stackwise.training.trainer import Trainer

__all__ = [
    "DistributedContext",
    "FusionTrainer",
    "ProgressiveRackBuilder",
    "ProgressiveTrainer",
    "Trainer",
]
