"""Model building blocks."""

from __future__ import annotations

from stackwise.model.quantized import QuantizedLinear

__all__ = ["QuantizedLinear"]
