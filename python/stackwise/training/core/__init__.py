"""Trainer internals: LoRA adapters over quantized frozen layers, and the fusion trainer."""

from __future__ import annotations

from stackwise.training.core.fusion_trainer import (
    FusionTrainer,
    QLoRAAdapter,
    load_peft_adapters,
    save_peft_adapters,
)

__all__ = ["FusionTrainer", "QLoRAAdapter", "load_peft_adapters", "save_peft_adapters"]
