"""Trainer internals: LoRA adapters over quantized frozen layers."""
